"""Search results: one Parquet file per generation, TensorBoard curves, best.json.

A Tune callback on the driver writes each finished generation as
`RUN_DIR/candidates/gen-NNNN.parquet`, renamed into place, so a kill never leaves a partial file
and a generation re-run after a resume replaces its own file instead of adding rows.
"""
from __future__ import annotations

import io
import statistics
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune
from torch.utils.tensorboard import SummaryWriter

from glit_ray.core.errors import UserError
from glit_ray.core.files import write_atomic, write_json
from glit_ray.searching import pareto

SCHEMA = pa.schema([
    ("arch", pa.string()), ("level", pa.string()), ("generation", pa.int32()), ("candidate", pa.int32()),
    ("parents", pa.list_(pa.string())), ("operator", pa.string()),
    ("top1", pa.float64()), ("top5", pa.float64()), ("loss", pa.float64()),
    ("flops", pa.int64()), ("flops_convention", pa.string()), ("params", pa.int64()), ("latency_ms", pa.float64()),
    ("latency_source", pa.string()),  # "table" (predicted on the target device) or "measured" (on the evaluator)
    ("eval_seconds", pa.float64()),
    ("actor", pa.int32()), ("node", pa.string()), ("device", pa.string()), ("trial_id", pa.string()), ("timestamp", pa.timestamp("ms", tz="UTC")),
    ("status", pa.string()), ("error", pa.string()),
])


def generation_file(run_dir: Path, generation: int) -> Path:
    return Path(run_dir) / "candidates" / f"gen-{generation:04d}.parquet"


def write_generation(run_dir: Path, generation: int, rows: list[dict]) -> Path:
    """Write one generation's rows atomically; returns the file."""
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    path = generation_file(run_dir, generation)
    write_atomic(path, buffer.getvalue())
    return path


def generation_rows(rows: list[dict], level: str, trial_id: str | None) -> list[dict]:
    """A generation's rows as the Parquet file holds them: a trial's rows with level, position and trial."""
    def stamp(seconds):
        return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)

    return [{**row, "level": level, "candidate": i, "trial_id": trial_id, "timestamp": stamp(row.get("timestamp"))}
            for i, row in enumerate(rows)]


def read_generation(path: Path) -> pa.Table:
    """One generation file; a damaged one is a UserError naming it."""
    try:
        return pq.read_table(path, schema=SCHEMA)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable generation file ({reason}); run the search's command again with "
                        "--resume to rebuild it from Tune's snapshot of the searcher") from None


def generation_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "candidates").glob("gen-*.parquet"))


def read_candidates(run_dir: Path) -> pa.Table:
    """Every candidate row of a search run, in generation order."""
    files = generation_files(run_dir)
    return pa.concat_tables([read_generation(f) for f in files]) if files else SCHEMA.empty_table()


def ranked_architectures(run_dir: Path, objective: str = "top1") -> list[dict]:
    """Each distinct architecture the search in `run_dir` scored, as its best row, best first by the search's
    `objective` (`pareto.best_first`: best.json's order); a UserError when it has scored none."""
    best: dict[str, dict] = {}
    for row in pareto.best_first([r for r in read_candidates(run_dir).to_pylist() if r["status"] == "ok"], objective):
        best.setdefault(row["arch"], row)
    if not best:
        raise UserError(f"{run_dir} has no scored candidate yet (no finished generation); let its search finish a "
                        "generation first")
    return list(best.values())


def repair_generations(run_dir: Path, scored: list[dict], level: str) -> list[str]:
    """Rebuild each unreadable generation file from `scored`, the rows of Tune's snapshot of the searcher;
    one the snapshot does not hold yet is set aside as NAME.corrupt (Tune runs that generation again).
    Returns a line per file mended."""
    lines = []
    for path in generation_files(run_dir):
        try:
            read_generation(path)
            continue
        except UserError:
            pass
        generation = int(path.stem.removeprefix("gen-"))
        rows = [r for r in scored if r["generation"] == generation]
        if rows:
            write_generation(run_dir, generation, generation_rows(rows, level, None))
            lines.append(f"rebuilt the unreadable {path} from Tune's snapshot of the searcher ({len(rows)} rows)")
        else:
            path.replace(path.with_name(path.name + ".corrupt"))
            lines.append(f"set the unreadable {path} aside as {path.name}.corrupt; its generation runs again")
    return lines


