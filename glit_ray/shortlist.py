"""`python -m glit_ray.shortlist RUN_DIR --top 5 --epochs N`: the paper's shortlist step after a high-level search.

Supernet accuracy ranks distributions only roughly, so GLiT retrains the top few of the high-level
search briefly and keeps the one with the best held-out accuracy; the low-level search then works
inside it (`python -m glit_ray.search --level low --distribution RUN_DIR` takes the shortlist's
winner when there is one). Each candidate is one Ray Tune trial that trains it with retraining's
code and recipe (`glit_ray.training.trials`: side by side, resumable, the test split never scored).
`--scheduler asha` lets Tune's ASHA stop the weak ones early. Killed, the command resumes where
it stopped when run again.

Written into the search's run: RUN_DIR/shortlist.json (every candidate's search and shortlist
top-1, its latency as the search knew it (predicted by its table, or measured), epochs trained, the winner, and the Kendall tau between the two orders: how far the
supernet's ranking held) and RUN_DIR/shortlist/ (Tune's experiment, one retraining directory per
candidate with its checkpoints and TensorBoard).
"""
from __future__ import annotations

import math
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.placement import Placement
from glit_ray.core.cli import add_setting, ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.core.files import read_json, write_json
from glit_ray.core.progress import console as make_console
from glit_ray.runs import check_run, open_run, search_settings
from glit_ray.searching import ranking
from glit_ray.searching.results import ranked_architectures
from glit_ray.training.data import build_splits
from glit_ray.training.fit import ensure_ray
from glit_ray.training.flags import add_arguments, check_epoch_has_a_step, say_recipe, training_recipe
from glit_ray.training.settings import ShortlistRun
from glit_ray.training.trials import METRIC, Standalone, side_by_side, train_standalone

RECORD, FOLDER = "shortlist.json", "shortlist"


def top_candidates(run_dir: Path, top: int) -> list[dict]:
    """The `top` best distinct architectures the search in `run_dir` scored, best first by its objective."""
    return [{"arch": r["arch"], "search_top1": r["top1"], "search_loss": r["loss"], "generation": r["generation"],
             "latency_ms": r["latency_ms"], "latency_source": r["latency_source"]}
            for r in ranked_architectures(run_dir, search_settings(run_dir, "high").objective)[:top]]


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
    placed = side_by_side(FOLDER, settings, len(candidates), where)  # or fits no node: before anything is written
    resumed = open_run(folder, settings, where.resume)
    say_recipe(settings, train_images, console.print)
    trials = [Standalone(f"rank{rank + 1}", c["arch"], settings.seed, f"(search rank {rank + 1})")
              for rank, c in enumerate(candidates)]
    asha = ASHAScheduler(max_t=settings.epochs, grace_period=1) if settings.scheduler == "asha" else None
    results = train_standalone(FOLDER, settings, trials, where, placed, resumed, console.print,
                               f"shortlist of {run_dir}: the top {len(candidates)} distributions, {settings.epochs} "
                               f"epochs each{' (ASHA stops weak ones early)' if asha else ''}", asha)
    for candidate, metrics in zip(candidates, results):
        candidate.update(shortlist_top1=metrics[METRIC], epochs=metrics["epoch"] + 1,
                         stopped_early=metrics["epoch"] + 1 < settings.epochs)
    winner = max(candidates, key=lambda c: c["shortlist_top1"])
    tau = order_agreement(candidates)
    record = {"run": str(run_dir), "epochs": settings.epochs, "scheduler": settings.scheduler, "candidates": candidates,
              "winner": winner, "kendall_tau": tau}
    write_json(run_dir / RECORD, record)
    for i, c in enumerate(candidates):
        console.print(f"{i + 1}. {c['arch']}: search top-1 {c['search_top1']:.2f}%, after {c['epochs']} epoch(s) "
                      f"held-out top-1 {c['shortlist_top1']:.2f}%{' (stopped early)' if c['stopped_early'] else ''}"
                      + (f", {c['latency_ms']:.3g} ms ({c['latency_source']})" if c["latency_ms"] is not None else ""))
    if tau is not None:
        console.print(f"the search's order against the shortlist's: Kendall tau {tau:.2f} over {len(candidates)} "
                      "distributions (1: the same order, -1: reversed)")
    console.print(f"winner: {winner['arch']} ({run_dir / RECORD}); --level low --distribution {run_dir} takes it")
    return record


def order_agreement(candidates: list[dict]) -> float | None:
    """Kendall tau-b between the candidates' search order (best first, by its objective on the supernet) and their
    shortlist top-1 (None: fewer than two candidates, or the shortlist's all ties)."""
    tau = ranking.kendall([-rank for rank in range(len(candidates))], [c["shortlist_top1"] for c in candidates]) \
        if len(candidates) > 1 else math.nan
    return None if math.isnan(tau) else tau


def settings_from_args(args, run_dir: Path) -> ShortlistRun:
    """The training settings of every trial: the search's space and data, retraining's recipe."""
    if args.space or args.data:
        raise UserError("the shortlist trains on the search's own space and data; drop --space and --data")
    search = search_settings(run_dir, "high")
    return ShortlistRun(space=search.space, data=search.data, epochs=args.epochs, batch_size=args.batch_size,
                        workers=args.workers, recipe=training_recipe(args, search.data, search.space), seed=args.seed,
                        top=args.top, scheduler=args.scheduler)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.shortlist", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a high-level search run directory")
    add_setting(parser, "--top", ShortlistRun, type=int)
    add_setting(parser, "--scheduler", ShortlistRun, choices=["asha"])
    add_arguments(parser, ShortlistRun, from_run=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray_workarounds.apply()
    where = Placement.from_args(args, out=args.run_dir)
    shortlist(settings_from_args(args, where.out), where)


if __name__ == "__main__":
    run(main)
