"""P13 levers: what raises the supernet's agreement with training on their own, measured against one audit.

The ground truth is a finished audit of `make demo`'s search (`python -m glit_ray.audit RUN --seeds 3`): its
networks' standalone top-1, each the mean of its seeds, do not depend on the supernet. Each lever is a supernet
(trained by the demo's search itself, `--supernet-epochs E --supernet-sampling S`) or a way of
scoring or ranking with one. For each the bench:

- scores the audit's networks of the search's ranking and the random ones (not the two baselines, far from the
  others) with the lever's supernet exactly as a search scores, and sets that order beside the standalone one:
  Kendall tau-b with its 95 % interval, tau within the lever's own top fifth, and by held-out loss;
- runs the demo's search with it (`python -m glit_ray.search --level high ...`) and trains its
  found architecture `--seeds` times with the audit's recipe (unless the audit trained it already), placing it among
  the audit's random networks of the demo winner's FLOPs band.

Levers: `today` (the audited search's supernet: for P13b the demo's of then, uniform paths, 30 epochs; the audit's own
search), `loss` (the same supernet,
searched with `--objective loss`: parents and the find by held-out loss instead of top-1), `calib16` (16 calibration batches instead of 4),
`epochs60` / `epochs120` (uniform paths, longer), `fair` (FairNAS: every choice of every block each step, 30 epochs,
4x the compute of a step), `fair8` (fair for 8 epochs: about the uniform supernet's compute, today's default).

    .venv/bin/python -m glit_ray.search --level high --objective top1 --out runs/bench-levers/demo   # (make bench)
    .venv/bin/python -m glit_ray.audit runs/bench-levers/demo --seeds 3
    .venv/bin/python bench/audit_levers.py --run runs/bench-levers/demo [--levers today,loss,...] [--record]

Any audited high-level search serves (`--run`): a lever's search repeats the audited search's own space, data,
evolution and calibration flags and changes only the lever; `--id` names the BENCHMARKS.md section (P13bt: the README's
224-px trial, audited by P13t).

(The figures in BENCHMARKS.md were measured on `runs/demo/search-high`, the same search made by `make demo` before
the search ranked by held-out loss by default.)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import publish  # noqa: E402

from glit_ray import audit  # noqa: E402

from glit_ray.cluster import ray_workarounds  # noqa: E402

from glit_ray import search  # noqa: E402

from glit_ray import train_supernet  # noqa: E402
from glit_ray.cluster.placement import Placement  # noqa: E402
from glit_ray.core.files import read_json, write_json  # noqa: E402
from glit_ray.core.progress import console as make_console  # noqa: E402
from glit_ray.runs import search_settings  # noqa: E402
from glit_ray.runs import from_json  # noqa: E402
from glit_ray.searching.ranking import agreement, defined, kendall, networks, seeds_said  # noqa: E402
from glit_ray.searching.results import ranked_architectures  # noqa: E402
from glit_ray.searching.settings import SearchRun  # noqa: E402
from glit_ray.training.data import build_splits  # noqa: E402
from glit_ray.training.fit import ensure_ray  # noqa: E402
from glit_ray.training.settings import paths_per_step  # noqa: E402
from glit_ray.training.trials import Standalone, side_by_side, train_standalone  # noqa: E402


@dataclass(frozen=True)
class Lever:
    about: str
    epochs: int | None = None  # a supernet trained here (None: the audited search's)
    sampling: str = "uniform"
    calib_batches: int | None = None  # None: the search's
    objective: str = "top1"  # the search's --objective
    supernet_of: str | None = None  # the lever whose supernet it searches (None: its own, or the audited search's)


LEVERS = {
    "today": Lever("the audited search's supernet (its sampling and epochs), ranked by top-1"),
    "loss": Lever("the same supernet, the search ranking by held-out loss (`--objective loss`)", objective="loss"),
    "calib16": Lever("the same supernet, 16 calibration batches", calib_batches=16),
    "epochs60": Lever("uniform paths, 60 epochs", epochs=60),
    "epochs120": Lever("uniform paths, 120 epochs", epochs=120),
    "fair": Lever("fair paths (FairNAS), 30 epochs", epochs=30, sampling="fair"),
    "fair8": Lever("fair paths (FairNAS), 8 epochs", epochs=8, sampling="fair"),
    "epochs60-loss": Lever("epochs60's supernet, ranked by held-out loss", objective="loss", supernet_of="epochs60"),
    "fair8-loss": Lever("fair8's supernet, ranked by held-out loss", objective="loss", supernet_of="fair8"),
    "fair-loss": Lever("fair's supernet, ranked by held-out loss", objective="loss", supernet_of="fair"),
}


def search_flags(run: SearchRun) -> list[str]:
    """The audited search's own space, data, evolution and calibration flags: a lever's search differs from it only
    in the lever (a built-in space by its name)."""
    return ["--space", run.space.name, "--data", run.data, "--population", str(run.population), "--generations",
            str(run.generations), "--topk", str(run.topk), "--mutations", str(run.mutations), "--crossovers",
            str(run.crossovers), *(["--calib-batches", str(run.calib_batches)] if run.calib_batches else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo/search-high"),
                        help="an audited high-level search (RUN/audit/audit.parquet); default: the demo's")
    parser.add_argument("--levers", default="today,loss,calib16,epochs60,fair8,fair,epochs60-loss,fair8-loss,fair-loss")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-levers"),
                        help="the levers' supernets, searches and trainings (kept: a rerun reuses what is there)")
    parser.add_argument("--id", default="P13b", help="the BENCHMARKS.md section to record in")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    ray_workarounds.apply()  # as the commands do: Ray's lines stay in its logs
    console = make_console()
    run_dir, work = args.run.resolve(), args.work.resolve()
    truth_rows = audit.read_table(run_dir / audit.FOLDER / audit.TABLE)
    audited = from_json("audit", read_json(run_dir / audit.FOLDER / "run.json")["settings"])
    truth = {arch: statistics.fmean(r["standalone_top1"] for r in runs) for arch, runs in networks(truth_rows).items()}
    groups = {r["arch"]: r["group"] for r in truth_rows}
    compared = [a for a in truth if groups[a] in ("top", "quantile", "random")]
    randoms = [truth[a] for a in truth if groups[a] == "random"]
    audited_search = search_settings(run_dir)
    splits = build_splits(audited_search.data, audited_search.space.img_size, audited_search.space.in_chans)
    flags = search_flags(audited_search)

    results: dict[str, dict] = {}
    for name in args.levers.split(","):
        lever = LEVERS[name]
        supernet, searched = run_dir / "supernet" / "supernet.pt", run_dir
        if lever.supernet_of:
            supernet = work / lever.supernet_of / "search-high" / "supernet" / train_supernet.SUPERNET_FILE
        if lever.epochs:  # the audited search, training its own supernet with the lever
            searched = work / name / "search-high"
            supernet = searched / "supernet" / train_supernet.SUPERNET_FILE
            search.main(["--level", "high", *flags, "--supernet-epochs", str(lever.epochs), "--supernet-sampling",
                         lever.sampling, "--objective", lever.objective, "--search-unlearnt",
                         "--out", str(searched)])  # again: finds it done
        elif lever.calib_batches or lever.objective != "top1":  # the audited search on a supernet, otherwise
            searched = work / name / "search-high"
            search.main(["--level", "high", *flags, "--supernet", str(supernet), "--calib-batches",
                         str(lever.calib_batches or audited_search.calib_batches), "--objective", lever.objective,
                         "--out", str(searched)])
        ensure_ray(None)
        scores = audit.supernet_scores(search_settings(searched), supernet, splits, compared, Placement(work / name))
        key = (lambda a: -scores[a]["loss"]) if lever.objective == "loss" else (lambda a: scores[a]["top1"])
        figures = agreement([key(a) for a in compared], [truth[a] for a in compared], k=5)
        figures["loss_kendall_tau"] = defined(kendall([-scores[a]["loss"] for a in compared],
                                                       [truth[a] for a in compared]))
        trained = LEVERS[lever.supernet_of] if lever.supernet_of else lever
        steps = (trained.epochs * paths_per_step(audited_search.space, "high", None, trained.sampling) if trained.epochs
                 else audited_search.supernet_path_epochs)
        verdict = read_json(searched / "best.json")["supernet"]
        results[name] = {"figures": figures, "winner": ranked_architectures(searched, lever.objective)[0], "path_epochs": steps,
                         "probes": verdict["median"], "learnt": verdict["learnt"]}
        console.print(f"{name}: tau {figures['kendall_tau']:.2f}, winner {results[name]['winner']['arch']}")

    # the found architectures the audit did not train, trained as its networks were (its recipe, seeds, epochs)
    # (kept in WORK/finds.json: a rerun with more levers trains only their new finds)
    finds = read_json(work / "finds.json") if (work / "finds.json").is_file() else {}
    new = sorted({r["winner"]["arch"] for r in results.values()} - set(truth) - set(finds))
    if new:
        trials = [Standalone(f"w{j:02d}s{s}", arch, audited.seed + s, "(a lever's find)")
                  for j, arch in enumerate(new) for s in range(audited.seeds)]
        where, folder = Placement(work), f"finds-{len(finds) + len(new)}"
        placed = side_by_side(folder, audited, len(trials), where)
        scored = train_standalone(folder, audited, trials, where, placed, (work / folder).exists(), console.print,
                                  f"{len(new)} found architecture(s) x {audited.seeds} seeds", epoch_lines=False)
        for arch in new:
            finds[arch] = [m["heldout_top1"] for t, m in zip(trials, scored) if t.arch == arch]
        write_json(work / "finds.json", finds)
    truth.update({arch: statistics.fmean(seeds) for arch, seeds in finds.items()})

    band = [r["flops"] for r in truth_rows if r["group"] == "random"]
    lines = [f"Ground truth: the audit of {args.run} ({len(truth)} networks incl. the finds, "
             f"{seeds_said(audited.seeds, audited.ranking_seeds)} x {audited.epochs} epochs each, the levers' finds "
             f"{audited.seeds}; its random group: {len(randoms)} networks of {min(band) / 1e6:.2f}-"
             f"{max(band) / 1e6:.2f} M FLOPs, standalone mean {statistics.fmean(randoms):.2f} %). Tau over the "
             f"{len(compared)} networks of the search's ranking and the random group, scored by each lever.", "",
             "| lever | what | supernet compute, path-epochs | probe median % | tau (95 %) | by loss | tau, lever's top fifth | found "
             "architecture | its FLOPs M | standalone top-1 % | percentile among random |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        f, w = r["figures"], r["winner"]
        top1 = truth[w["arch"]]
        pct = 100 * (sum(v < top1 for v in randoms) + 0.5 * sum(v == top1 for v in randoms)) / len(randoms)
        lo, hi = f["kendall_tau_95"]
        lines.append(f"| {name} | {LEVERS[name].about} | {r['path_epochs']} | {r['probes']:.1f}{'' if r['learnt'] else ' (NOT learnt)'} | {f['kendall_tau']:.2f} ({lo:.2f} to "
                     f"{hi:.2f}) | {f['loss_kendall_tau']:.2f} | {f['top_kendall_tau']:.2f} | `{w['arch']}` | "
                     f"{w['flops'] / 1e6:.2f} | {top1:.2f} | {pct:.0f} |")
    base = results.get("today")
    if base:
        lines.append("")
        for name, r in results.items():
            if name != "today" and not math.isnan(r["figures"]["kendall_tau"] or math.nan):
                lines.append(f"- {name} / today, tau: {r['figures']['kendall_tau']:.2f} against "
                             f"{base['figures']['kendall_tau']:.2f}; found architecture's standalone top-1 "
                             f"{truth[r['winner']['arch']]:.2f} against {truth[base['winner']['arch']]:.2f} % "
                             f"(ratio **{truth[r['winner']['arch']] / truth[base['winner']['arch']]:.3f}**)")
    publish(args.id, "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