def best_record(rows: list[dict], level: str, topk: int, cost: str = "flops", objective: str = "top1") -> dict | None:
    """best.json's content: the best scored candidate (every candidate meets the limits), the top-k
    by the search's `objective` (`pareto.best_first`), and the Pareto front over (top-1, `cost`)."""
    ok = pareto.best_first([r for r in rows if r["status"] == "ok"], objective)
    if not ok:
        return None
    keep = ("arch", "generation", "operator", "top1", "top5", "loss", "flops", "params", "latency_ms", "latency_source")

    def record(r):
        return {k: r.get(k) for k in keep}

    return {"level": level, **record(ok[0]), "topk": [record(r) for r in ok[:topk]],
            "front_cost": cost, "front": [record(r) for r in pareto.front(ok, cost)]}


class ResultsCallback(tune.Callback):
    """Persists each finished generation: Parquet rows, TensorBoard scalars and HParams, best.json."""

    def __init__(self, run_dir: Path, level: str, topk: int, generations: int, cost: str = "flops",
                 about: dict | None = None, objective: str = "top1"):
        """`about`: what best.json says beside the candidates (the supernet's verdict)."""
        self.run_dir, self.level, self.topk, self.generations, self.cost = Path(run_dir), level, topk, generations, cost
        self.objective = objective
        self.about = about or {}
        self.writer = None
        self.rows: dict[int, list[dict]] | None = None  # generation -> its rows; read from disk once (a resume)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if "rows" not in result:
            return
        generation = result["generation"]
        rows = generation_rows(result["rows"], self.level, trial.trial_id)
        write_generation(self.run_dir, generation, rows)
        if self.rows is None:
            self.rows = {}
            for row in read_candidates(self.run_dir).to_pylist():
                self.rows.setdefault(row["generation"], []).append(row)
        self.rows[generation] = rows  # a generation re-run after a resume replaces its rows, as its file
        best = best_record([r for g in sorted(self.rows) for r in self.rows[g]], self.level, self.topk, self.cost,
                           self.objective)
        if best:
            best.update(self.about)
            write_json(self.run_dir / "best.json", best)
        scores = [r["top1"] for r in rows if r["status"] == "ok"]
        failed, rejected = (sum(r["status"] == status for r in rows) for status in ("failed", "rejected"))
        self.log(generation, rows, scores, failed, rejected, trial.config.get("draws", {}), best)
        operators = Counter(r["operator"] for r in rows)
        line = (f"generation {generation + 1}/{self.generations}: {len(rows)} candidates "
                f"({', '.join(f'{n} {operator}' for operator, n in operators.most_common())})")
        if scores:
            line += f", best {max(scores):.2f}%, mean {statistics.fmean(scores):.2f}%"
        missing = trial.config.get("missing", 0)
        line += (f", {failed} failed" if failed else "") + (f", {rejected} over the latency limit" if rejected else "")
        line += f", {missing} fewer than asked (space exhausted)" if missing else ""
        if best:  # the best by the search's objective
            line += (f"; best so far: held-out loss {best['loss']:.4f} (top-1 {best['top1']:.2f}%)"
                     if self.objective == "loss" else f"; best so far {best['top1']:.2f}%")
        print(line, flush=True)

    def log(self, generation: int, rows: list[dict], scores: list[float], failed: int, rejected: int, draws: dict,
            best: dict | None) -> None:
        self.writer = self.writer or SummaryWriter(str(self.run_dir / "tb"))
        if scores:
            self.writer.add_scalar("generation/best_top1", max(scores), generation)
            self.writer.add_scalar("generation/mean_top1", statistics.fmean(scores), generation)
            self.writer.add_scalar("generation/median_top1", statistics.median(scores), generation)
        if best:
            self.writer.add_scalar("search/best_so_far_top1", best["top1"], generation)
        if draws.get("total"):
            self.writer.add_scalar("generation/constraint_met_fraction", draws["met"] / draws["total"], generation)
        self.writer.add_scalar("generation/failed", failed, generation)
        self.writer.add_scalar("generation/rejected", rejected, generation)
        for row in rows:
            if row["status"] == "ok":
                genes = {f"block{i:02d}": token for i, token in enumerate(row["arch"].split("-"))}
                self.writer.add_hparams(
                    {"arch": row["arch"], "generation": generation, "operator": row["operator"], **genes},
                    {"hparam/top1": row["top1"], "hparam/flops_m": row["flops"] / 1e6, "hparam/params_m": row["params"] / 1e6,
                     **({"hparam/latency_ms": row["latency_ms"]} if row.get("latency_ms") is not None else {})},
                    run_name=f"candidates/gen{generation:04d}-{row['candidate']:03d}",
                )
        self.writer.flush()

    def on_experiment_end(self, trials, **info):
        if self.writer:
            self.writer.close()
