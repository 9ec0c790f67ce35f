"""`python -m glit_ray.train_supernet`: train one level's weight-sharing supernet (SPOS) on Ray Train.

Each step trains as many paths as a block has choices, every choice of every block in one of them (FairNAS's fair
sampling, for the compute of 30 epochs of one path and at least 160 optimizer steps: it orders networks as training
them does better, BENCHMARKS.md P13b and P13bt); or, with `--sampling uniform` (SPOS), one path drawn at random, the default inside
`--flops-max/--params-max` (`glit_ray.training.supernet_loop`, the workers' side). Each epoch checkpoints through Ray Train
(model, optimizer, scheduler, scaler, epoch; the path sampler's state is the step count), logs to
TensorBoard under RUN_DIR/tb and scores fixed probe paths on the held-out split. The run's last line is the verdict on those probes
(`glit_ray.training.verdict`): whether the supernet has learnt, which a search on it requires.

The result is RUN_DIR/supernet.pt, one file `glit_ray.models.supernet.load_supernet` reads.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.placement import Placement
from glit_ray.cluster.resources import cluster_shape, plan
from glit_ray.cluster.storage import check_reachable
from glit_ray.core.cli import ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.core.progress import driver_has_terminal
from glit_ray.core.progress import console as make_console
from glit_ray.models.constraints import Limits, add_flops_convention
from glit_ray.models.space import LEVELS, SearchSpace
from glit_ray.models.supernet import GLiTSupernet, load_supernet, save_supernet
from glit_ray.runs import check_run, open_run, resolve_distribution
from glit_ray.training.data import Splits, build_splits, labels_of, located, training_images
from glit_ray.training.fit import ensure_ray, final_state, fit
from glit_ray.training.flags import (add_arguments, check_epoch_has_a_step, check_ingest, say_recipe,
                                     training_recipe)
from glit_ray.training.imagesets import heldout_indices
from glit_ray.training.loop import TrainJob
from glit_ray.training.recipe import PRESETS, Recipe, choose_preset
from glit_ray.training.settings import SupernetRun
from glit_ray.training.supernet_loop import PROBE_IMAGES, SAMPLING, train_loop
from glit_ray.training.verdict import Verdict, chance_of, of_meta

SUPERNET_FILE = "supernet.pt"
RECIPE_DEFAULTS = {"drop_path": 0.0}  # SPOS trains its supernet's paths without stochastic depth


def settings_from_args(args) -> SupernetRun:
    """Validate the command line into the settings that define a run (stored in run.json)."""
    space = SearchSpace.load(args.space)
    if args.level == "low" and not args.distribution:
        raise UserError("--level low needs --distribution ARCH_STRING or a high-level RUN_DIR (the G per block)")
    if args.level == "high" and args.distribution:
        raise UserError("--distribution applies to --level low only; drop it for the high level")
    distribution = resolve_distribution(args.distribution, space) if args.level == "low" else None
    data = located(args.data)
    return supernet_run(space, args.level, distribution, data, args.epochs, args.batch_size, args.workers,
                        training_recipe(args, data, space, **RECIPE_DEFAULTS),
                        Limits(flops_max=args.flops_max, params_max=args.params_max, convention=args.flops_convention),
                        args.seed, args.sampling or ("uniform" if args.flops_max or args.params_max else "fair"))


def supernet_run(space: SearchSpace, level: str, distribution, data: str, epochs: int = SupernetRun.epochs,
                 batch_size: int = SupernetRun.batch_size, workers: int = SupernetRun.workers,
                 recipe: Recipe | None = None, limits: Limits = SupernetRun.limits, seed: int = SupernetRun.seed,
                 sampling: str = SupernetRun.sampling) -> SupernetRun:
    """The settings of a supernet run; `recipe` None: the preset the training split of `data` calls for
    (`recipe.choose_preset`), with the supernet's own defaults (RECIPE_DEFAULTS)."""
    if recipe is None:
        recipe = replace(PRESETS[choose_preset(training_images(data, space), space.img_size)], **RECIPE_DEFAULTS)
    recipe.check_batch(batch_size)
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
    request = plan("supernet", settings.workers, where.workers.gpus, where.workers.cpus, shape=shape)  # or fits no node
    check_ingest(where.workers.ingest, request, shape)
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
    add_arguments(parser, SupernetRun, **RECIPE_DEFAULTS)
    parser.add_argument("--sampling", choices=SAMPLING,
                        help="a step's paths: fair, one per choice of a block, every choice of every block in one of "
                             "them (FairNAS: that many times a step's compute); uniform, one drawn at random (SPOS) "
                             "(default: fair; uniform under --flops-max or --params-max, which only it keeps)")
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
