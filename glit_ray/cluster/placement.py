"""Where and how a run runs, apart from what defines it: its directory, its cluster, and what each role's processes
ask for (the Ray Train workers, the search's evaluator actors). Free to change between a run and its resume (run.json
holds the run's settings, not this); it travels whole to Ray Train workers, evaluator actors and Tune trials, as
Ray's own `ScalingConfig` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class Workers:
    """What each Ray Train worker asks of the cluster (None: decided by `resources.plan` from the cluster's node
    types), and how it is fed and computes."""
    gpus: float | None = None
    cpus: int | None = None
    loader_workers: int | None = None  # None: `loaders.default_loader_workers` of the CPUs the worker asks for
    ingest: str = "loader"  # "ray-data": training images decoded by Ray Data on the cluster's CPUs (`ingest`)
    grad_checkpointing: bool = False  # recompute block activations in the backward pass: memory for compute
    torchcompile: str | None = None  # the torch.compile backend of the operations (`glit.compile_operations`)


@dataclass(frozen=True)
class Actors:
    """The search's evaluator actors: how many, and the GPUs each asks for (None: `resources.evaluators` decides)."""
    count: int | None = None
    gpus: float | None = None


# each role's fields, by the command-line option that gives it
OPTIONS = {Workers: {"gpus": "gpus_per_worker", "cpus": "cpus_per_worker", "loader_workers": "loader_workers",
                     "ingest": "ingest", "grad_checkpointing": "grad_checkpointing", "torchcompile": "torchcompile"},
           Actors: {"count": "actors", "gpus": "gpus_per_actor"}}


@dataclass(frozen=True)
class Placement:
    """Where a run lives (its directory, its cluster, its storage) and what its Ray Train workers and evaluator
    actors ask for."""
    out: Path  # (a str is taken, and made absolute)
    resume: bool = False
    address: str | None = None
    storage: str | None = None  # where Ray Train keeps checkpoints (default: out), a URI on a cluster
    mirror: str | None = None  # where a search pushes its run directory after every generation
    workers: Workers = field(default_factory=Workers)
    actors: Actors = field(default_factory=Actors)

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out).resolve())  # (frozen) absolute: workers run elsewhere

    @classmethod
    def from_args(cls, args, out: Path | None = None) -> Placement:
        """The placement a command's parsed options give (`out` instead of --out where the command derives it)."""
        def given(names) -> dict:
            return {name: getattr(args, option) for name, option in names.items()
                    if getattr(args, option, None) is not None}
        roles = {"workers": Workers(**given(OPTIONS[Workers])), "actors": Actors(**given(OPTIONS[Actors]))}
        where = given({f.name: f.name for f in fields(cls) if f.name not in ("out", *roles)})
        return cls(out or args.out, **where, **roles)
