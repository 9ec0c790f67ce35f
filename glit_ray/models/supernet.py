"""The weight-sharing supernet of one search level (SPOS).

Every candidate operation of every block is held once: an attention module per (G, attention
expansion), a convolution module per (L, kernel, conv expansion), an MLP per ratio. Options that
use the same operation share its weights (at the low level, a mixed block's 9 options share 3
convolution modules and 3 MLPs). `forward(x, arch)` looks the chosen operations up and runs only
those, as a standalone `GLBlock` made of the shared modules, so a sampled step runs the standalone
model's code and costs what the standalone subnet costs. `extract(arch)` copies the chosen weights
into a standalone `GLiT`.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from glit_ray.core.errors import UserError
from glit_ray.core.files import write_atomic
from glit_ray.models.arch import Architecture, Block
from glit_ray.models.checkpoint import fit_state_dict
from glit_ray.models.glit import GLBlock, GLiT, LayerNorm, VisionTransformerShell, block_parts, drop_path_rates
from glit_ray.models.space import SearchSpace, check_level

CHECKPOINT_FORMAT = "glit_ray.supernet/1"


def _key(*parts: float) -> str:
    """A ModuleDict key for an operation's sizes ('.' is not allowed in module names)."""
    return "_".join(f"{p:g}".replace(".", "p") for p in parts)


class SuperBlock(nn.Module):
    """All operations one depth position can choose from, each held once."""

    def __init__(self, space: SearchSpace, allowed: tuple[Block, ...], drop_path: float = 0.0):
        super().__init__()
        self.space = space
        self.norm1 = LayerNorm(space.embed_dim)
        self.norm2 = LayerNorm(space.embed_dim)
        self.attn, self.conv, self.mlp = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for block in allowed:
            keys = self.keys(block)
            for name, module in block_parts(space, block).items():
                store = getattr(self, name)
                if module is not None and keys[name] not in store:
                    store[keys[name]] = module
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # each option as the standalone block it is, built once: a view of the modules above (not registered, no
        # parameters of its own), so that a step looks its path up instead of assembling it
        self.paths = {block: self._assemble(block) for block in allowed}

    def keys(self, block: Block) -> dict[str, str]:
        local = self.space.num_heads - block.g
        return {
            "attn": _key(block.g, block.attn_expansion or 0),
            "conv": _key(local, block.kernel or 0, block.conv_expansion or 0),
            "mlp": _key(block.mlp_ratio),
        }

    def _assemble(self, block: Block) -> GLBlock:
        """The standalone block `block` is, made of this supernet's modules (shared, not copied): its parameters are
        the path's, under a standalone block's names."""
        keys = self.keys(block)
        attn = self.attn[keys["attn"]] if block.g else None
        conv = self.conv[keys["conv"]] if block.g < self.space.num_heads else None
        return GLBlock(self.space.widths(block)["global"], self.norm1, attn, conv, self.norm2, self.mlp[keys["mlp"]],
                       self.drop_path)

    def forward(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        return self.paths[block](x)


class GLiTSupernet(VisionTransformerShell):
    """One level's supernet: high (G per block, sizes at defaults) or low (sizes, G fixed)."""

    def __init__(self, space: SearchSpace, level: str, distribution: tuple[int, ...] | None = None,
                 num_classes: int = 1000, img_size: int | None = None, in_chans: int | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(space, num_classes, img_size, in_chans, drop_rate)
        self.level = check_level(level)
        self.distribution = tuple(distribution) if level == "low" else None
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate
        rates = drop_path_rates(space.depth, drop_path_rate)
        choices = space.block_choices(level, self.distribution)
        self.blocks = nn.ModuleList(SuperBlock(space, allowed, r) for allowed, r in zip(choices, rates))
        self.init_weights()

    def forward_features(self, x: torch.Tensor, arch: Architecture) -> torch.Tensor:
        x = self.embed(x)
        for block, gene in zip(self.blocks, arch.blocks, strict=True):
            x = checkpoint(block, x, gene, use_reentrant=False) if self.grad_checkpointing else block(x, gene)
        return self.norm(x)

    def forward(self, x: torch.Tensor, arch: Architecture) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, arch))

    def extract(self, arch: Architecture) -> GLiT:
        """A standalone GLiT for `arch` carrying this supernet's weights for that path."""
        self.space.validate(arch, self.level)
        if self.level == "low" and arch.distribution != self.distribution:
            raise ValueError(f"{arch} does not have this supernet's distribution {self.distribution}")
        model = GLiT(arch, self.space, self.num_classes, self.patch_embed.img_size[0],
                     self.patch_embed.proj.in_channels, self.drop_rate, self.drop_path_rate)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("blocks.")}
        for i, (block, gene) in enumerate(zip(self.blocks, arch.blocks)):
            state.update({f"blocks.{i}.{k}": v for k, v in block.paths[gene].state_dict().items()})
        model.load_state_dict(state)
        return model.to(self.pos_embed.device).train(self.training)


def save_supernet(net: GLiTSupernet, path: Path, **meta) -> None:
    """One self-describing file (space, level, distribution, classes, weights), written atomically."""
    record = {
        "format": CHECKPOINT_FORMAT, "space": net.space.to_dict(), "level": net.level,
        "distribution": list(net.distribution) if net.distribution else None, "num_classes": net.num_classes,
        "img_size": net.patch_embed.img_size[0], "in_chans": net.patch_embed.proj.in_channels,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "meta": meta,
    }
    buffer = io.BytesIO()
    torch.save(record, buffer)
    write_atomic(Path(path), buffer.getvalue())


def load_supernet(path: Path, map_location: str | torch.device = "cpu") -> tuple[GLiTSupernet, dict]:
    """Rebuild a supernet saved by `save_supernet`; returns it (eval mode) and its meta."""
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"supernet checkpoint {path} does not exist; train one with python -m glit_ray.train_supernet") from None
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise UserError(f"{path} is not a readable supernet checkpoint ({type(exc).__name__}); retrain or pick another file") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a glit_ray supernet checkpoint (format {CHECKPOINT_FORMAT} expected)")
    space = SearchSpace.from_dict(record["space"], source=f"{path} (space)")
    net = GLiTSupernet(space, record["level"], record["distribution"], record["num_classes"],
                       record["img_size"], record["in_chans"])
    # a mismatch means another glit_ray version saved it (e.g. before the depthwise convolutions had a bias)
    net.load_state_dict(fit_state_dict(record["state_dict"], net, str(path), hint="another glit_ray version saved it: train it again"))
    return net.to(map_location).eval(), record["meta"]
