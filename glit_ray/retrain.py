"""`python -m glit_ray.retrain --arch RUN_DIR|best.json|ARCH --out RUN_DIR`: train a found architecture.

The search ranks architectures by inherited supernet weights; the paper then trains the winner from
scratch with the DeiT recipe, and so does this, with the recipe that fits the data set
(`glit_ray.training.recipe`; `glit_ray.training.loop`, on Ray Train workers, checkpointed every epoch and
resumable, TensorBoard under RUN_DIR/tb). Held-out top-1 is logged every epoch; the test split,
never seen by the search, is scored once, after the last epoch.

`--from-supernet CKPT` starts from the weights the architecture inherits from a supernet instead
(their held-out top-1 after BatchNorm recalibration is measured first: a check that inheritance
works). The result is RUN_DIR/model.safetensors with RUN_DIR/arch.json (`glit_ray.load_model`
or timm reload it, see `glit_ray.models.export`) and RUN_DIR/metrics.json.
"""
from __future__ import annotations

from pathlib import Path

import ray
import torch
from rich.console import Console

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.placement import Placement
from glit_ray.cluster.resources import cluster_shape, plan
from glit_ray.cluster.storage import check_reachable
from glit_ray.core.cli import ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.core.files import read_json, write_json
from glit_ray.core.progress import driver_has_terminal
from glit_ray.core.progress import console as make_console
from glit_ray.models.arch import Architecture
from glit_ray.models.export import ARCH, WEIGHTS, export_model, load_model
from glit_ray.models.glit import GLiT
from glit_ray.models.space import SearchSpace
from glit_ray.runs import RUN_FILE, check_run, open_run, read_settings
from glit_ray.searching.settings import SearchRun
from glit_ray.training.data import build_splits, located
from glit_ray.training.fit import ensure_ray, final_state, fit
from glit_ray.training.flags import (add_arguments, check_epoch_has_a_step, check_ingest, say_recipe,
                                     training_recipe)
from glit_ray.training.imagesets import score_on, scoring_sets, scoring_sizes
from glit_ray.training.loop import TrainJob
from glit_ray.training.retrain_loop import inherited_model, train_loop
from glit_ray.training.settings import RetrainRun

METRICS = "metrics.json"


def resolve_arch(value: str) -> tuple[str, SearchRun | None]:
    """The architecture `--arch` names (a search RUN_DIR, its best.json, or a string) and that search's settings."""
    path = Path(value)
    if path.is_dir():
        path = path / "best.json"
        if not path.is_file():
            raise UserError(f"--arch {value}: not a search run (no best.json); give a search RUN_DIR, its best.json "
                            "or an architecture string")
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"--arch {path} does not exist; give a search RUN_DIR, its best.json or an architecture string")
        record = read_json(path)
        if not isinstance(record, dict) or "arch" not in record:
            raise UserError(f"--arch {path} is not a search's best.json (no 'arch'); give the search's RUN_DIR")
        run_file = path.parent / RUN_FILE
        return record["arch"], read_settings(run_file, "search") if run_file.is_file() else None
    return str(Architecture.parse(value)), None


def settings_from_args(args) -> RetrainRun:
    """Validate the command line into the settings that define a retraining run (stored in run.json)."""
    arch, search = resolve_arch(args.arch)
    space = SearchSpace.load(args.space) if args.space else search.space if search else SearchSpace.load("glit_micro")
    space.validate(Architecture.parse(arch))
    data = located(args.data or (search.data if search else "digits"))
    return RetrainRun(space=space, data=data, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers,
                      recipe=training_recipe(args, data, space), seed=args.seed, arch=arch,
                      from_supernet=str(args.from_supernet.resolve()) if args.from_supernet else None)


def retrain(settings: RetrainRun, where: Placement, console: Console | None = None) -> dict:
    """Train (or resume, or find finished) the architecture of `settings` in run dir `where.out`; return metrics.json.

    `where.storage`: where Ray Train keeps its checkpoints (default: the run dir), a URI when workers do not share it."""
    console = console or make_console()
    out = where.out
    space = settings.space
    splits = build_splits(settings.data, space.img_size, space.in_chans)  # a bad dataset fails here, before Ray
    check_epoch_has_a_step(len(splits.train), settings.batch_size, settings.workers)
    inherited = inherited_model(settings, splits.num_classes) if settings.from_supernet else None
    if check_run(out, settings, where.resume) and (out / METRICS).exists():  # before Ray: a finished run needs none
        load_model(out)  # refuse a damaged export rather than report success
        console.print(f"already retrained: {out / WEIGHTS}")
        return read_json(out / METRICS)
    ensure_ray(where.address)
    shape = cluster_shape()
    request = plan("retrain", settings.workers, where.workers.gpus, where.workers.cpus, shape=shape)  # or fits no node
    check_ingest(where.workers.ingest, request, shape)
    check_reachable(where.storage or out, "--storage", shape)
    resumed = open_run(out, settings, where.resume)

    initial = {}
    if inherited is not None:
        sets = scoring_sets(splits, *scoring_sizes(settings.data))
        scores = score_on(inherited, None, sets, torch.device("cpu"))  # as the search scores the path
        initial = {f"inherited_heldout_{k}": v for k, v in scores.items()}
        console.print(f"inherited weights from {settings.from_supernet}: held-out top-1 "
                      f"{initial['inherited_heldout_top1']:.2f}% before any training")
    console.print(f"{'resuming' if resumed else 'retraining'} {settings.arch} ({space.name}) on {settings.data} "
                  f"for {settings.epochs} epochs -> {out}")
    say_recipe(settings, len(splits.train), console.print)
    console.print(str(request))
    job = TrainJob.placed(settings, out, "retrain", driver_has_terminal(), where,
                          initial_weights=ray.put(inherited.state_dict()) if inherited is not None else None)
    result = fit(train_loop, job, request, where.storage, say=console.print)

    model = GLiT(settings.arch, space, splits.num_classes)
    state = final_state(result)
    model.load_state_dict(state["model"])
    final = {k: v for k, v in state["metrics"].items() if k.startswith(("test_", "heldout_"))}
    metrics = {"arch": settings.arch, "data": settings.data, "epochs": settings.epochs,
               "from_supernet": settings.from_supernet, **initial, **final}
    export_model(model.eval(), out, mean=splits.mean, std=splits.std,
                 interpolation="bicubic" if splits.natural_images else "bilinear",
                 data=settings.data, test_top1=final["test_top1"], test_top5=final["test_top5"])
    write_json(out / METRICS, metrics)
    console.print(f"test top-1 {final['test_top1']:.2f}%, top-5 {final['test_top5']:.2f}%; "
                  f"model: {out / WEIGHTS} + {out / ARCH}")
    return metrics


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="a search RUN_DIR, its best.json, or an architecture string")
    add_arguments(parser, RetrainRun, from_run=True)
    parser.add_argument("--from-supernet", type=Path, help="start from the weights inherited from this supernet.pt")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray_workarounds.apply()
    retrain(settings_from_args(args), Placement.from_args(args))


if __name__ == "__main__":
    run(main)
