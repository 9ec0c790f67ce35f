"""Where and how a run runs, apart from what defines it: its directory, its cluster, what each of its workers and
actors asks for. Free to change between a run and its resume (run.json holds the run's settings, not this); it
travels whole to Ray Train workers, evaluator actors and Tune trials, as Ray's own `ScalingConfig` does.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path


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
