"""`python -m glit_ray.train_supernet`: train one level's weight-sharing supernet (SPOS) on Ray Train.

Each step samples one path uniformly (inside `--flops-max/--params-max` when given) and trains only
it; or, with `--sampling fair` (FairNAS), as many paths as a block has choices, every choice of every
block in exactly one of them, their gradients summed into one update (each choice trained equally
often, at that many times a step's compute). The paths are a pure function of the seed and the global step, so every data-parallel worker runs
the same path without talking to the others (DDP would otherwise average gradients of different
subnets), and a resumed run replays the same paths. Each epoch checkpoints through Ray Train
(model, optimizer, scheduler, scaler, epoch; the path sampler's state is the step count), logs to
TensorBoard under RUN_DIR/tb and scores fixed probe paths on the held-out split. The run's last line is the verdict on those probes
(`glit_ray.verdict`): whether the supernet has learnt, which a search on it requires.

The result is RUN_DIR/supernet.pt, one file `glit_ray.supernet.load_supernet` reads.
"""
from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .arch import Architecture
from . import ray_workarounds
from .cli import ArgumentParser, run
from .constraints import Limits, add_flops_convention, sample_within
from .data import Splits, build_splits, labels_of, located
from .errors import UserError
from .progress import console as make_console
from .progress import driver_has_terminal
from .resources import cluster_shape, plan
from .runs import check_run, open_run, resolve_distribution
from .settings import Placement, SupernetRun
from .storage import check_reachable
from .evaluator import score_on, scoring_sets
from .imagesets import heldout_indices, place
from .space import LEVELS, SearchSpace
from .supernet import GLiTSupernet, load_supernet, save_supernet
from .recipe import PRESETS, Recipe, choose_preset
from .train_runs import ensure_ray, final_state, fit
from .training import (RecipeState, TrainJob, prepared, rank_and_world, reporting, set_computation, train_epochs, worker_device, worker_loader)
from .training_flags import (add_arguments, check_counts, check_epoch_has_a_step, check_ingest, say_recipe, training_images, training_recipe)
from .verdict import Verdict, chance_of, of_meta

SUPERNET_FILE = "supernet.pt"
BATCH_SIZE = 32  # per worker
CALIB_BATCHES = 4
PROBE_IMAGES = 2048
PROBE_SHARE = 0.1  # of the training compute, at most, that the probes take (`probe_every`)
RECIPE_DEFAULTS = {"drop_path": 0.0}  # SPOS trains its supernet's paths without stochastic depth


SAMPLING = ("uniform", "fair")


class PathSampler:
    """The paths of each training step, keyed by step: one uniform over the level (inside the limits), or `fair`:
    one per choice of the blocks, each block's choices shuffled across them (FairNAS's strict fairness; a block with
    fewer choices than another fills its extra paths with random ones of its own)."""

    def __init__(self, space: SearchSpace, level: str, distribution, limits: Limits, num_classes: int, seed: int,
                 sampling: str = "uniform"):
        self.space, self.level, self.distribution = space, level, distribution
        self.limits, self.num_classes, self.seed, self.sampling = limits, num_classes, seed, sampling

    def __call__(self, step: int) -> tuple[Architecture, ...]:
        rng = random.Random(f"{self.seed}:{step}")
        if self.sampling == "uniform":
            return (sample_within(self.space, self.level, rng, self.limits, self.num_classes, self.distribution),)
        choices = self.space.block_choices(self.level, self.distribution)
        paths = max(map(len, choices))
        columns = [rng.sample(c, len(c)) + rng.choices(c, k=paths - len(c)) for c in choices]
        return tuple(Architecture(blocks) for blocks in zip(*columns))

    def probes(self) -> dict[str, Architecture]:
        """Fixed paths scored every epoch: the smallest and largest (when inside the limits), three random."""
        choices = self.space.block_choices(self.level, self.distribution)
        cost = lambda b: self.limits.cost(self.space, Architecture((b,)), self.num_classes).flops  # noqa: E731
        extremes = {
            "smallest": Architecture(tuple(min(c, key=cost) for c in choices)),
            "largest": Architecture(tuple(max(c, key=cost) for c in choices)),
        }
        probes = {k: a for k, a in extremes.items() if self.limits.admits(self.limits.cost(self.space, a, self.num_classes))}
        rng = random.Random(f"{self.seed}:probes")
        for i in range(3):
            probes[f"random{i}"] = sample_within(self.space, self.level, rng, self.limits, self.num_classes, self.distribution)
        return probes


