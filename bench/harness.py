"""What the benchmarks share: a stand-in evaluator actor and a run of the search's own Tuner on it."""
from __future__ import annotations

import random
import time
from pathlib import Path

import ray

from glit_ray.constraints import Limits
from glit_ray.results import ResultsCallback, read_candidates
from glit_ray.search import generation_tuner
from glit_ray.searcher import EvolutionSearcher
from glit_ray.space import SearchSpace

SPACE = "glit_tiny"  # 4^12 high-level architectures: breeding never runs out of new children


@ray.remote
class FakeEvaluator:
    """Answers like `Evaluator.score` after `seconds` (0: at once), without computing anything."""

    def __init__(self, actor_id: int, seconds: float = 0.0):
        self.actor_id, self.seconds = actor_id, seconds

    def score(self, arch: str) -> dict:
        time.sleep(self.seconds)
        top1 = random.Random(arch).uniform(0, 100)
        return {"top1": top1, "top5": top1, "loss": 1.0, "flops": 1, "params": 1, "eval_seconds": self.seconds,
                "actor": self.actor_id, "node": "bench"}

    def stats(self) -> dict:
        return {"actor": self.actor_id, "loads": 1}


def start_fake_evaluators(count: int, seconds: float = 0.0, cpus: float = 0.45) -> list:
    actors = [FakeEvaluator.options(num_cpus=cpus).remote(i, seconds) for i in range(count)]
    ray.get([a.stats.remote() for a in actors])  # started, before any clock runs
    return actors


def run_generations(actors: list, per_generation: int, generations: int, out: Path) -> float:
    """Seconds the search's real Tuner takes for `generations` of `per_generation` candidates on `actors`.

    Its rows are in `read_candidates(out)`, each stamped when its result reached the trial.
    """
    searcher = EvolutionSearcher(SearchSpace.load(SPACE), "high", None, Limits(), 1000, population=per_generation,
                                 generations=generations, topk=20, mutations=per_generation // 2,
                                 crossovers=per_generation - per_generation // 2, mutation_prob=0.1, seed=0)
    tuner = generation_tuner(out, searcher, actors, ResultsCallback(out, "high", 10, generations), restore=False)
    started = time.perf_counter()
    tuner.fit()
    seconds = time.perf_counter() - started
    rows = read_candidates(out).num_rows
    assert rows == generations * per_generation, rows
    return seconds
