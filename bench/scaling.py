"""Scaling: throughput of the search's Tuner with N fixed-time evaluators against the ideal N/T.

Each evaluator sleeps T seconds per candidate instead of a forward pass (fractional CPUs, so 16
fit on 2 cores), and the search's real Tuner runs generations of `per-actor` x N candidates on
them. Efficiency = measured candidates/s / (N / T); what it loses is orchestration. `end to end`
times the whole `Tuner.fit` (its one-time start included: Tune's set-up and the trial's actor);
`steady` times from the first result to the last (plus one T), what a long search sees: breeding,
Tune's per-generation trial turnaround, the Parquet/TensorBoard callback and each generation's tail.

Target: efficiency at least 0.8 at 16 actors.

    python bench/scaling.py [--seconds 0.5] [--actors 1 4 16] [--per-actor 8] [--generations 5] [--repeats 3] [--record]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ray

from glit_ray.searching.results import read_candidates

from harness import publish, run_generations, spread, start_fake_evaluators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="T, each candidate's fixed evaluation time")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--per-actor", type=int, default=8, help="candidates per actor per generation")
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per actor count (after one warm-up run)")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.actors:
            actors = start_fake_evaluators(n, args.seconds, cpus=min(0.45, 1.8 / n))
            per_generation, ideal = args.per_actor * n, n / args.seconds
            end_to_end, steady = [], []
            for repeat in range(args.repeats + 1):
                out = Path(tmp) / f"n{n}-{repeat}"
                seconds = run_generations(actors, per_generation, args.generations, out)
                stamps = read_candidates(out).column("timestamp").to_pylist()
                if repeat:  # the first run is the warm-up
                    candidates = per_generation * args.generations
                    end_to_end.append(candidates / seconds / ideal)
                    steady.append(candidates / ((max(stamps) - min(stamps)).total_seconds() + args.seconds) / ideal)
            rows.append(f"| {n} | {per_generation * args.generations} | {ideal:.2f} | {spread(end_to_end)} | {spread(steady)} |")
            print(rows[-1], flush=True)
            for actor in actors:
                ray.kill(actor)
    body = "\n".join([
        f"Evaluators sleeping T = {args.seconds} s per candidate, generations of {args.per_actor} x N candidates, "
        f"{args.generations} generations per run; efficiency = measured candidates/s / (N / T), min / median / max of "
        f"{args.repeats} runs after a warm-up run. *End to end* times the whole `Tuner.fit` (Tune's start included), "
        "*steady* from the first result to the last plus one T.", "",
        "| actors N | candidates per run | ideal cand/s | end-to-end efficiency | steady efficiency |",
        "| ---: | ---: | ---: | ---: | ---: |", *rows, "",
        "Target: efficiency at least 0.8 at 16 actors.",
    ])
    publish("P4", body, args.record)
    ray.shutdown()


if __name__ == "__main__":
    main()
