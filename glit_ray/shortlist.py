"""`python -m glit_ray.shortlist RUN_DIR --top 5 --epochs N`: the paper's shortlist step after a high-level search.

Supernet accuracy ranks distributions only roughly, so GLiT retrains the top few of the high-level
search briefly and keeps the one with the best held-out accuracy; the low-level search then works
inside it (`python -m glit_ray.search --level low --distribution RUN_DIR` takes the shortlist's
winner when there is one). Each candidate is one Ray Tune trial that trains it with retraining's
code and recipe (`glit_ray.retrain.train_loop` on its own Ray Train workers, a GPU each on a
GPU cluster) and hands Tune the held-out top-1 of every epoch; the trials run side by side as far
as the cluster holds them. `--scheduler asha` lets Tune's ASHA stop the weak ones early. The test
split is never scored. Killed, the command resumes where it stopped when run again: Tune restores
its trials (`Tuner.restore`) and each trial resumes from its last epoch's checkpoint.

Written into the search's run: RUN_DIR/shortlist.json (every candidate's search and shortlist
top-1, epochs trained, the winner, and the Kendall tau between the two orders: how far the
supernet's ranking held) and RUN_DIR/shortlist/ (Tune's experiment, one retraining directory per
candidate with its checkpoints and TensorBoard).
"""
from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from . import pareto, ranking
from .cli import ArgumentParser, callers_signal_handlers, run
from .data import build_splits
from .errors import UserError
from .files import read_json, write_json
from .progress import console as make_console
from . import ray_workarounds
from .resources import Request, capacity, check_together, cluster_shape, plan, waiting_note
from .results import read_candidates
from .retrain import train_loop as retrain_loop
from .runs import RUN_FILE, check_run, kind_in, open_run, settings_in
from .settings import Placement, RetrainRun, SearchRun, ShortlistRun, Training
from .training import (TrainJob, add_arguments, check_counts, check_epoch_has_a_step, check_ingest, ensure_ray, fit,
                       say_recipe, training_recipe)

RECORD, FOLDER = "shortlist.json", "shortlist"
METRIC = "heldout_top1"


def search_settings(run_dir: Path) -> SearchRun:
    """The settings of the high-level search run in `run_dir` (its run.json), or a UserError saying it is none."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise UserError(f"{run_dir} is not a glit_ray search run (no run.json); give the RUN_DIR of a high-level search")
    existing = read_json(run_file)
    search = settings_in(existing, "search", run_file) if kind_in(existing) == "search" else None
    if search is None or search.level != "high":
        raise UserError(f"{run_dir} is not a high-level search run; give the RUN_DIR of python -m glit_ray.search --level high")
    return search


def top_candidates(run_dir: Path, top: int) -> list[dict]:
    """The `top` best distinct architectures the search in `run_dir` scored, best first."""
    rows = pareto.by_top1([r for r in read_candidates(run_dir).to_pylist() if r["status"] == "ok"])
    best: dict[str, dict] = {}
    for row in rows:  # best first: each architecture's best row, in that order
        best.setdefault(row["arch"], row)
    chosen = list(best.values())[:top]
    if not chosen:
        raise UserError(f"{run_dir} has no scored candidate yet; let its search finish a generation first")
    return [{"arch": r["arch"], "search_top1": r["top1"], "generation": r["generation"]} for r in chosen]


def shortlist_trial(config: dict) -> None:
    """One Tune trial: train candidate `rank` for the shortlist's epochs, resuming its own checkpoints; each
    epoch's metrics reach Tune through `TuneReportCallback`."""
    rank, settings, where = config["rank"], config["settings"], config["where"]
    candidates = config["candidates"]
    out = where.out / FOLDER / f"rank{rank + 1}"
    out.mkdir(parents=True, exist_ok=True)
    trained = RetrainRun(**{f.name: getattr(settings, f.name) for f in fields(Training)},
                         arch=candidates[rank]["arch"], from_supernet=None)
    job = TrainJob.placed(trained, out, f"shortlist {rank + 1}/{len(candidates)}", progress=False,  # its lines say which
                          where=where, score_test=False)
    storage = f"{where.storage.rstrip('/')}/{FOLDER}/rank{rank + 1}" if where.storage else None
    fit(retrain_loop, job, replace(config["request"], count=settings.workers), storage,
        callbacks=[TuneReportCallback()])


def side_by_side(settings: ShortlistRun, trials: int, where: Placement) -> tuple[int, Request]:
    """How many trials run at once (as many as the cluster can hold; with Ray Data ingest, one trial fewer, whose
    CPUs decode), and the request of their workers together."""
    shape = cluster_shape()
    every = plan("shortlist", trials * settings.workers, where.gpus_per_worker, where.cpus_per_worker, shape=shape,
                 together=False)
    check_together(replace(every, count=settings.workers), shape)  # a trial's workers start together
    held = capacity(every, shape) // settings.workers - (where.ingest == "ray-data")
    at_once = min(trials, max(1, held))
    request = replace(every, count=at_once * settings.workers)
    check_ingest(where.ingest, request, shape)
    return at_once, request


