"""`python -m glit_ray.report RUN_DIR [RUN_DIR ...]`: plots and a Markdown summary of search runs.

Reads only the runs' Parquet rows, and writes under OUT (default: the first RUN_DIR/report):
evolution.png (best and spread of held-out top-1 per generation, each run overlaid),
pareto.png (top-1 against FLOPs, and against latency when the runs know it, predicted by a latency table or
measured; the Pareto front of each run marked), split.png (the
global/local head split of every block of the first run's top-k) and summary.md. When the first
run has been audited (`glit_ray.audit`), audit.png (supernet against standalone top-1, groups
coloured, the found architecture marked) and the audit's verdict in summary.md.
"""
from __future__ import annotations

import io
import statistics
from itertools import accumulate
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure draws to files with Agg: no pyplot, no display
from matplotlib.ticker import MaxNLocator

from glit_ray.audit import FOLDER as AUDIT, RECORD as AUDIT_RECORD, TABLE as AUDIT_TABLE, read_table
from glit_ray.core.cli import ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.core.files import read_json, write_atomic
from glit_ray.models.arch import Architecture
from glit_ray.runs import RUN_FILE, search_settings
from glit_ray.searching import pareto
from glit_ray.searching.ranking import networks, seeds_said, verdict_lines
from glit_ray.searching.results import best_record, read_candidates

TOPK = 10


def run_summary(rows: list[dict], objective: str = "top1") -> dict:
    """What the plots and summary.md show of one run, computed once from its rows (its best by its `objective`)."""
    ok = [r for r in rows if r["status"] == "ok"]
    timed = [r for r in ok if r["latency_ms"] is not None]
    generations = sorted({r["generation"] for r in ok})
    best = best_record(rows, rows[0]["level"], TOPK, objective=objective)
    return {"candidates": len(rows), "failed": sum(r["status"] == "failed" for r in rows),
            "rejected": sum(r["status"] == "rejected" for r in rows), "generations": len({r["generation"] for r in rows}),
            "ok": ok, "best": best, "topk": best["topk"] if best else [], "front": pareto.front(ok, "flops"),
            "timed": timed, "latency_front": pareto.front(timed, "latency_ms"),
            "latency_sources": sorted({r["latency_source"] or "measured" for r in timed}),
            "scores": {g: [r["top1"] for r in ok if r["generation"] == g] for g in generations},
            "best_so_far": list(accumulate((max(r["top1"] for r in ok if r["generation"] == g) for g in generations),
                                           max))}


def load_runs(run_dirs: list[Path]) -> dict[str, tuple[list[dict], str]]:
    """Each run's candidate rows and its search's objective (by top-1 for candidates without a run.json)."""
    runs = {}
    for run_dir in run_dirs:
        rows = read_candidates(run_dir).to_pylist()
        if not rows:
            raise UserError(f"{run_dir} holds no candidates (no candidates/gen-*.parquet); give a search RUN_DIR")
        objective = search_settings(run_dir).objective if (run_dir / RUN_FILE).is_file() else "top1"
        runs[run_dir.name if run_dir.name not in runs else str(run_dir)] = (rows, objective)
    return runs


