"""Orchestration throughput: candidates/s with a no-op evaluator, Tune's one-trial-per-candidate loop vs glit_ray's.

Both sides score the same kind of candidate on the same no-op evaluator actors, so what is measured
is the cost of getting a candidate from the searcher to an evaluator and its result back:
- `tune default`: Tune's own loop, one function trial per candidate (BasicVariantGenerator,
  `reuse_actors=True`, 2 trials at a time); the trial asks an evaluator actor to score its candidate.
- `glit_ray`: the search's real Tuner (`generation_tuner`): EvolutionSearcher, one reused trial per
  generation fanning its candidates out to the actors, Parquet/TensorBoard results callback.

    python bench/orchestration.py [--candidates 1000] [--baseline-candidates 100] [--repeats 3]
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

from glit_ray.space import SearchSpace

from harness import SPACE, run_generations, start_fake_evaluators


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
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating; medians are compared")
    args = parser.parse_args()
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    actors = start_fake_evaluators(2)
    default, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            default.append(tune_default(actors, args.baseline_candidates, Path(tmp) / str(repeat)))
            ours.append(glit_ray_generations(actors, args.candidates, Path(tmp) / str(repeat)))
    for name, rates, n in (("tune default, 1 trial per candidate", default, args.baseline_candidates),
                           ("glit_ray, 1 reused trial per generation", ours, args.candidates)):
        print(f"{name:40s}: median {statistics.median(rates):7.1f} candidates/s "
              f"(runs: {', '.join(f'{r:.1f}' for r in rates)}; {n} candidates each)")
    print(f"ratio (medians): {statistics.median(ours) / statistics.median(default):.1f}x")
    ray.shutdown()

if __name__ == "__main__":
    main()
