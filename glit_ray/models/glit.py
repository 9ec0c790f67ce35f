"""The GLiT model family: the Global-Local block, the standalone network, timm registrations.

A GL-block splits its (pre-normed) input channels: the first C*G/H go through G self-attention
heads, the last C*L/H through the Conformer convolution module, and the two outputs are
concatenated (global first) with no projection after. Then the usual pre-norm MLP. See
`../shared/reference/glit.md` for the spec this file follows.

After `import glit_ray`, `timm.create_model('glit_tiny_patch16_224')` builds the published
GLiT-Tiny; Small and Base are the same architecture with the head split scaled to 6 and 12 heads.
`timm.create_model('glit', arch=..., space=...)` builds any architecture of any space (what
`glit_ray.retrain` exports reload through). Every registration loads the authors' released
checkpoint too (`pretrained=True, pretrained_cfg_overlay=dict(file=...)`, see `glit_ray.models.checkpoint`).
"""
# Annotations stay evaluated (no `from __future__ import annotations`): FX copies forward's annotations into the
# code it generates, which TorchScript must read as types, not strings.
from collections import Counter
from dataclasses import replace
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture, Block
from glit_ray.models.checkpoint import checkpoint_filter_fn
from glit_ray.models.space import SearchSpace

LayerNorm = partial(nn.LayerNorm, eps=1e-6)
GLOBAL_POOLS = ("token", "avg", "")  # the class token (GLiT's, DeiT's), the mean of the patch tokens, none


class ConvModule(nn.Module):
    """Conformer convolution module over the token sequence, read as a 1-D signal (B, N, C)."""

    def __init__(self, dim: int, hidden: int, kernel: int):
        super().__init__()
        self.pw1 = nn.Conv1d(dim, 2 * hidden, 1)
        self.glu = nn.GLU(dim=1)
        self.dw = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)  # biased, as the authors'
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.SiLU()
        self.pw2 = nn.Conv1d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.glu(self.pw1(x.transpose(1, 2)))
        x = self.pw2(self.act(self.bn(self.dw(x))))
        return x.transpose(1, 2)


def block_parts(space: SearchSpace, block: Block) -> dict[str, nn.Module | None]:
    """Fresh modules for one block's own operations (attention, convolution, MLP)."""
    w = space.widths(block)
    return {
        "attn": Attention(w["global"], num_heads=block.g, attn_head_dim=w["attn_head"], qkv_bias=True)
        if w["global"] else None,
        "conv": ConvModule(w["local"], w["conv_hidden"], block.kernel) if w["local"] else None,
        "mlp": Mlp(space.embed_dim, w["mlp_hidden"], act_layer=nn.GELU),
    }


def compile_operations(net: nn.Module, **options) -> nn.Module:
    """Compile each attention, convolution and MLP module of `net` in place (`torch.compile(**options)`): regional
    compilation. A supernet runs another path every step: a graph of the whole network would be compiled for every
    path, a graph per operation once per shape of that operation, in training and in evaluation (BatchNorm's mode),
    so their number is bounded by the modules `net` holds. Dynamo guards on parameter shapes and stops compiling a
    function after `recompile_limit` graphs (8), which a low-level supernet's convolutions (up to 27 shapes) pass:
    the limit is raised to what `net` needs. Fused kernels, fewer launches; state-dict keys are unchanged. Returns
    `net`."""
    import torch._dynamo  # (torch.compile's, loaded when it is asked for)

    operations = [m for m in net.modules() if isinstance(m, (Attention, ConvModule, Mlp))]
    shapes = {(type(m), tuple(p.shape for p in m.parameters())) for m in operations}
    most = max(Counter(kind for kind, _ in shapes).values(), default=0)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * most)
    for module in operations:
        module.compile(**options)
    return net


