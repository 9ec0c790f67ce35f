"""FLOPs/params limits, and uniform sampling inside them.

Limits are given in millions (`--flops-max 45` means 45 M multiply-accumulates), as NAS papers quote
them, with FLOPs in the limits' `convention` (`glit_ray.models.cost`: every multiply-accumulate, or the
GLiT authors' formula, in which the paper's limits are stated). Sampling inside limits is rejection sampling: uniform over the architectures that fit, with
a bounded number of draws. Infeasible limits are caught up front from the space's cost range, so
a run says so before any Ray process starts.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass

from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture
from glit_ray.models.cost import CONVENTIONS, Cost, arch_cost, block_cost, check_convention, cost_range, stem_cost
from glit_ray.models.space import SearchSpace

MAX_DRAWS = 10_000


@dataclass(frozen=True)
class Limits:
    """Closed bounds in millions; None means unbounded. FLOPs are counted in `convention`."""

    flops_min: float | None = None
    flops_max: float | None = None
    params_min: float | None = None
    params_max: float | None = None
    convention: str = "macs"

    def cost(self, space: SearchSpace, arch: Architecture, num_classes: int) -> Cost:
        """`arch`'s cost as these limits count it."""
        return arch_cost(space, arch, num_classes, self.convention)

    def __post_init__(self):
        check_convention(self.convention)

    def admits(self, cost: Cost) -> bool:
        flops, params = cost.flops / 1e6, cost.params / 1e6
        return (
            (self.flops_min is None or flops >= self.flops_min)
            and (self.flops_max is None or flops <= self.flops_max)
            and (self.params_min is None or params >= self.params_min)
            and (self.params_max is None or params <= self.params_max)
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        bounds = {k: v for k, v in asdict(self).items() if k != "convention" and v is not None}
        parts = [f"{k.replace('_', '-')} {v:g}M" for k, v in bounds.items()]
        return ", ".join(parts) + (f" ({self.convention} FLOPs)" if self.convention != "macs" and parts else "") or "none"

    def check_feasible(self, space: SearchSpace, level: str, num_classes: int,
                       distribution: tuple[int, ...] | None = None) -> None:
        """Raise a UserError when no architecture of the level can meet the limits."""
        low, high = cost_range(space, level, num_classes, distribution, self.convention)
        for name, lo, hi in (("flops", low.flops, high.flops), ("params", low.params, high.params)):
            floor, ceiling = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if floor is not None and ceiling is not None and floor > ceiling:
                raise UserError(f"--{name}-min {floor:g}M is above --{name}-max {ceiling:g}M; swap or widen them")
            if (ceiling is not None and ceiling < lo / 1e6) or (floor is not None and floor > hi / 1e6):
                raise UserError(
                    f"no architecture of {space.name} ({level} level) meets {self}: its {name} range is "
                    f"{lo / 1e6:.3g}M to {hi / 1e6:.3g}M; widen the limits"
                )


def count_within(limits: Limits, space: SearchSpace, level: str, num_classes: int,
                 distribution: tuple[int, ...] | None = None, most_costs: int = 100_000) -> int | None:
    """How many architectures of the level meet `limits`, counted over the distinct (FLOPs, params) sums, as a cost
    is the stem's plus each block's; None when the sums outgrow `most_costs` (a space too large to count)."""
    stem = stem_cost(space, num_classes)
    sums = Counter({(stem.flops, stem.params): 1})
    for allowed in space.block_choices(level, distribution):
        blocks = Counter((c.flops, c.params) for c in (block_cost(space, b, limits.convention) for b in allowed))
        grown: Counter = Counter()
        for (flops, params), n in sums.items():
            for (block_flops, block_params), m in blocks.items():
                grown[flops + block_flops, params + block_params] += n * m
        if len(grown) > most_costs:
            return None
        sums = grown
    return sum(n for (flops, params), n in sums.items() if limits.admits(Cost(flops, params)))


def sample_within(space: SearchSpace, level: str, rng: random.Random, limits: Limits, num_classes: int,
                  distribution: tuple[int, ...] | None = None) -> Architecture:
    """A uniformly random architecture of `level` that meets `limits`."""
    for _ in range(MAX_DRAWS):
        arch = space.sample(level, rng, distribution)
        if limits.admits(limits.cost(space, arch, num_classes)):
            return arch
    raise UserError(f"{MAX_DRAWS} random draws from {space.name} met none of the limits ({limits}); widen them")


def add_flops_convention(parser) -> None:
    """The `--flops-convention` option of the commands that take FLOPs limits."""
    parser.add_argument("--flops-convention", choices=CONVENTIONS, default="macs",
                        help="how the --flops-* limits (and the flops column) count: macs, every multiply-accumulate "
                             "(default), or glit, the authors' formula, in which the paper's limits are given")
