"""Run settings: what defines a run apart from where and how it runs, as frozen dataclasses.

A command parses its command line once into a run's settings (`SearchRun`, `SupernetRun`, `RetrainRun`,
`ShortlistRun`, `AuditRun`: what run.json holds and a resume must repeat) and a `Placement` (where the run directory is,
which cluster, what each worker asks of it: free to change between a run and its resume). Both travel whole,
to Ray Train workers, evaluator actors and Tune trials, as Ray's own `ScalingConfig` does. run.json holds
`to_json(settings)`; `from_json` is the one way back, and refuses a key it does not know.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .constraints import Limits
from .errors import UserError
from .recipe import Recipe
from .space import SearchSpace


@dataclass(frozen=True)
class Latency:
    """Latency measured on each evaluator's device: `batch` images per timed pass, candidates over `max_ms`
    rejected."""
    batch: int = 1
    max_ms: float | None = None

    def __post_init__(self):
        if self.max_ms is not None and self.max_ms <= 0:
            raise UserError(f"--latency-max-ms {self.max_ms:g} is not a positive time; give milliseconds above 0")
        if self.batch < 1:
            raise UserError("--latency-batch must be at least 1")


@dataclass(frozen=True)
class Training:
    """What a training run trains on, for how long, and its recipe (`glit_ray.recipe`)."""
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


@dataclass(frozen=True)
class SearchRun:
    """One level's evolutionary search (and the supernet it trains when it is given none). Its defaults are the
    command line's (`search.build_parser` reads them from here); a search that cannot run as given is refused when
    it is built, from the command line (one `error:` line) or from Python (a ValueError)."""
    space: SearchSpace
    level: str
    distribution: tuple[int, ...] | None  # the low level's global heads per block; None at the high level
    data: str
    supernet: str | None  # a trained supernet.pt; None: the search trains one
    limits: Limits
    calib_batches: int  # the scoring sets' sizes: per data set by default (`evaluator.scoring_sizes`)
    heldout_images: int | None
    supernet_recipe: Recipe | None  # the recipe of the supernet the search trains (None: it is given one)
    population: int = 50
    generations: int = 20
    topk: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    strategy: str = "evolution"  # "evolution" | "random" (the baseline: random architectures, the same budget)
    objective: str = "loss"  # "loss" | "top1" | "pareto"
    pareto_cost: str = "flops"  # the candidates' column the Pareto front's cost axis reads
    latency: Latency | None = None
    supernet_epochs: int = 30
    supernet_workers: int = 1
    seed: int = 0
    supernet_sampling: str = "uniform"  # the paths of its supernet's steps (`SupernetRun.sampling`)

    def __post_init__(self):
        if self.level not in ("high", "low"):
            raise UserError(f"level {self.level!r} is not one of high, low")
        if (self.level == "low") != (self.distribution is not None):
            raise UserError("--level low needs --distribution RUN_DIR (a high-level search run) or an ARCH_STRING"
                            if self.level == "low" else
                            "--distribution applies to --level low only; drop it for the high level")
        for name in ("population", "generations", "topk", "calib_batches", "heldout_images", "supernet_epochs",
                     "supernet_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.topk > self.population:
            raise UserError(f"--topk {self.topk} is more than the --population {self.population} that generation 0 "
                            "scores and the first parents come from; lower --topk or raise --population")
        if self.mutations < 0 or self.crossovers < 0:
            raise UserError("--mutations and --crossovers count children: give 0 or more")
        if self.strategy == "evolution" and self.generations > 1 and self.mutations + self.crossovers == 0:
            raise UserError("--mutations 0 and --crossovers 0 breed no child after generation 0; give either, "
                            "or --generations 1")
        if not 0 <= self.mutation_prob <= 1:
            raise UserError(f"--mutation-prob {self.mutation_prob} is not a probability; give a value in 0..1")


def default(settings: type, name: str):
    """The default a settings class gives its field `name`: what the command line's option defaults to."""
    return settings.__dataclass_fields__[name].default


