"""P14: latency predicted from a table (`glit_ray.models.latency_table`) against whole networks timed end to end.

Per space: the table's parts (`part_forwards`: the call overhead, the stem, the head, each block option in sequence)
and `--archs` random low-level architectures (each block's G drawn, then its sizes) exported to ONNX Runtime, in the
same runtime, threads and batch; all of them timed in the same interleaved rounds (`time_rounds`), so that the
machine's load falls on both sides alike. The table is assembled from its parts' times as
`python -m glit_ray.latency_table` assembles it, and `predict_ms` is compared with each network's time.

error = |predicted - measured| / measured; goal: median <= 5 %, worst <= 15 %; Kendall tau of predicted against
measured.

    python bench/latency_table.py [--spaces glit_micro,glit_pico] [--archs 30] [--threads 1] [--batch 1] [--rounds 3] [--record]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from scipy.stats import kendalltau

from glit_ray.models.glit import GLiT
from glit_ray.models.latency_table import (Runtime, assemble_table, block_options, part_forwards, predict_ms,
                                           time_rounds)
from glit_ray.models.space import SearchSpace

from harness import publish


def random_arch(space: SearchSpace, rng: random.Random):
    """A low-level architecture of a random G distribution: every block kind and size is drawn."""
    return space.sample("low", rng, tuple(rng.choice(space.global_heads) for _ in range(space.depth)))


def bench_space(name: str, args, runtime: Runtime) -> tuple[str, list[str]]:
    space = SearchSpace.load(name)
    started = time.perf_counter()
    parts = part_forwards(space, runtime, args.batch)
    build_s = time.perf_counter() - started
    rng = random.Random(0)
    archs = list(dict.fromkeys(random_arch(space, rng) for _ in range(args.archs)))
    images = torch.randn(args.batch, space.in_chans, space.img_size, space.img_size)
    started = time.perf_counter()
    networks = {str(arch): runtime.forward(GLiT(arch, space, 1000), images) for arch in archs}
    export_s = (time.perf_counter() - started) / len(archs)
    started = time.perf_counter()
    ms = time_rounds(runtime, {**parts, **networks}, args.rounds)
    timing_s = time.perf_counter() - started
    table = assemble_table(space, runtime, {key: ms[key] for key in parts}, args.batch)
    predicted = [predict_ms(table, space, arch) for arch in archs]
    measured = [ms[str(arch)] for arch in archs]
    errors = [100 * abs(p - m) / m for p, m in zip(predicted, measured)]
    signed = [100 * (p - m) / m for p, m in zip(predicted, measured)]
    tau = kendalltau(predicted, measured).statistic
    rows = [f"| {name} | `{arch}` | {m:.3f} | {p:.3f} | {s:+.1f} |" for arch, m, p, s in zip(archs, measured, predicted, signed)]
    for row in rows:
        print(row, flush=True)
    table_parts_s = timing_s * len(parts) / (len(parts) + len(networks))
    summary = (f"| {name} | {len(block_options(space))} + 2 | {build_s / 60 + table_parts_s / 60:.1f} min | {len(archs)} | "
               f"{min(measured):.3f}-{max(measured):.3f} | **{statistics.median(errors):.1f} %** | "
               f"**{max(errors):.1f} %** | {statistics.mean(signed):+.1f} % | **{tau:.2f}** | {export_s:.1f} s |")
    return summary, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", default="glit_micro,glit_pico")
    parser.add_argument("--archs", type=int, default=30, help="random architectures per space")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is kept)")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    runtime = Runtime("onnxruntime", args.threads)
    summaries, rows = [], []
    for name in args.spaces.split(","):
        summary, space_rows = bench_space(name, args, runtime)
        print(summary, flush=True)
        summaries.append(summary)
        rows += space_rows
    body = "\n".join([
        f"ONNX Runtime {runtime.version} (CPU), {args.threads} thread{'s' * (args.threads > 1)}, batch {args.batch}, "
        f"1000 classes; each part and network: the median of {args.rounds} interleaved rounds, each the fastest of "
        "enough repeats to span 0.2 s. error = |predicted - measured| / measured.", "",
        "| space | table entries | table cost (export + timing) | networks | measured ms | median error | worst error "
        "| mean signed error | Kendall tau | export per network |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *summaries, "",
        "Goal: median error <= 5 %, worst <= 15 %.", "",
        "<details><summary>every network</summary>", "",
        "| space | architecture | measured ms | predicted ms | error % |", "| --- | --- | ---: | ---: | ---: |", *rows, "",
        "</details>",
    ])
    publish("P14", body, args.record)


if __name__ == "__main__":
    main()
