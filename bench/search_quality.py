"""P5: search quality on the micro supernet: evolution against random search, same budget, several seeds.

One high-level micro supernet is trained on digits (kept in OUT/supernet and reused by later
runs). For each seed, both strategies run the search's real pipeline (`glit_ray.search.search`:
the same supernet, evaluators and budget, `population` + (generations - 1) x (mutations +
crossovers) candidates; generation 0 is the same random draw for both). Held-out top-1 is what the
search maximises, so a strategy that scores many near-duplicates could win on it by luck of the
noise; each run's best architecture is therefore also scored on the test split, which no search
sees, with the same supernet weights (BatchNorm recalibrated as in the search).

The default budget, 200 candidates (20 per generation, 10 generations), is 5 % of the micro high
level's 4,096 architectures: a budget at which the strategy matters (at 1,000, a quarter of the
space, random search finds the top by sampling alone).

    python bench/search_quality.py [--seeds 0 1 2 3 4] [--population 20] [--generations 10] [--record]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
from itertools import accumulate
from pathlib import Path

import ray
import torch
from matplotlib.figure import Figure

from glit_ray.arch import Architecture
from glit_ray.data import build_splits
from glit_ray.evaluator import score_on, scoring_sets, scoring_sizes
from glit_ray.imagesets import decode
from glit_ray.report import save
from glit_ray.results import read_candidates
from glit_ray.search import build_parser, search, settings_from_args
from glit_ray.space import SearchSpace
from glit_ray.supernet import load_supernet
from glit_ray.train_supernet import supernet_settings, train_supernet

from harness import BENCHMARKS, publish

STRATEGIES = ("evolution", "random")
FIGURE = BENCHMARKS.parent / "bench" / "figures" / "search_quality.png"


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--population", type=int, default=20, help="and mutations + crossovers per generation")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--supernet-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/search-quality"))
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md and the plot")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False)
    space = SearchSpace.load("glit_micro")
    supernet_dir = args.out / "supernet"
    supernet = train_supernet(supernet_settings(space, "high", None, "digits", args.supernet_epochs, batch_size=64),
                              supernet_dir, resume=(supernet_dir / "run.json").exists())

    net, _ = load_supernet(supernet)
    splits = build_splits("digits", space.img_size, space.in_chans)
    calibration = scoring_sets(splits, *scoring_sizes("digits"), cluster=False)["calibration"]
    test = decode(splits, splits.test, list(range(len(splits.test))))  # the test split in place of the held-out one

    def test_top1(arch: str) -> float:
        sets = {"calibration": calibration, "heldout": test}
        return score_on(net, Architecture.parse(arch), sets, torch.device("cpu"))["top1"]

    results = {s: [] for s in STRATEGIES}  # per seed: best held-out, candidates to reach it, its test top-1, curve
    for seed in args.seeds:
        for strategy in STRATEGIES:
            out = args.out / f"{strategy}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: this measures, it does not resume
            argv = ["--level", "high", "--supernet", str(supernet), "--strategy", strategy, "--seed", str(seed),
                    "--population", str(args.population), "--generations", str(args.generations), "--topk", str(args.topk),
                    "--mutations", str(args.population // 2), "--crossovers", str(args.population - args.population // 2)]
            best = search(settings_from_args(build_parser().parse_args([*argv, "--out", str(out)])), out)
            scores = [r["top1"] for r in read_candidates(out).to_pylist() if r["status"] == "ok"]
            curve = list(accumulate(scores, max))
            results[strategy].append({"seed": seed, "heldout": best["top1"], "test": test_top1(best["arch"]),
                                      "reached": curve.index(best["top1"]) + 1, "curve": curve, "arch": best["arch"]})

    rows = []
    for i, seed in enumerate(args.seeds):
        evo, rnd = results["evolution"][i], results["random"][i]
        rows.append(f"| {seed} | {evo['heldout']:.2f} | {rnd['heldout']:.2f} | {evo['heldout'] - rnd['heldout']:+.2f} "
                    f"| {evo['reached']} | {rnd['reached']} | {evo['test']:.2f} | {rnd['test']:.2f} |")
    column = {s: {k: [r[k] for r in results[s]] for k in ("heldout", "test", "reached")} for s in STRATEGIES}
    diff = [e - r for e, r in zip(column["evolution"]["heldout"], column["random"]["heldout"])]
    wins = sum(d > 0 for d in diff)
    candidates = len(results["evolution"][0]["curve"])
    body = "\n".join([
        f"glit_micro high level on digits, one supernet ({args.supernet_epochs} epochs), {candidates} candidates per "
        f"run ({args.population} per generation, {args.generations} generations), seeds {args.seeds}. Held-out top-1 "
        "is what the search maximises; test top-1 is the best architecture's on the test split, which no search sees.", "",
        "| seed | evolution best held-out % | random best held-out % | difference | evolution: candidates to its best "
        "| random: candidates to its best | evolution best, test % | random best, test % |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows,
        f"| mean ± std | {mean_std(column['evolution']['heldout'])} | {mean_std(column['random']['heldout'])} "
        f"| {mean_std(diff)} | {statistics.fmean(column['evolution']['reached']):.0f} "
        f"| {statistics.fmean(column['random']['reached']):.0f} | {mean_std(column['evolution']['test'])} "
        f"| {mean_std(column['random']['test'])} |", "",
        f"**Evolution's best held-out top-1 is higher in {wins} of {len(diff)} seeds (mean difference "
        f"{mean_std(diff)} points).**", "",
        f"![best so far against candidates evaluated]({FIGURE.relative_to(BENCHMARKS.parent)})",
    ])
    if args.record:
        plot(results, FIGURE)
    publish("P5", body, args.record)
    ray.shutdown()


def plot(results: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for strategy, color in zip(STRATEGIES, ("tab:blue", "tab:orange")):
        curves = [r["curve"] for r in results[strategy]]
        for curve in curves:
            ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.3, linewidth=0.8)
        mean = [statistics.fmean(values) for values in zip(*curves)]
        ax.plot(range(1, len(mean) + 1), mean, color=color, linewidth=2, label=f"{strategy} (mean of {len(curves)} seeds)")
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("best held-out top-1 so far (%)")
    ax.set_title("glit_micro on digits: evolution against random search")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    save(fig, path)


if __name__ == "__main__":
    main()
