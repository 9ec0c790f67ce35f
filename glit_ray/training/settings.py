"""What defines a training run, apart from where and how it runs (`glit_ray.cluster.placement`): frozen dataclasses
that run.json holds (`glit_ray.runs`) and a resume must repeat.
"""
from __future__ import annotations

from dataclasses import dataclass

from glit_ray.models.constraints import Limits
from glit_ray.models.space import SearchSpace
from glit_ray.training.recipe import Recipe


@dataclass(frozen=True)
class Training:
    """What a training run trains on, for how long, and its recipe (`glit_ray.training.recipe`)."""
    space: SearchSpace
    data: str
    epochs: int
    batch_size: int  # per worker
    workers: int
    recipe: Recipe
    seed: int

    @property
    def lr(self) -> float:
        """The peak learning rate: the recipe's rule applied to this run's global batch."""
        return self.recipe.learning_rate(self.batch_size * self.workers)


@dataclass(frozen=True)
class SupernetRun(Training):
    """A supernet of one level (of one distribution at the low level), trained on paths inside `limits`."""
    level: str
    distribution: tuple[int, ...] | None
    limits: Limits
    sampling: str = "uniform"  # the paths of a step: "uniform" (SPOS's one) or "fair" (FairNAS's, `PathSampler`)


@dataclass(frozen=True)
class RetrainRun(Training):
    """One architecture trained from scratch, or from the weights it inherits from `from_supernet`."""
    arch: str
    from_supernet: str | None


@dataclass(frozen=True)
class ShortlistRun(Training):
    """The `top` distributions of a high-level search, each retrained for the recipe's epochs."""
    top: int
    scheduler: str | None


@dataclass(frozen=True)
class AuditRun(Training):
    """A search's audit: `sample` architectures of its ranking (its `top` among them), `random` ones within `band`
    of the winner's FLOPs and the baselines, each trained `seeds` times (`glit_ray.audit`)."""
    sample: int
    top: int
    random: int
    band: float
    seeds: int
