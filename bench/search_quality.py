"""P5: search quality: evolution against random search, same budget, several seeds, beside the breeding it replaced.

Three sides, each through the search's real pipeline (`glit_ray.search.search`: the same supernet,
evaluators and budget; generation 0 is the same random draw for all):
- `evolution`: today's breeding, where a child its operator cannot make new is searched for around
  its parents (`Brood.search_around`) and only an exhausted neighbourhood falls back to
  a random architecture;
- `random fill`: the breeding before it, where every such child was a random architecture (the
  same searcher with `search_around` finding nothing);
- `random`: random search.

Two settings (`--setting`):
- `demo`: what `make demo` runs: glit_micro on digits, its supernet (the default: 8 fair epochs), population 50,
  top-k 10, 25 mutations + 25 crossovers a generation, 20 generations (1,000 candidates);
- `pico`: the README's 224-px trial: glit_pico on a synthetic ImageNet-layout folder
  (`glit_ray.synthetic`, written under --out unless --data names one), its supernet (the default),
  population 16, top-k 4, 8 + 8 a generation, 5 generations (80 of the space's 256 distributions),
  scored on 2 calibration batches and 200 held-out images to keep a run at about two minutes.

Held-out top-1 is what the search maximises, so a side that scores many near-duplicates could win on
it by luck of the noise; each run's best architecture is also scored on the test split, which no
search sees, with the same supernet weights (BatchNorm recalibrated as in the search).

    python bench/search_quality.py [--setting demo|pico] [--seeds 0 1 2 3 4] [--generations N] [--fresh] [--record]

Each search runs in OUT/SIDE-seedN; a later invocation reads finished ones back and resumes stopped ones
(`--fresh` runs them all again).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from unittest import mock

import ray
import torch
from matplotlib.figure import Figure

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.placement import Placement
from glit_ray.models.arch import Architecture
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import load_supernet
from glit_ray.report import save
from glit_ray.search import build_parser, search, settings_from_args
from glit_ray.searching.results import read_candidates
from glit_ray.searching.searcher import Brood
from glit_ray.synthetic import write_imagefolder
from glit_ray.train_supernet import supernet_run, train_supernet
from glit_ray.training.data import build_splits
from glit_ray.training.settings import SupernetRun
from glit_ray.training.imagesets import decode, score_on, scoring_sets, scoring_sizes

from harness import BENCHMARKS, publish

SIDES = ("evolution", "random fill", "random")
COLOURS = ("tab:blue", "tab:green", "tab:orange")
STYLES = ("-", "--", "-")  # the old breeding dashed: where it matches today's, today's line shows through


@dataclass(frozen=True)
class Setting:
    space: str
    supernet_epochs: int | None  # None: the supernet's default (fair paths for 30 uniform epochs' compute)
    population: int
    topk: int
    generations: int
    calib_batches: int | None = None  # None: the search's default for the data
    heldout_images: int | None = None
    what: str = ""


SETTINGS = {
    "demo": Setting("glit_micro", None, 50, 10, 20, what="`make demo`'s search: glit_micro high level on digits"),
    "pico": Setting("glit_pico", None, 16, 4, 5, calib_batches=2, heldout_images=200,
                    what="the README's 224-px trial: glit_pico high level on a synthetic 50-class 256-px JPEG folder"),
}


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def run_side(side: str, argv: list[str], out: Path, resume: bool) -> dict:
    """One search of `side`; `random fill` is today's searcher with its neighbourhood search turned off."""
    strategy = "random" if side == "random" else "evolution"
    args = build_parser().parse_args([*argv, "--strategy", strategy, "--out", str(out), *(["--resume"] * resume)])
    settings, where = settings_from_args(args), Placement.from_args(args)
    if side == "random fill":
        with mock.patch.object(Brood, "search_around", lambda *_: False):
            return search(settings, where)
    return search(settings, where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=tuple(SETTINGS), default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--generations", type=int, default=None, help="(default: the setting's)")
    parser.add_argument("--data", help="pico: imagefolder:PATH (default: write a synthetic folder under --out)")
    parser.add_argument("--out", type=Path, default=None, help="(default: runs/bench/search-quality-SETTING)")
    parser.add_argument("--fresh", action="store_true", help="run every search again (default: reuse finished runs)")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md and the plot")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    generations = args.generations or setting.generations
    out_root = args.out or Path(f"runs/bench/search-quality-{args.setting}")
    ray_workarounds.apply()  # as the commands do before Ray starts
    ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False)
    space = SearchSpace.load(setting.space)
    data = "digits"
    if args.setting == "pico":
        folder = out_root / "folder"
        if not args.data and not (folder / "val").is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            write_imagefolder(folder, classes=50, train_per_class=40, val_per_class=10)
        data = args.data or f"imagefolder:{folder}"
    supernet_dir = out_root / "supernet"
    trained = supernet_run(space, "high", None, data, setting.supernet_epochs)
    supernet = train_supernet(trained, Placement(supernet_dir, resume=(supernet_dir / "run.json").exists()))

    net, _ = load_supernet(supernet)
    splits = build_splits(data, space.img_size, space.in_chans)
    argv = ["--level", "high", "--space", setting.space, "--data", data, "--supernet", str(supernet),
            "--population", str(setting.population), "--generations", str(generations), "--topk", str(setting.topk),
            "--mutations", str(setting.population // 2), "--crossovers", str(setting.population - setting.population // 2)]
    if setting.calib_batches:
        argv += ["--calib-batches", str(setting.calib_batches), "--heldout-images", str(setting.heldout_images)]
    calibration = scoring_sets(splits, scoring_sizes(data, setting.calib_batches)[0], 1, cluster=False)["calibration"]
    test = decode(splits, splits.test, list(range(len(splits.test))))  # the test split in place of the held-out one

    def test_top1(arch: str) -> float:
        sets = {"calibration": calibration, "heldout": test}
        return score_on(net, Architecture.parse(arch), sets, torch.device("cpu"))["top1"]

    results = {s: [] for s in SIDES}  # per seed: best held-out, candidates to reach it, its test top-1, curve, fill
    for seed in args.seeds:
        for side in SIDES:
            out = out_root / f"{side.replace(' ', '-')}-seed{seed}"
            if args.fresh:
                shutil.rmtree(out, ignore_errors=True)
            # a run an earlier invocation finished is read back (a search is a function of its seed and scores), one
            # it was stopped in goes on, so that the seeds of a long setting can be measured over several sittings
            best = run_side(side, [*argv, "--seed", str(seed)], out, resume=(out / "run.json").exists())
            rows = read_candidates(out).to_pylist()
            scores = [r["top1"] for r in rows if r["status"] == "ok"]
            bred = [r for r in rows if r["generation"] > 0]
            curve = list(accumulate(scores, max))
            results[side].append({"seed": seed, "heldout": best["top1"], "test": test_top1(best["arch"]),
                                  "reached": curve.index(best["top1"]) + 1, "curve": curve,
                                  "fill": 100 * sum(r["operator"] == "random" for r in bred) / max(1, len(bred))})
            print(f"{args.setting} seed {seed} {side}: best {best['top1']:.2f}% after {results[side][-1]['reached']}, "
                  f"random fill {results[side][-1]['fill']:.0f}%", flush=True)

    candidates = len(results["evolution"][0]["curve"])
    body = report(setting, trained, args.seeds, generations, candidates, results)
    figure = BENCHMARKS.parent / "bench" / "figures" / f"search_quality_{args.setting}.png"
    body += f"\n\n![best so far against candidates evaluated]({figure.relative_to(BENCHMARKS.parent)})"
    if args.record:
        plot(results, figure, f"{setting.space}: evolution against random search ({args.setting} settings)")
    publish(f"P5-{args.setting}", body, args.record)
    ray.shutdown()


def report(setting: Setting, trained: SupernetRun, seeds: list[int], generations: int, candidates: int,
           results: dict) -> str:
    column = {s: {k: [r[k] for r in results[s]] for k in ("heldout", "test", "reached", "fill")} for s in SIDES}
    rows = []
    for i, seed in enumerate(seeds):
        cells = [f"{results[s][i]['heldout']:.2f} ({results[s][i]['reached']})" for s in SIDES]
        rows.append(f"| {seed} | {' | '.join(cells)} | {results['evolution'][i]['fill']:.0f} "
                    f"| {results['random fill'][i]['fill']:.0f} "
                    f"| {' | '.join(format(results[s][i]['test'], '.2f') for s in SIDES)} |")
    mean = " | ".join(f"{mean_std(column[s]['heldout'])} ({statistics.fmean(column[s]['reached']):.0f})" for s in SIDES)
    over = {s: [e - o for e, o in zip(column["evolution"]["heldout"], column[s]["heldout"])] for s in SIDES[1:]}
    wins = {s: sum(d > 0 for d in over[s]) for s in over}
    ties = {s: sum(d == 0 for d in over[s]) for s in over}
    return "\n".join([
        f"{setting.what}, one supernet ({trained.epochs} epochs of {trained.sampling} paths), {candidates} candidates per run "
        f"(population {setting.population}, top-k {setting.topk}, {setting.population // 2} mutations + "
        f"{setting.population - setting.population // 2} crossovers a generation, {generations} generations), seeds "
        f"{seeds}. Each cell: best held-out top-1 % (candidates evaluated to reach it). Random fill: the share of "
        "children after generation 0 that are random architectures. Test top-1: each run's best architecture on the "
        "test split, which no search sees.", "",
        "| seed | evolution | random fill (before) | random search | evolution: random fill % "
        "| before: random fill % | evolution, test % | before, test % | random search, test % |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows,
        f"| mean ± std | {mean} | {statistics.fmean(column['evolution']['fill']):.1f} "
        f"| {statistics.fmean(column['random fill']['fill']):.1f} "
        f"| {' | '.join(mean_std(column[s]['test']) for s in SIDES)} |", "",
        f"**Evolution's best held-out top-1 against random search: higher in {wins['random']}, equal in "
        f"{ties['random']} of {len(seeds)} seeds ({mean_std(over['random'])} points); against the breeding before it "
        f"(random fill): higher in {wins['random fill']}, equal in {ties['random fill']} ({mean_std(over['random fill'])} "
        "points).**",
    ])


def plot(results: dict, path: Path, title: str) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for side, color, style in zip(SIDES, COLOURS, STYLES):
        curves = [r["curve"] for r in results[side]]
        for curve in curves:
            ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.3, linewidth=0.8, linestyle=style)
        mean = [statistics.fmean(values) for values in zip(*curves)]
        ax.plot(range(1, len(mean) + 1), mean, color=color, linewidth=2, linestyle=style,
                label=f"{side} (mean of {len(curves)} seeds)")
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("best held-out top-1 so far (%)")
    ax.set_title(title)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    save(fig, path)


if __name__ == "__main__":
    main()