def train_loop(config: dict) -> None:
    """One Ray Train worker of `config["job"]` (a `TrainJob` of a `SupernetRun`)."""
    ray_workarounds.quiet_train_worker_log()
    job: TrainJob = config["job"]
    device = worker_device(job)
    settings: SupernetRun = job.settings
    splits = build_splits(settings.data, settings.space.img_size, settings.space.in_chans, settings.recipe)
    sampler = PathSampler(settings.space, settings.level, settings.distribution, settings.limits, splits.num_classes,
                          settings.seed, settings.sampling)

    torch.manual_seed(settings.seed)
    net = GLiTSupernet(settings.space, settings.level, settings.distribution, splits.num_classes,
                       drop_path_rate=settings.recipe.drop_path)
    set_computation(net, job)
    net.to(device)
    loader = worker_loader(splits, job, device)
    recipe = RecipeState.build(net, settings.recipe, settings.lr, settings.epochs, len(loader), device, splits,
                               reporting(job))
    start_epoch = recipe.resume(net, device)
    model = prepared(net, job, device, find_unused_parameters=True)
    probes = probe_sets = None
    if rank_and_world(job)[0] == 0:
        probes = sampler.probes()
        probe_sets = place(scoring_sets(splits, CALIB_BATCHES, PROBE_IMAGES, cluster=False,
                                        workers=job.loader_workers), device)
        every = probe_every(len(probes) * sum(map(len, probe_sets.values())), len(loader) * settings.batch_size)

    def score_probes(epoch: int) -> tuple[dict, str]:
        if (epoch + 1) % every and epoch != settings.epochs - 1:
            return {}, f"probes every {every} epochs"
        top1 = {f"probe_{name}_top1": score_on(net, arch, probe_sets, device)["top1"] for name, arch in probes.items()}
        return top1, f"probe top-1 {min(top1.values()):.1f}-{max(top1.values()):.1f}%"

    train_epochs(job, net, model, recipe, loader, start_epoch, device, score_probes, path_at=sampler)


def probe_every(probe_images: int, epoch_images: int) -> int:
    """Epochs between probe rounds (the last epoch always has one): every epoch unless scoring the probes (one
    forward pass over `probe_images`, calibration and held-out images of every probe) costs more than PROBE_SHARE of
    an epoch's training on the worker (`epoch_images`, a forward and a backward pass: about three forward passes)."""
    return max(1, math.ceil(probe_images / (PROBE_SHARE * 3 * epoch_images)))


def settings_from_args(args) -> SupernetRun:
    """Validate the command line into the settings that define a run (stored in run.json)."""
    space = SearchSpace.load(args.space)
    if args.level == "low" and not args.distribution:
        raise UserError("--level low needs --distribution ARCH_STRING or a high-level RUN_DIR (the G per block)")
    if args.level == "high" and args.distribution:
        raise UserError("--distribution applies to --level low only; drop it for the high level")
    distribution = resolve_distribution(args.distribution, space) if args.level == "low" else None
    data = located(args.data)
    check_counts(args)
    return supernet_run(space, args.level, distribution, data, args.epochs, args.batch_size, args.workers,
                        training_recipe(args, data, space, **RECIPE_DEFAULTS),
                        Limits(flops_max=args.flops_max, params_max=args.params_max, convention=args.flops_convention),
                        args.seed, args.sampling)


def supernet_run(space: SearchSpace, level: str, distribution, data: str, epochs: int = 30,
                 batch_size: int = BATCH_SIZE, workers: int = 1, recipe: Recipe | None = None,
                 limits: Limits = Limits(), seed: int = 0, sampling: str = "uniform") -> SupernetRun:
    """The settings of a supernet run; `recipe` None: the preset the training split of `data` calls for
    (`recipe.choose_preset`), with the supernet's own defaults (RECIPE_DEFAULTS)."""
    if recipe is None:
        recipe = replace(PRESETS[choose_preset(training_images(data, space), space.img_size)], **RECIPE_DEFAULTS)
    recipe.check_batch(batch_size)
    if sampling == "fair" and (limits.flops_max or limits.params_max):
        raise UserError("--sampling fair trains every choice of every block each step, paths over --flops-max or "
                        "--params-max too; drop the limits (the search applies them) or use --sampling uniform")
    return SupernetRun(space=space, data=data, epochs=epochs, batch_size=batch_size, workers=workers, recipe=recipe,
                       seed=seed, level=level, distribution=tuple(distribution) if distribution else None,
                       limits=limits, sampling=sampling)


