"""Analytic FLOPs and parameter counts of an architecture, without building it.

Two FLOPs conventions, both multiply-accumulates for one image; parameters are the same in both:

- `macs` (ours, the default): every multiply-accumulate of the matrix products and convolutions,
  exactly what `torch.utils.flop_counter` counts (it reports 2 per multiply-accumulate, so
  `measure` halves it). Norms, activations and additions are not counted. Published GLiT-Tiny:
  1.47 G.
- `glit`: the authors' formula (reference, "Their FLOPs formula"), which leaves out the doubling
  of the Conformer module's first pointwise convolution (its 2 x e_c x C_l outputs feed the GLU;
  the formula counts e_c x C_l). Everything else agrees term by term. Published GLiT-Tiny: 1.33 G,
  the figure the authors report; the paper's FLOPs limits (about 1.3 G for Tiny) are in it.

Costs add up block by block, which lets the search bound them cheaply and `SearchSpace`-wide
ranges come from per-block extremes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture, Block
from glit_ray.models.space import SearchSpace

CONVENTIONS = ("macs", "glit")


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise UserError(f"unknown FLOPs convention {convention!r}: use 'macs' (every multiply-accumulate, "
                        "as torch counts them) or 'glit' (the GLiT authors' formula)")
    return convention


@dataclass(frozen=True)
class Cost:
    flops: int  # multiply-accumulates per image
    params: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.params + other.params)


def block_cost(space: SearchSpace, block: Block, convention: str = "macs") -> Cost:
    """One GL-block: attention on the global channels, convolution on the local ones, then MLP."""
    N, C = space.num_patches + 1, space.embed_dim
    w = space.widths(block)
    flops, params = 0, 4 * C  # two LayerNorms
    if w["global"]:
        cg, a = w["global"], block.g * w["attn_head"]
        flops += N * cg * 3 * a + 2 * N * N * a + N * a * cg  # qkv, q@k and attn@v, projection
        params += cg * 3 * a + 3 * a + a * cg + cg
    if w["local"]:
        cl, e, k = w["local"], w["conv_hidden"], block.kernel
        glu_in = e if check_convention(convention) == "glit" else 2 * e  # the authors count half of it
        flops += N * cl * glu_in + N * e * k + N * e * cl  # pointwise (to the GLU), depthwise, pointwise
        params += cl * 2 * e + 2 * e + e * k + e + 2 * e + e * cl + cl  # dw has a bias; BN has 2 per channel
    hidden = w["mlp_hidden"]
    flops += 2 * N * C * hidden
    params += 2 * C * hidden + hidden + C
    return Cost(flops, params)


def stem_cost(space: SearchSpace, num_classes: int) -> Cost:
    """Patch embedding, class token, positions, final norm and classifier head (the same in both conventions)."""
    C, P = space.embed_dim, space.num_patches
    patch = space.in_chans * space.patch_size**2 * C
    return Cost(
        flops=P * patch + C * num_classes,
        params=patch + C + C + (P + 1) * C + 2 * C + C * num_classes + num_classes,
    )


def arch_cost(space: SearchSpace, arch: Architecture, num_classes: int = 1000, convention: str = "macs") -> Cost:
    """FLOPs (in `convention`, see the module doc) and parameters of `arch` in `space`."""
    total = stem_cost(space, num_classes)
    for block in arch.blocks:
        total = total + block_cost(space, block, convention)
    return total


def cost_range(space: SearchSpace, level: str, num_classes: int = 1000,
               distribution: tuple[int, ...] | None = None, convention: str = "macs") -> tuple[Cost, Cost]:
    """The smallest and largest FLOPs and params any architecture of the level can have."""
    low = high = stem_cost(space, num_classes)
    for allowed in space.block_choices(level, distribution):
        costs = [block_cost(space, b, convention) for b in allowed]
        low = low + Cost(min(c.flops for c in costs), min(c.params for c in costs))
        high = high + Cost(max(c.flops for c in costs), max(c.params for c in costs))
    return low, high


@torch.no_grad()
def measure(model: torch.nn.Module, input_size: tuple[int, int, int]) -> Cost:
    """Count a built model's FLOPs (one image, eval mode) and parameters with torch's counters.

    The math attention backend is forced because the counter does not see the fused CPU kernel.
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return Cost(counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters()))