def plot_evolution(summaries: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, summary in summaries.items():
        generations, scores = list(summary["scores"]), list(summary["scores"].values())
        line, = ax.plot(generations, [max(s) for s in scores], marker="o", label=f"{name}: best")
        ax.fill_between(generations, [min(s) for s in scores], [max(s) for s in scores], color=line.get_color(),
                        alpha=0.15)
        ax.plot(generations, [statistics.median(s) for s in scores], ls="--", color=line.get_color(),
                label=f"{name}: median")
        ax.plot(generations, summary["best_so_far"], ls=":", lw=2.5, drawstyle="steps-post", color=line.get_color(),
                label=f"{name}: best so far")
    ax.set(xlabel="generation", ylabel="held-out top-1 (%)", title="search progress (band: min to max)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    save(fig, path)


def plot_pareto(summaries: dict[str, dict], path: Path) -> None:
    """Top-1 against FLOPs, and against latency beside it when a run knows its candidates' latency (predicted by a
    table or measured), each run's Pareto front marked."""
    axes = [("flops", "front", 1e6, "MFLOPs (multiply-accumulates)", "FLOPs")]
    if any(summary["timed"] for summary in summaries.values()):
        sources = sorted({source for summary in summaries.values() for source in summary["latency_sources"]})
        axes.append(("latency_ms", "latency_front", 1, f"latency, ms ({' and '.join(sources)})", "latency"))
    fig = Figure(figsize=(7 * len(axes), 4.5))
    for ax, (column, front_key, unit, label, cost) in zip(fig.subplots(1, len(axes), squeeze=False)[0], axes):
        for name, summary in summaries.items():
            ok, front = (summary["ok"], summary["front"]) if column == "flops" else (summary["timed"], summary[front_key])
            points = ax.scatter([r[column] / unit for r in ok], [r["top1"] for r in ok], s=10, alpha=0.4, label=name)
            ax.plot([r[column] / unit for r in front], [r["top1"] for r in front], drawstyle="steps-post", marker="D",
                    color=points.get_facecolor()[0][:3], lw=2, label=f"{name}: Pareto front")
        ax.set(xlabel=label, ylabel="held-out top-1 (%)", title=f"accuracy against {cost}")
        ax.legend(fontsize=8)
    save(fig, path)


def plot_split(topk: list[dict], path: Path) -> None:
    grid = [list(Architecture.parse(r["arch"]).distribution) for r in topk]
    fig = Figure(figsize=(7, 1 + 0.4 * len(grid)))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    middle = max(map(max, grid)) / 2
    for i, genes in enumerate(grid):
        for j, g in enumerate(genes):
            ax.text(j, i, str(g), ha="center", va="center", color="white" if g < middle else "black")
    ax.set(xlabel="block", ylabel="rank", title=f"global heads per block, top-{len(grid)} (rest are local)",
           xticks=range(len(grid[0])), yticks=range(len(grid)), yticklabels=[str(i + 1) for i in range(len(grid))])
    fig.colorbar(image, ax=ax, label="G")
    save(fig, path)


def plot_audit(rows: list[dict], verdict: dict, path: Path) -> None:
    """Each audited network's supernet score, as the search ranked by it (held-out loss or top-1), against its
    standalone top-1 (the mean over its seeds, their range as a bar), coloured by group; the found architecture
    ringed. Better supernet scores lie to the right either way."""
    by_loss = verdict.get("by") == "loss"
    column = "supernet_loss" if by_loss else "supernet_top1"
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    trained = [runs for runs in networks(rows).values() if runs[0].get(column) is not None]
    for group in dict.fromkeys(row["group"] for row in rows):
        nets = [runs for runs in trained if runs[0]["group"] == group]
        if not nets:
            continue
        x = [runs[0][column] for runs in nets]
        scores = [[r["standalone_top1"] for r in runs] for runs in nets]
        y = [statistics.fmean(s) for s in scores]
        ax.errorbar(x, y, yerr=[[m - min(s) for m, s in zip(y, scores)], [max(s) - m for m, s in zip(y, scores)]],
                    fmt="o", ms=5, alpha=0.8, capsize=2, label=f"{group} ({len(nets)})")
    for runs in (runs for runs in trained if runs[0]["winner"]):
        ax.scatter([runs[0][column]], [statistics.fmean(r["standalone_top1"] for r in runs)], s=220,
                   facecolors="none", edgecolors="black", lw=2, label="found architecture", zorder=5)
    if by_loss:
        ax.invert_xaxis()
    tau = verdict.get("kendall_tau")
    ax.set(xlabel="supernet held-out loss (lower: right)" if by_loss else "supernet held-out top-1 (%)",
           ylabel="standalone held-out top-1 (%)",
           title="supernet against training on their own" + (f": Kendall tau {tau:.2f}" if tau is not None else ""))
    ax.legend(fontsize=8)
    save(fig, path)


def save(fig: Figure, path: Path) -> None:
    """Render to PNG and write it atomically."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())


def summary_markdown(summaries: dict[str, dict], audit: dict | None = None) -> str:
    """summary.md: each run's counts, best and top-k, the first run's `audit` (audit.json) when it has one."""
    lines = ["# Search report", ""]
    for name, s in summaries.items():
        best = s["best"]
        lines += [f"## {name}", "",
                  f"{s['candidates']} candidates in {s['generations']} generations, {s['failed']} failed"
                  + (f", {s['rejected']} over the latency limit" if s["rejected"] else "") + ". "
                  f"Pareto front over FLOPs: {len(s['front'])} candidates"
                  + (f", over latency: {len(s['latency_front'])}" if s["timed"] else "") + ".", ""]
        if best:
            timed = best["latency_ms"] is not None
            lines += [f"Best: `{best['arch']}`, top-1 {best['top1']:.2f} %, {best['flops'] / 1e6:.2f} MFLOPs, "
                      f"{best['params'] / 1e6:.3f} M params"
                      + (f", {best['latency_ms']:.3g} ms ({best['latency_source'] or 'measured'})" if timed else "")
                      + f" (generation {best['generation']}, {best['operator']}).", "",
                      "| rank | architecture | top-1 % | MFLOPs | M params |" + (" ms |" if timed else "") + " generation |",
                      "| ---: | --- | ---: | ---: | ---: |" + (" ---: |" if timed else "") + " ---: |"]
            lines += [f"| {i} | `{r['arch']}` | {r['top1']:.2f} | {r['flops'] / 1e6:.2f} | {r['params'] / 1e6:.3f} |"
                      + (f" {r['latency_ms']:.3g} |" if timed else "") + f" {r['generation']} |"
                      for i, r in enumerate(s["topk"], 1)]
            lines.append("")
    lines += ["![evolution](evolution.png)", "", "![pareto](pareto.png)", "", "![split](split.png)", ""]
    if audit:
        lines += ["## Audit", "", f"{audit['verdict']['networks']} networks trained on their own, "
                  f"{seeds_said(audit['seeds'], audit.get('ranking_seeds'))} x {audit['epochs']} epochs each "
                  "(python -m glit_ray.audit):", ""]
        lines += [f"- {line}" for line in verdict_lines(audit["verdict"])]
        lines += ["", "![audit](audit.png)", ""]
    return "\n".join(lines)


def report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the report of `run_dirs` into `out` (default: the first run's report/); returns `out`."""
    summaries = {name: run_summary(*run) for name, run in load_runs([Path(d) for d in run_dirs]).items()}
    out = Path(out or Path(run_dirs[0]) / "report")
    out.mkdir(parents=True, exist_ok=True)
    plot_evolution(summaries, out / "evolution.png")
    plot_pareto(summaries, out / "pareto.png")
    plot_split(next(iter(summaries.values()))["topk"], out / "split.png")
    audited = Path(run_dirs[0]) / AUDIT
    audit = read_json(audited / AUDIT_RECORD) if (audited / AUDIT_RECORD).is_file() else None
    if audit:
        plot_audit(read_table(audited / AUDIT_TABLE), audit["verdict"], out / "audit.png")
    write_atomic(out / "summary.md", summary_markdown(summaries, audit).encode())
    return out


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m glit_ray.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None, help="default: the first RUN_DIR/report")
    args = p.parse_args(argv)
    print(f"report: {report(args.run_dirs, args.out) / 'summary.md'}")


if __name__ == "__main__":
    run(main)