def train_supernet(settings: SupernetRun, where: Placement, console: Console | None = None,
                   splits: Splits | None = None) -> Path:
    """Train (or resume, or find finished) the supernet of `settings` in run dir `where.out`; return its file.

    `where.storage`: where Ray Train keeps its checkpoints (default: the run dir), a URI when workers do not share it.
    `splits`: `settings.data`'s splits, where the caller built them already (a search: listing ImageNet takes a while)."""
    console = console or make_console()
    out = where.out
    # a bad dataset fails here, before Ray
    if splits is None:
        splits = build_splits(settings.data, settings.space.img_size, settings.space.in_chans)
    check_epoch_has_a_step(len(splits.train), settings.batch_size, settings.workers)
    settings.limits.check_feasible(settings.space, settings.level, splits.num_classes, settings.distribution)
    target = out / SUPERNET_FILE
    if check_run(out, settings, where.resume) and target.exists():  # before Ray: a finished run needs none
        _, meta = load_supernet(target)  # refuse a damaged file rather than report success
        console.print(f"supernet already trained: {target}")
        if verdict := of_meta(meta):
            console.print(verdict.line())
        return target
    ensure_ray(where.address)
    shape = cluster_shape()
    request = plan("supernet", settings.workers, where.gpus_per_worker, where.cpus_per_worker, shape=shape)  # or fits no node
    check_ingest(where.ingest, request, shape)
    check_reachable(where.storage or out, "--storage", shape)
    resumed = open_run(out, settings, where.resume)

    console.print(f"{'resuming' if resumed else 'training'} {settings.level}-level supernet of "
                  f"{settings.space.name} on {settings.data} -> {out}")
    say_recipe(settings, len(splits.train), console.print)
    console.print(str(request))
    job = TrainJob.placed(settings, out, "supernet", driver_has_terminal(), where)
    result = fit(train_loop, job, request, where.storage, say=console.print)
    net = GLiTSupernet(settings.space, settings.level, settings.distribution, splits.num_classes)
    state = final_state(result)
    net.load_state_dict(state["model"])
    probes = {k.removeprefix("probe_").removesuffix("_top1"): v for k, v in state["metrics"].items() if k.startswith("probe_")}
    last_epoch = {k: v for k, v in state["metrics"].items() if not k.startswith("probe_")}
    held_out = probe_heldout(splits)
    verdict = Verdict(probes, chance_of(held_out), len(held_out))
    save_supernet(net, target, data=settings.data, epochs=settings.epochs, seed=settings.seed, limits=settings.limits.as_dict(),
                  probe_top1=probes, probe_chance=verdict.chance, probe_images=verdict.images, last_epoch=last_epoch)
    table = Table(title=f"probe paths, held-out top-1 after epoch {settings.epochs}")
    table.add_column("path")
    table.add_column("top-1 %", justify="right")
    for name, top1 in probes.items():
        table.add_row(name, f"{top1:.1f}")
    console.print(table)
    console.print(f"supernet: {target}")
    console.print(verdict.line())
    return target


def probe_heldout(splits: Splits) -> list[int]:
    """The labels of the held-out images the probes are scored on."""
    labels = labels_of(splits.heldout)
    return [labels[i] for i in heldout_indices(splits, PROBE_IMAGES)]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.train_supernet", description=__doc__.splitlines()[0])
    parser.add_argument("--level", required=True, choices=LEVELS)
    parser.add_argument("--distribution", help="low level: ARCH_STRING or a high-level RUN_DIR")
    add_arguments(parser, epochs=30, batch_size=BATCH_SIZE, **RECIPE_DEFAULTS)
    parser.add_argument("--sampling", choices=SAMPLING, default="uniform",
                        help="a step's paths: uniform, one drawn at random (SPOS); fair, one per choice of a block, "
                             "every choice of every block in one of them (FairNAS: that many times a step's compute)")
    parser.add_argument("--flops-max", type=float, help="train only paths of at most this many M FLOPs (MAC)")
    parser.add_argument("--params-max", type=float, help="train only paths of at most this many M params")
    add_flops_convention(parser)
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray_workarounds.apply()
    train_supernet(settings_from_args(args), Placement.from_args(args))


if __name__ == "__main__":
    run(main)