def shortlist(settings: ShortlistRun, where: Placement, console=None) -> dict:
    """Retrain the `settings.top` best distributions of the high-level search in run dir `where.out`; return
    shortlist.json's content."""
    console = console or make_console()
    run_dir = where.out
    candidates = top_candidates(run_dir, settings.top)
    space = settings.space
    train_images = len(build_splits(settings.data, space.img_size, space.in_chans).train)  # fails here, before Ray
    check_epoch_has_a_step(train_images, settings.batch_size, settings.workers)
    folder = run_dir / FOLDER
    if check_run(folder, settings, where.resume) and (run_dir / RECORD).is_file():  # before Ray
        record = read_json(run_dir / RECORD)
        console.print(f"already shortlisted: {record['winner']['arch']} ({run_dir / RECORD})")
        return record
    ensure_ray(where.address)
    at_once, request = side_by_side(settings, len(candidates), where)  # or fits no node
    resumed = open_run(folder, settings, where.resume)
    # the trial itself only waits on its Ray Train workers, which hold the CPUs and GPUs: it asks for no CPU
    # (and a token of memory, as Tune wants a non-empty request), so that the workers of every trial fit
    trainable = tune.with_resources(shortlist_trial, {"cpu": 0, "memory": 2**20})
    asha = ASHAScheduler(max_t=settings.epochs, grace_period=1) if settings.scheduler == "asha" else None
    if resumed and tune.Tuner.can_restore(str(folder / "tune")):
        console.print(f"resuming the shortlist of {run_dir}")
        tuner = tune.Tuner.restore(str(folder / "tune"), trainable, resume_unfinished=True, resume_errored=True)
    else:
        console.print(f"shortlist of {run_dir}: the top {len(candidates)} distributions, {settings.epochs} epochs "
                      f"each, {at_once} at a time{' (ASHA stops weak ones early)' if asha else ''}")
        param_space = {"rank": tune.grid_search(list(range(len(candidates)))), "candidates": candidates,
                       "settings": settings, "where": where, "request": request}
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=asha,
                                                       max_concurrent_trials=at_once),
                           run_config=tune.RunConfig(name="tune", storage_path=str(folder), verbose=0))
    say_recipe(settings, train_images, console.print)
    console.print(str(request))
    with callers_signal_handlers(), waiting_note(request, console.print):
        results = tuner.fit()
    for result in results:
        rank = result.config["rank"]
        metrics = result.metrics or {}
        if result.error is not None or METRIC not in metrics:
            raise UserError(f"shortlist trial for {candidates[rank]['arch']} failed ({result.error}); "
                            f"see {folder / 'tune'}, then run the command again to resume")
        candidates[rank].update(shortlist_top1=metrics[METRIC], epochs=metrics["epoch"] + 1,
                                stopped_early=metrics["epoch"] + 1 < settings.epochs)
    winner = max(candidates, key=lambda c: c["shortlist_top1"])
    tau = order_agreement(candidates)
    record = {"run": str(run_dir), "epochs": settings.epochs, "scheduler": settings.scheduler, "candidates": candidates,
              "winner": winner, "kendall_tau": tau}
    write_json(run_dir / RECORD, record)
    for i, c in enumerate(candidates):
        console.print(f"{i + 1}. {c['arch']}: search top-1 {c['search_top1']:.2f}%, after {c['epochs']} epoch(s) "
                      f"held-out top-1 {c['shortlist_top1']:.2f}%{' (stopped early)' if c['stopped_early'] else ''}")
    if tau is not None:
        console.print(f"the search's order against the shortlist's: Kendall tau {tau:.2f} over {len(candidates)} "
                      "distributions (1: the same order, -1: reversed)")
    console.print(f"winner: {winner['arch']} ({run_dir / RECORD}); --level low --distribution {run_dir} takes it")
    return record


def order_agreement(candidates: list[dict]) -> float | None:
    """Kendall tau-b between the candidates' search (supernet) top-1 and their shortlist top-1 (None: fewer than two
    candidates, or one side all ties)."""
    tau = ranking.kendall([c["search_top1"] for c in candidates], [c["shortlist_top1"] for c in candidates]) \
        if len(candidates) > 1 else math.nan
    return None if math.isnan(tau) else tau


def settings_from_args(args, run_dir: Path) -> ShortlistRun:
    """The training settings of every trial: the search's space and data, retraining's recipe."""
    if args.space or args.data:
        raise UserError("the shortlist trains on the search's own space and data; drop --space and --data")
    search = search_settings(run_dir)
    if args.top < 1:
        raise UserError("--top must be at least 1")
    check_counts(args)
    return ShortlistRun(space=search.space, data=search.data, epochs=args.epochs, batch_size=args.batch_size,
                        workers=args.workers, recipe=training_recipe(args, search.data, search.space), seed=args.seed,
                        top=args.top, scheduler=args.scheduler)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.shortlist", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a high-level search run directory")
    parser.add_argument("--top", type=int, default=5, help="distributions to retrain (GLiT: 5)")
    parser.add_argument("--scheduler", choices=["asha"], help="let Tune's ASHA stop weak trials early")
    add_arguments(parser, epochs=10, batch_size=128, from_run=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray_workarounds.apply()
    where = Placement.from_args(args, out=args.run_dir)
    shortlist(settings_from_args(args, where.out), where)


if __name__ == "__main__":
    run(main)
