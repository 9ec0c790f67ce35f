"""Orchestration throughput: candidates/s with a no-op evaluator, Tune's one-trial-per-candidate loop vs glit_ray's.

Both sides score the same kind of candidate on the same no-op evaluator actors, so what is measured
is the cost of getting a candidate from the searcher to an evaluator and its result back:
- `tune default`: Tune's own loop, one function trial per candidate (BasicVariantGenerator,
  `reuse_actors=True`, 2 trials at a time); the trial asks an evaluator actor to score its candidate.
- `glit_ray`: the search's real Tuner (`generation_tuner`): EvolutionSearcher, one reused trial per
  generation fanning its candidates out to the actors, Parquet/TensorBoard results callback.

Target: at least 20 candidates/s on 2 cores (Tune's default loop manages about 1-4 here).

    python bench/orchestration.py [--candidates 1000] [--baseline-candidates 100] [--repeats 3] [--record]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray import tune

from glit_ray.cluster import ray_workarounds
from glit_ray.models.space import SearchSpace

from harness import SPACE, publish, run_generations, spread, start_fake_evaluators


def tune_default(actors: list, candidates: int, out: Path) -> float:
    """Candidates/s of Tune's default loop, one trial per candidate."""
    space = SearchSpace.load(SPACE)
    rng = random.Random(0)
    archs = [str(space.sample("high", rng)) for _ in range(candidates)]

    def one_candidate(config):
        return ray.get(actors[hash(config["arch"]) % len(actors)].score.remote(config["arch"]))

    tuner = tune.Tuner(
        tune.with_resources(one_candidate, {"cpu": 0.01}),
        param_space={"arch": tune.grid_search(archs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(out), name="default", verbose=0),
    )
    started = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - started
    assert len(results) == candidates and not results.errors
    return candidates / seconds


def glit_ray_generations(actors: list, candidates: int, out: Path) -> float:
    """Candidates/s of the search's own Tuner: one reused trial per generation of 200."""
    return candidates / run_generations(actors, 200, candidates // 200, out / "glit_ray")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=1000, help="glit_ray side (generations of 200)")
    parser.add_argument("--baseline-candidates", type=int, default=100, help="Tune-default side")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating; medians are compared")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    ray_workarounds.apply()  # as the commands do before Ray starts
    ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False)
    actors = start_fake_evaluators(2)
    default, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tune_default(actors, 10, Path(tmp) / "warmup")  # warm-up: imports, Tune's first start, actor caches
        glit_ray_generations(actors, 200, Path(tmp) / "warmup")
        for repeat in range(args.repeats):
            default.append(tune_default(actors, args.baseline_candidates, Path(tmp) / str(repeat)))
            ours.append(glit_ray_generations(actors, args.candidates, Path(tmp) / str(repeat)))
    ratio = statistics.median(ours) / statistics.median(default)
    body = "\n".join([
        f"Two no-op evaluator actors; {args.repeats} timed runs of each side, alternating, after one warm-up run each.", "",
        "| side | candidates per run | candidates/s (min / median / max) |",
        "| --- | ---: | ---: |",
        f"| Tune default, 1 trial per candidate | {args.baseline_candidates} | {spread(default)} |",
        f"| glit_ray, 1 reused trial per generation of 200 | {args.candidates} | {spread(ours)} |", "",
        f"**glit_ray {statistics.median(ours):.1f} candidates/s, {ratio:.0f}x Tune's default loop** (target >= 20 candidates/s)",
    ])
    publish("P3", body, args.record)
    ray.shutdown()


if __name__ == "__main__":
    main()
