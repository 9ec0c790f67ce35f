"""P13: the search's value in trained networks: a search's audit (`glit_ray.audit`), its found architecture side by
side with random architectures of its FLOPs band and the plain transformer, each trained on its own.

On `make demo`'s settings (digits, glit_micro, `python -m glit_ray.search --level high`'s defaults) it runs the
demo's search in a temporary directory (or audits a copy of --run RUN_DIR, a finished search), then audits it
through the command's own code: --sample N of the search's ranking (its top 5 and the quantiles below), --random M
of the winner's FLOPs band, the all-global and all-local networks, each trained --seeds S times for --epochs E.
Prints the verdict, each group's standalone top-1, and the ratio of the found architecture's standalone top-1 to
the random group's mean.

    .venv/bin/python bench/audit_value.py [--run runs/demo/search-high] [--sample 20] [--random 10] [--seeds 3] \
        [--ranking-seeds 1] [--epochs 5] [--batch-size 64] [--cpus-per-worker C] [--keep DIR] [--id P13] [--record]

--keep DIR copies the run into DIR and leaves it there, so that the same command run again after a kill resumes the
audit (a temporary copy is lost with the process).
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import publish  # noqa: E402

from glit_ray import audit  # noqa: E402

from glit_ray import search  # noqa: E402
from glit_ray.core.files import read_json  # noqa: E402
from glit_ray.searching.ranking import networks, seeds_said, verdict_lines  # noqa: E402


def group_rows(rows: list[dict]) -> list[str]:
    """One table row per group: its networks, their standalone top-1 (mean of each network's seeds; the mean and
    spread over networks) and their supernet top-1."""
    lines = ["| group | networks | standalone top-1 %, mean ± sd over networks | one training's sd | "
             "supernet top-1 %, mean |", "| --- | ---: | ---: | ---: | ---: |"]
    for group in dict.fromkeys(r["group"] for r in rows):
        nets = networks([r for r in rows if r["group"] == group])
        means = [statistics.fmean(r["standalone_top1"] for r in runs) for runs in nets.values()]
        seeds_sd = [statistics.stdev(r["standalone_top1"] for r in runs) for runs in nets.values() if len(runs) > 1]
        supernet = [runs[0]["supernet_top1"] for runs in nets.values() if runs[0]["supernet_top1"] is not None]
        lines.append(f"| {group} | {len(nets)} | {statistics.fmean(means):.2f} ± "
                     f"{statistics.stdev(means) if len(means) > 1 else 0:.2f} | "
                     f"{statistics.fmean(seeds_sd) if seeds_sd else float('nan'):.2f} | "
                     f"{statistics.fmean(supernet) if supernet else float('nan'):.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished search to audit (a copy); default: run the demo's search")
    parser.add_argument("--sample", type=int, default=20)
    parser.add_argument("--random", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ranking-seeds", type=int, help="the audit's --ranking-seeds (default: --seeds)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus-per-worker", type=int, help="the audit's (1 on 2 cores: two trainings side by side)")
    parser.add_argument("--keep", type=Path, help="copy the run here and keep it: run again, the audit resumes")
    parser.add_argument("--id", default="P13", help="the BENCHMARKS.md section to record in (P13p: the 224-px trial)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory() as where:
        run_dir = Path(where) / "search-high"
        resumed = (run_dir / audit.FOLDER).is_dir()
        started = time.perf_counter()
        if args.run and run_dir.is_dir() and any(read_json(run_dir / name) != read_json(args.run / name)
                                                 for name in ("run.json", "best.json")):
            sys.exit(f"error: {run_dir} holds a copy of another search than {args.run}; remove it or give another --keep")
        if args.run and not run_dir.is_dir():
            shutil.copytree(args.run, run_dir, ignore=shutil.ignore_patterns(audit.FOLDER, "shortlist*", "report"))
        elif not args.run:
            search.main(["--level", "high", "--out", str(run_dir)])
        searched = time.perf_counter()
        optional = [*(["--ranking-seeds", str(args.ranking_seeds)] if args.ranking_seeds else []),
                    *(["--cpus-per-worker", str(args.cpus_per_worker)] if args.cpus_per_worker else [])]
        audit.main([str(run_dir), "--sample", str(args.sample), "--random", str(args.random), "--seeds",
                    str(args.seeds), *optional, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)])
        audited = time.perf_counter()
        rows = audit.read_table(run_dir / audit.FOLDER / audit.TABLE)
        verdict = read_json(run_dir / audit.FOLDER / audit.RECORD)["verdict"]
        settings = read_json(run_dir / "run.json")["settings"]
        trained = read_json(run_dir / "supernet" / "run.json")["settings"]  # its epochs and sampling, resolved
    winner, randoms = verdict["winner"]["standalone_top1"], verdict["random"]["mean_top1"]
    whose = "The" if args.run else "The demo's"
    body = "\n".join([
        f"{whose} search ({settings['data'].split(':')[0]}, {settings['space']['name']}, "
        f"{settings['level']} level: supernet {trained['epochs']} epochs of {trained.get('sampling', 'uniform')} paths, "
        f"{settings['population']} x {settings['generations']} candidates{', audited from a copy of ' + str(args.run) if args.run else ''}), "
        f"audited: {args.sample} of its ranking, {args.random} random networks within 10 % of the winner's FLOPs, the "
        f"all-global and all-local networks; each trained {seeds_said(args.seeds, args.ranking_seeds)} for "
        f"{args.epochs} epochs of batch {args.batch_size} "
        f"with the small-data recipe and scored on the held-out split ({len(rows)} trainings, "
        f"{(audited - searched) / 60:.1f} min{' for the rest after a kill' if resumed else ''}; "
        f"the search {(searched - started) / 60:.1f} min).", "",
        *group_rows(rows), "",
        *(f"- {line}" for line in verdict_lines(verdict)), "",
        f"**Found architecture / random group's mean, standalone top-1: {winner / randoms:.3f}** "
        f"({winner:.2f} % against {randoms:.2f} %).",
    ])
    publish(args.id, body, args.record)


if __name__ == "__main__":
    main()