@dataclass(frozen=True)
class Placement:
    """Where and how a run runs: its directory, its cluster, and what each of its workers asks for (None: decided
    by `resources.plan` from the cluster's node types)."""
    out: Path  # (a str is taken, and made absolute)
    resume: bool = False
    address: str | None = None
    storage: str | None = None  # where Ray Train keeps checkpoints (default: out), a URI on a cluster
    mirror: str | None = None  # where a search pushes its run directory after every generation
    gpus_per_worker: float | None = None
    cpus_per_worker: int | None = None
    loader_workers: int | None = None
    ingest: str = "loader"  # "ray-data": training images decoded by Ray Data on the cluster's CPUs (`ingest`)
    grad_checkpointing: bool = False  # recompute block activations in the backward pass: memory for compute
    torchcompile: str | None = None  # the torch.compile backend of the workers' operations (`model.compile_operations`)
    actors: int | None = None
    gpus_per_actor: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out).resolve())  # (frozen) absolute: workers run elsewhere

    @classmethod
    def from_args(cls, args, out: Path | None = None) -> Placement:
        """The placement a command's parsed options give (`out` instead of --out where the command derives it)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**{**given, "out": out or args.out})


KINDS = {"search": SearchRun, "supernet": SupernetRun, "retrain": RetrainRun, "shortlist": ShortlistRun,
         "audit": AuditRun}
# fields stored in JSON as something else: (to JSON, from JSON)
_STORED = {
    "space": (SearchSpace.to_dict, lambda value: SearchSpace.from_dict(value, source="run.json")),
    "limits": (Limits.as_dict, lambda value: Limits(**value)),
    "distribution": (list, tuple),
    "recipe": (asdict, lambda value: Recipe(**value)),
    "supernet_recipe": (asdict, lambda value: Recipe(**value)),
    "latency": (lambda latency: {"batch": latency.batch, "max_ms": latency.max_ms}, lambda value: Latency(**value)),
}


def kind_of(settings) -> str:
    return next(kind for kind, cls in KINDS.items() if type(settings) is cls)


def to_json(settings) -> dict[str, Any]:
    """`settings` as run.json holds them."""
    stored = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        stored[f.name] = _STORED[f.name][0](value) if f.name in _STORED and value is not None else value
    return stored


# fields added since the release before training recipes (2291a49), with what a run file without them meant
# (a supernet trained before fair sampling, a search's included, was sampled uniformly)
ADDED = {"supernet_recipe": None, "sampling": "uniform", "supernet_sampling": "uniform"}


def from_json(kind: str, stored: dict, source: str = "run.json"):
    """The settings of a `kind` run from what run.json holds; a key it does not know or lacks is refused in one line.

    A search's run file from before training recipes reads with ADDED's values (its space and data still serve
    retraining and the shortlist; resuming it is refused as a different run). A training run's from then (an `lr`
    and no `recipe`) trained with a recipe this version cannot repeat, and is refused."""
    cls = KINDS[kind]
    if "recipe" in {f.name for f in fields(cls)} and "lr" in stored and "recipe" not in stored:
        raise UserError(f"{source}: this {kind} run was written before training recipes (it has 'lr' and no "
                        "'recipe'), and this glit_ray cannot resume its training as it was; start the run in a new --out")
    stored = {**{k: v for k, v in ADDED.items() if k in {f.name for f in fields(cls)}}, **stored}
    names = [f.name for f in fields(cls)]
    unknown = [key for key in stored if key not in names]
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} in the {kind} settings (known: {', '.join(names)}); "
                        "fix it or start the run in a new --out")
    missing = [name for name in names if name not in stored]
    if missing:
        raise UserError(f"{source}: the {kind} settings lack {missing[0]!r}; it was written by another glit_ray "
                        "version or edited; start the run in a new --out")
    try:
        return cls(**{name: _STORED[name][1](value) if name in _STORED and value is not None else value
                      for name, value in stored.items()})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: the {kind} settings do not read ({exc}); start the run in a new --out") from None
