"""What defines a training run, apart from where and how it runs (`glit_ray.cluster.placement`): frozen dataclasses
that run.json holds (`glit_ray.runs`) and a resume must repeat. Each kind carries its defaults (the command line
reads them here) and its checks: one built from Python that cannot train is refused when it is built (a ValueError;
one `error:` line from the command line).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from glit_ray.core.cli import described
from glit_ray.core.errors import UserError
from glit_ray.models.constraints import Limits
from glit_ray.models.space import SearchSpace
from glit_ray.training.data import training_images
from glit_ray.training.recipe import Recipe


@dataclass(frozen=True, kw_only=True)
class Training:
    """What a training run trains on, for how long, and its recipe (`glit_ray.training.recipe`)."""
    space: SearchSpace
    data: str = described("digits", "digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH")
    epochs: int
    batch_size: int  # per worker
    workers: int = described(1, "data-parallel Ray Train workers")
    recipe: Recipe
    seed: int = described(0, "seeds the initial weights, the paths and the data order")

    def __post_init__(self):
        for name in ("batch_size", "workers", "epochs"):  # (a supernet's default epochs are counted in steps)
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def lr(self) -> float:
        """The peak learning rate: the recipe's rule applied to this run's global batch."""
        return self.recipe.learning_rate(self.batch_size * self.workers)


UNIFORM_EPOCHS = 30  # a supernet's default compute: 30 epochs of one path a step (SPOS's uniform sampling)
# the optimizer steps a supernet's default epochs give it at the least: on 320 training images (10 steps an epoch) 8
# fair epochs left the probes at chance, 16 learnt (BENCHMARKS.md, P13r)
MIN_STEPS = 160


def paths_per_step(space: SearchSpace, level: str, distribution: tuple[int, ...] | None, sampling: str) -> int:
    """The paths a supernet's step trains: one uniform path, or a fair step's one per choice of its blocks."""
    return 1 if sampling == "uniform" else max(map(len, space.block_choices(level, distribution)))


def steps_per_epoch(data: str, space: SearchSpace, batch_size: int, workers: int) -> int:
    """The optimizer steps of an epoch on `data`'s training split."""
    return max(1, training_images(data, space) // (batch_size * workers))


def default_epochs(space: SearchSpace, level: str, distribution: tuple[int, ...] | None, sampling: str,
                   steps: int) -> int:
    """A supernet's epochs when none are given: the compute of UNIFORM_EPOCHS epochs of one path (a fair step's
    paths each cost a uniform step), rounded up: 8 fair epochs at GLiT's high level (4 paths), 4 at its low (9); and
    at least MIN_STEPS optimizer steps at `steps` an epoch (a fair step is one update of all its paths)."""
    return max(math.ceil(UNIFORM_EPOCHS / paths_per_step(space, level, distribution, sampling)),
               math.ceil(MIN_STEPS / steps))


@dataclass(frozen=True, kw_only=True)
class SupernetRun(Training):
    """A supernet of one level (of one distribution at the low level), trained on paths inside `limits`: by default
    fair paths for the compute of UNIFORM_EPOCHS uniform epochs (fair sampling orders networks as training them
    does better at that compute, BENCHMARKS.md P13b and P13bt)."""
    epochs: int | None = described(None, f"training epochs (default: the compute of {UNIFORM_EPOCHS} epochs of one "
                                         f"path a step: {UNIFORM_EPOCHS} uniform, 8 fair at GLiT's high level, 4 at its "
                                         f"low; and at least {MIN_STEPS} optimizer steps)")
    batch_size: int = described(32, "images per worker and step")
    level: str = "high"
    distribution: tuple[int, ...] | None = None
    limits: Limits = Limits()
    sampling: str = "fair"  # the paths of a step: "fair" (FairNAS's, `PathSampler`) or "uniform" (SPOS's one)

    def __post_init__(self):
        if self.epochs is None and self.batch_size >= 1 and self.workers >= 1:  # (frozen) resolved once: run.json
            steps = steps_per_epoch(self.data, self.space, self.batch_size, self.workers)  # holds the epochs trained
            object.__setattr__(self, "epochs", default_epochs(self.space, self.level, self.distribution, self.sampling,
                                                              steps))
        super().__post_init__()
        if self.sampling == "fair" and (self.limits.flops_max or self.limits.params_max):
            raise UserError("--sampling fair trains every choice of every block each step, paths over --flops-max or "
                            "--params-max too; drop the limits (the search applies them) or use --sampling uniform")

    @property
    def paths(self) -> int:
        """The paths each step trains (`paths_per_step`)."""
        return paths_per_step(self.space, self.level, self.distribution, self.sampling)

    @property
    def path_epochs(self) -> int:
        """Its compute in epochs of one path (P1: a path's step costs what its network's step costs)."""
        return self.epochs * self.paths


@dataclass(frozen=True, kw_only=True)
class RetrainRun(Training):
    """One architecture trained from scratch, or from the weights it inherits from `from_supernet`."""
    epochs: int = described(300, "training epochs")
    batch_size: int = described(128, "images per worker and step")
    arch: str
    from_supernet: str | None = None


@dataclass(frozen=True, kw_only=True)
class ShortlistRun(Training):
    """The `top` distributions of a high-level search, each retrained for the recipe's epochs."""
    epochs: int = described(10, "training epochs of each distribution")
    batch_size: int = described(128, "images per worker and step")
    top: int = described(5, "distributions to retrain (GLiT: 5)")
    scheduler: str | None = described(None, "asha: Tune's ASHA stops weak trials early (default: none, each trains "
                                                "its epochs)")

    def __post_init__(self):
        super().__post_init__()
        if self.top < 1:
            raise UserError("--top must be at least 1")


@dataclass(frozen=True, kw_only=True)
class AuditRun(Training):
    """A search's audit: `sample` architectures of its ranking (its `top` among them), `random` ones within `band`
    of the winner's FLOPs and the baselines, each trained `seeds` times, the ranking's other networks
    `ranking_seeds` times when given (`glit_ray.audit`)."""
    epochs: int = described(5, "training epochs of each network: a few, for a ranking, not a finished network")
    batch_size: int = described(64, "images per worker and step")
    sample: int
    top: int = described(5, "the search's top-K, always in the sample (precision at K)")
    random: int = described(10, "architectures drawn at random inside the run's limits and the winner's FLOPs band")
    band: float = described(0.1, "the FLOPs band: within this share of the winner's")
    seeds: int = described(1, "trainings of each architecture (their spread: its noise)")
    ranking_seeds: int | None = described(None, "trainings of each of the ranking's networks but the winner, where "
                                                "--seeds holds for the winner, the random group and the baselines "
                                                "(default: --seeds); 1: tau over more networks for the same cost")

    @property
    def ranked_seeds(self) -> int:
        """Trainings of each of the ranking's networks but the winner: --ranking-seeds, else --seeds."""
        return self.ranking_seeds or self.seeds

    def __post_init__(self):
        super().__post_init__()
        for name in ("top", "seeds", "ranking_seeds"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.random < 0:
            raise UserError("--random must be 0 or more")
        if not 0 < self.band < 1:
            raise UserError(f"--band {self.band:g} is not a share between 0 and 1 (0.1: within 10 % of the winner's "
                            "FLOPs)")
        if self.sample < 2:
            raise UserError(f"--sample {self.sample} is too few: give at least 2 (the search's best and its last)")
