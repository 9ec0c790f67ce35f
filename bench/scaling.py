"""Scaling: throughput of the search's Tuner with N fixed-time evaluators against the ideal N/T.

Each evaluator sleeps T seconds per candidate instead of a forward pass (fractional CPUs, so 16
fit on 2 cores), and the search's real Tuner runs generations of `per-actor` x N candidates on
them. Efficiency = measured candidates/s / (N / T); what it loses is orchestration. `end to end`
times the whole `Tuner.fit` (its one-time start included: Tune's set-up and the trial's actor);
`steady` times from the first result to the last (plus one T), what a long search sees: breeding,
Tune's per-generation trial turnaround, the Parquet/TensorBoard callback and each generation's tail.

    python bench/scaling.py [--seconds 0.5] [--actors 1 4 16] [--per-actor 8] [--generations 5]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ray

from glit_ray.results import read_candidates

from harness import run_generations, start_fake_evaluators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="T, each candidate's fixed evaluation time")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--per-actor", type=int, default=8, help="candidates per actor per generation")
    parser.add_argument("--generations", type=int, default=5)
    args = parser.parse_args()
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    print(f"{'actors':>6} {'candidates':>10} {'ideal N/T':>9} {'end-to-end cand/s':>17} {'efficiency':>10} "
          f"{'steady cand/s':>13} {'efficiency':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.actors:
            actors = start_fake_evaluators(n, args.seconds, cpus=min(0.45, 1.8 / n))
            per_generation = args.per_actor * n
            seconds = run_generations(actors, per_generation, args.generations, Path(tmp) / f"n{n}")
            stamps = read_candidates(Path(tmp) / f"n{n}").column("timestamp").to_pylist()
            candidates, ideal = per_generation * args.generations, n / args.seconds
            rate = candidates / seconds
            steady = candidates / ((max(stamps) - min(stamps)).total_seconds() + args.seconds)
            print(f"{n:>6} {candidates:>10} {ideal:>9.2f} {rate:>17.2f} {rate / ideal:>10.2f} "
                  f"{steady:>13.2f} {steady / ideal:>10.2f}", flush=True)
            for actor in actors:
                ray.kill(actor)
    ray.shutdown()


if __name__ == "__main__":
    main()