class GLBlock(nn.Module):
    """A Global-Local block: pre-norm, the global heads on the first `split` channels beside the local heads on the
    rest (either may be absent), then the pre-norm MLP. The standalone network builds its own (`GLBlock.build`); the
    supernet's sampled path is a GLBlock of the supernet's shared modules (`SuperBlock.paths`), so both run this one
    `forward`, which TorchScript scripts (an absent head is a None attribute, resolved when scripted)."""

    def __init__(self, split: int, norm1: nn.Module, attn: nn.Module | None, conv: nn.Module | None, norm2: nn.Module,
                 mlp: nn.Module, drop_path: nn.Module):
        super().__init__()
        self.split = split
        self.norm1, self.attn, self.conv, self.norm2, self.mlp, self.drop_path = norm1, attn, conv, norm2, mlp, drop_path

    @classmethod
    def build(cls, space: SearchSpace, block: Block, drop_path: float = 0.0) -> "GLBlock":
        """A block with fresh modules for `block`'s G and sizes."""
        parts = block_parts(space, block)
        return cls(space.widths(block)["global"], LayerNorm(space.embed_dim), parts["attn"], parts["conv"],
                   LayerNorm(space.embed_dim), parts["mlp"], DropPath(drop_path) if drop_path > 0 else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.attn is None:
            y = self.conv(y)
        elif self.conv is None:
            y = self.attn(y)
        else:
            y = torch.cat([self.attn(y[..., :self.split]), self.conv(y[..., self.split:])], dim=-1)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformerShell(nn.Module):
    """Patch embedding, class token, positions, final norm and head: what every GLiT shares, with timm's ViT contract
    (`global_pool`, `head_hidden_size`, `reset_classifier`, `set_grad_checkpointing`, `dynamic_img_size`).

    Subclasses add `self.blocks`; the standalone model and the supernet differ only there. A local head's
    convolution runs along the token sequence, so any image size works once the positions are resampled to its
    grid: at creation (`img_size`), or per input with `dynamic_img_size=True`, as timm's ViT does.
    """

    def __init__(self, space: SearchSpace, num_classes: int = 1000, img_size: int | None = None,
                 in_chans: int | None = None, drop_rate: float = 0.0, global_pool: str = "token",
                 dynamic_img_size: bool = False):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise UserError(f"global_pool {global_pool!r} is not one of {GLOBAL_POOLS}")
        self.space = space
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = space.embed_dim
        self.num_prefix_tokens, self.dynamic_img_size, self.grad_checkpointing = 1, dynamic_img_size, False
        dynamic = {"strict_img_size": False, "output_fmt": "NHWC"} if dynamic_img_size else {}
        self.patch_embed = PatchEmbed(img_size or space.img_size, space.patch_size, in_chans or space.in_chans,
                                      space.embed_dim, **dynamic)
        self.feature_info = [{"module": f"blocks.{i}", "num_chs": space.embed_dim, "reduction": space.patch_size}
                             for i in range(space.depth)]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, space.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, space.embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm = LayerNorm(space.embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(space.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def init_weights(self):
        """timm's ViT initialisation: truncated-normal positions and linears, tiny class token."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            batch, height, width, channels = x.shape
            pos_embed = resample_abs_pos_embed(self.pos_embed, [height, width], num_prefix_tokens=self.num_prefix_tokens)
            x = x.view(batch, -1, channels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The (normed) tokens of `forward_features`, pooled as `global_pool` says, through the classifier."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise UserError(f"global_pool {global_pool!r} is not one of {GLOBAL_POOLS}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block's activations in the backward pass instead of keeping them (memory for compute)."""
        self.grad_checkpointing = enable


def drop_path_rates(depth: int, rate: float) -> list[float]:
    """DeiT's stochastic depth: rising linearly from 0 at the first block to `rate` at the last."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


class GLiT(VisionTransformerShell):
    """A standalone GLiT network for one architecture of one space."""

    def __init__(self, arch: Architecture | str, space: SearchSpace | str | dict = "glit_tiny", num_classes: int = 1000,
                 img_size: int | None = None, in_chans: int | None = None, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "token", dynamic_img_size: bool = False):
        """`space`: a SearchSpace, a built-in name or YAML path, or the mapping `SearchSpace.to_dict` gives."""
        if isinstance(space, dict):
            space = SearchSpace.from_dict(space)
        elif not isinstance(space, SearchSpace):
            space = SearchSpace.load(space)
        arch = space.validate(Architecture.parse(arch) if isinstance(arch, str) else arch)
        super().__init__(space, num_classes, img_size, in_chans, drop_rate, global_pool, dynamic_img_size)
        self.arch = arch
        rates = drop_path_rates(space.depth, drop_path_rate)
        self.blocks = nn.Sequential(*(GLBlock.build(space, b, r) for b, r in zip(arch.blocks, rates)))
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's ViT intermediates: the outputs of the blocks `indices` names (the last n for an int, all for None),
        as (B, C, H, W) patch grids (`output_fmt="NCHW"`) or token sequences ("NLC"), with their class tokens
        when `return_prefix_tokens`; and, unless `intermediates_only`, the final normed features before them."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt {output_fmt!r}: give NCHW or NLC")
        take, last = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self.embed(x)
        intermediates = []
        for i, block in enumerate(self.blocks[:last + 1] if stop_early else self.blocks):
            x = block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        prefixes = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefixes))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the norm, the head); returns the indices kept."""
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# The published GLiT-Tiny (reference table: block G and low-level choice), in architecture-string form.
GLIT_TINY_ARCH = (
    "3:v0.5m4-0:k31c2m4-1:k31c4v1m6-3:v1m4-0:k45c4m4-1:k31c4v1m6-"
    "3:v1m2-1:k31c4v1m2-0:k45c4m4-3:v1m4-0:k31c4m4-3:v2m6"
)


def scaled_arch(arch: str, factor: int) -> Architecture:
    """GLiT-Tiny's architecture with every head count multiplied by `factor` (Small 2, Base 4)."""
    return Architecture(tuple(replace(b, g=b.g * factor) for b in Architecture.parse(arch).blocks))


def published_arch(space: SearchSpace) -> Architecture:
    """The published GLiT-Tiny's architecture in `space`, its head split scaled to the space's heads."""
    if space.depth != 12 or space.num_heads % 3:
        raise UserError(f"space {space.name} (depth {space.depth}, {space.num_heads} heads) cannot hold the published "
                        "GLiT-Tiny (depth 12, a multiple of 3 heads); give the architecture")
    arch = scaled_arch(GLIT_TINY_ARCH, space.num_heads // 3)
    try:
        return space.validate(arch)
    except UserError as exc:
        raise UserError(f"space {space.name} does not hold the published GLiT-Tiny ({exc}); give the architecture") from None


def default_cfg(**kwargs) -> dict:
    return {
        # fixed_input_size: as timm's ViT and DeiT declare it; other sizes by img_size or dynamic_img_size
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "fixed_input_size": True, "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "glit": default_cfg(),
    "glit_tiny_patch16_224": default_cfg(),
    "glit_small_patch16_224": default_cfg(),
    "glit_base_patch16_224": default_cfg(),
})


def _build(variant: str, pretrained: bool, **kwargs) -> GLiT:
    """timm's builder, with the authors' checkpoints through `checkpoint_filter_fn` and `features_only` served by
    `forward_intermediates` (timm's ViT default: the last 3 blocks)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(GLiT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg={"out_indices": out_indices, "feature_cls": "getter"}, **kwargs)


def _create_glit(variant: str, pretrained: bool, space: str, factor: int, **kwargs) -> GLiT:
    return _build(variant, pretrained, arch=scaled_arch(GLIT_TINY_ARCH, factor), space=space, **kwargs)


@register_model
def glit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> GLiT:
    """GLiT-Tiny as published (76.3 top-1 on ImageNet-1k, 1.4 G FLOPs, 7,264,456 params); loads the authors' checkpoint."""
    return _create_glit("glit_tiny_patch16_224", pretrained, "glit_tiny", 1, **kwargs)


@register_model
def glit_small_patch16_224(pretrained: bool = False, **kwargs) -> GLiT:
    """GLiT-Tiny's architecture at DeiT-Small scale (embedding 384, 6 heads)."""
    return _create_glit("glit_small_patch16_224", pretrained, "glit_small", 2, **kwargs)


@register_model
def glit_base_patch16_224(pretrained: bool = False, **kwargs) -> GLiT:
    """GLiT-Tiny's architecture at DeiT-Base scale (embedding 768, 12 heads)."""
    return _create_glit("glit_base_patch16_224", pretrained, "glit_base", 4, **kwargs)


@register_model
def glit(pretrained: bool = False, arch: Architecture | str = GLIT_TINY_ARCH, space: SearchSpace | str | dict = "glit_tiny",
         **kwargs) -> GLiT:
    """Any architecture of any GLiT space; weights from `pretrained_cfg_overlay=dict(file=...)`."""
    return _build("glit", pretrained, arch=arch, space=space, **kwargs)
