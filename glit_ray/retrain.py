"""`python -m glit_ray.retrain --arch RUN_DIR|best.json|ARCH --out RUN_DIR`: train a found architecture.

The search ranks architectures by inherited supernet weights; the paper then trains the winner from
scratch with the DeiT recipe, and so does this, with the recipe that fits the data set
(`glit_ray.recipe`; `glit_ray.training`, on Ray Train workers, checkpointed every epoch and
resumable, TensorBoard under RUN_DIR/tb). Held-out top-1 is logged every epoch; the test split,
never seen by the search, is scored once, after the last epoch.

`--from-supernet CKPT` starts from the weights the architecture inherits from a supernet instead
(their held-out top-1 after BatchNorm recalibration is measured first: a check that inheritance
works). The result is RUN_DIR/model.safetensors with RUN_DIR/arch.json (`glit_ray.load_model`
or timm reload it, see `glit_ray.export`) and RUN_DIR/metrics.json.
"""
from __future__ import annotations

from pathlib import Path

import ray
import torch
from rich.console import Console

from .arch import Architecture
from . import ray_workarounds
from .cli import ArgumentParser, run
from .data import build_splits, eval_batches, located
from .errors import UserError
from .evaluator import score_on, scoring_sets, scoring_sizes
from .export import ARCH, WEIGHTS, export_model, load_model
from .files import read_json, write_json
from .model import GLiT
from .progress import console as make_console
from .progress import driver_has_terminal
from .resources import cluster_shape, plan
from .runs import RUN_FILE, check_run, open_run, read_settings
from .scoring import evaluate
from .settings import Placement, RetrainRun, SearchRun
from .storage import check_reachable
from .space import SearchSpace
from .supernet import load_supernet
from .train_runs import ensure_ray, final_state, fit
from .training import (RecipeState, TrainJob, prepared, reporting, set_computation, train_epochs, worker_device, worker_loader)
from .training_flags import (add_arguments, check_counts, check_epoch_has_a_step, check_ingest, say_recipe, training_recipe)

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
    check_counts(args)
    return RetrainRun(space=space, data=data, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers,
                      recipe=training_recipe(args, data, space), seed=args.seed, arch=arch,
                      from_supernet=str(args.from_supernet.resolve()) if args.from_supernet else None)


def inherited_model(settings: RetrainRun, num_classes: int) -> GLiT:
    """The architecture with the weights it inherits from `settings.from_supernet`."""
    path = Path(settings.from_supernet)
    net, _ = load_supernet(path)
    space, arch = settings.space, Architecture.parse(settings.arch)
    if net.space != space:
        raise UserError(f"supernet {path} was trained on space {net.space.name}, not {space.name}; pass the matching --space")
    if net.num_classes != num_classes:
        raise UserError(f"supernet {path} has {net.num_classes} classes but {settings.data} has {num_classes}; "
                        "use a supernet trained on this dataset")
    if net.level == "low" and arch.distribution != net.distribution:
        raise UserError(f"supernet {path} holds distribution {net.distribution}, not this architecture's "
                        f"{arch.distribution}; use the supernet of its high-level search or its own low-level one")
    net.space.validate(arch, net.level)  # a low-level architecture is not in a high-level supernet
    return net.extract(arch)


def train_loop(config: dict) -> None:
    """One Ray Train worker of `config["job"]` (a `TrainJob` of a `RetrainRun`), or the Tune trial that trains it
    alone (`TrainJob.in_trial`)."""
    ray_workarounds.quiet_train_worker_log()
    job: TrainJob = config["job"]
    device = worker_device(job)
    settings: RetrainRun = job.settings
    splits = build_splits(settings.data, settings.space.img_size, settings.space.in_chans, settings.recipe)

    torch.manual_seed(settings.seed)
    net = GLiT(settings.arch, settings.space, splits.num_classes, drop_path_rate=settings.recipe.drop_path)
    if job.initial_weights is not None:
        net.load_state_dict(ray.get(job.initial_weights))
    set_computation(net, job)
    net.to(device)
    loader = worker_loader(splits, job, device)
    recipe = RecipeState.build(net, settings.recipe, settings.lr, settings.epochs, len(loader), device, splits,
                               reporting(job))
    start_epoch = recipe.resume(net, device)
    model = prepared(net, job, device)

    def score_heldout(epoch: int) -> tuple[dict, str]:
        """Held-out top-1/top-5, and the test split's after the last epoch (a shortlist trial never looks at it)."""
        views = {"heldout": splits.heldout}
        if epoch == settings.epochs - 1 and job.score_test:
            views["test"] = splits.test
        metrics = {f"{name}_{k}": v for name, view in views.items() for k, v in
                   evaluate(net, None, eval_batches(splits, view, device, workers=job.loader_workers)).items()}
        line = f"held-out top-1 {metrics['heldout_top1']:.2f}%"
        return metrics, line + (f", test top-1 {metrics['test_top1']:.2f}%" if "test_top1" in metrics else "")

    train_epochs(job, net, model, recipe, loader, start_epoch, device, score_heldout)


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
    request = plan("retrain", settings.workers, where.gpus_per_worker, where.cpus_per_worker, shape=shape)  # or fits no node
    check_ingest(where.ingest, request, shape)
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
    export_model(model.eval(), out, data=settings.data, test_top1=final["test_top1"], test_top5=final["test_top5"])
    write_json(out / METRICS, metrics)
    console.print(f"test top-1 {final['test_top1']:.2f}%, top-5 {final['test_top5']:.2f}%; "
                  f"model: {out / WEIGHTS} + {out / ARCH}")
    return metrics


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="a search RUN_DIR, its best.json, or an architecture string")
    add_arguments(parser, epochs=300, batch_size=128, from_run=True)
    parser.add_argument("--from-supernet", type=Path, help="start from the weights inherited from this supernet.pt")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray_workarounds.apply()
    retrain(settings_from_args(args), Placement.from_args(args))


if __name__ == "__main__":
    run(main)
