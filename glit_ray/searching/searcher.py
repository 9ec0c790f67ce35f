"""GLiT's evolution (SPOS-style) as a Ray Tune `Searcher`, one generation per trial.

Generation 0 is `population` random architectures inside the limits (FLOPs, params, and the latency a table
predicts on the target device: a candidate over them is never bred, so no evaluator time goes to it). (`strategy="random"`, the
baseline, draws every later generation at random too, with the same budget.) Every later generation
takes the top-k of all candidates scored so far as parents (by top-1, by held-out loss with `objective="loss"`, or with `objective="pareto"`
by Pareto rank and crowding over top-1 and `cost`, as NSGA-II does) and breeds `mutations` children by
mutation and `crossovers` by uniform crossover. A child its operator cannot make new (converged
parents cross into architectures seen before; a mutation that changed nothing) is searched for
around its parents first: a mutation of the parent (of the crossover's child: "crossover+mutation")
that changes at least one gene, at a rate doubled step by step from `mutation_prob` to 1. Only when
that neighbourhood is exhausted within the limits is the child a random architecture; a space too
small for the generation leaves it short, and the shortfall is recorded.

Each generation is suggested as one trial whose config lists its candidates with their lineage.
Scoring a candidate takes milliseconds to seconds, far below Tune's per-trial overhead, so
batching a generation per trial keeps Tune's bookkeeping off the critical path; the trial fans
the candidates out to evaluator actors. Breeding generation g draws from `Random(seed:g)` and
ranks results in candidate order, so the evolution is the same whatever order results arrive in,
and `save`/`restore` hold the whole state for `Tuner.restore`.
"""
from __future__ import annotations

import pickle
import random

from ray.tune.search import Searcher

from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture
from glit_ray.searching import pareto
from glit_ray.searching.settings import Evolution

TRIES_PER_CHILD = 50
MIN_FALLBACK_RATE = 0.05  # a fallback mutation's rate when --mutation-prob is 0 (it doubles from there to 1)
TRIAL_ATTEMPTS = 2  # a generation whose trial errors is run once more, then recorded as failed


class EvolutionSearcher(Searcher):
    """`evolution` (a search run's `SearchRun.evolution`) over `num_classes` classes."""

    def __init__(self, evolution: Evolution, num_classes: int):
        super().__init__(metric="top1", mode="max")
        self.evolution, self.num_classes = evolution, num_classes
        self.state = {
            "generation": 0,   # the next generation to breed
            "scored": [],      # every finished candidate row, in generation and candidate order
            "seen": set(),     # arch strings ever suggested
            "pending": {},     # trial id -> suggested config
            "attempts": {},    # generation -> trial attempts so far
            "retry": None,     # a generation's config to suggest again after its trial errored
        }

    def __setstate__(self, state: dict):
        """Tune pickles the searcher into its snapshot (`Tuner.restore` unpickles it). One pickled by an earlier
        glit_ray held the whole run's settings (or, before typed settings, their fields), and cannot drive this code."""
        if "evolution" not in state:
            raise UserError("this search's Tune snapshot was written by an earlier glit_ray (before the searcher took "
                            "its evolution settings only): finish it with that version, or start the search again in a "
                            "new --out")
        self.__dict__.update(state)

    # ---- Tune interface ------------------------------------------------------------------------
    def suggest(self, trial_id: str):
        state = self.state
        if state["generation"] >= self.evolution.generations:
            return Searcher.FINISHED
        generation = state["generation"]
        if any(c["generation"] == generation for c in state["pending"].values()):
            return None  # this generation is being scored; the next needs its results
        config = state["retry"] or self.breed(generation)
        state["retry"] = None
        state["pending"][trial_id] = config
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        config = self.state["pending"].pop(trial_id, None)
        if config is None:
            return  # unknown or repeated trial id (restarted or restored trials)
        generation = config["generation"]
        attempts = self.state["attempts"][generation] = self.state["attempts"].get(generation, 0) + 1
        if error or not result or "rows" not in result:
            if attempts < TRIAL_ATTEMPTS:
                self.state["retry"] = config
                return
            rows = [{**c, "status": "failed", "error": "the generation's trial failed twice"} for c in config["candidates"]]
        else:
            rows = result["rows"]
        self.state["scored"].extend(rows)
        self.state["generation"] = generation + 1

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def get_state(self) -> dict:
        """The evolution. The settings are the run's (run.json, checked on resume), and the search builds its
        searcher from them before restoring this."""
        return self.state

    def set_state(self, state: dict):
        self.state = {key: value for key, value in state.items() if key != "settings"}  # (earlier versions kept them)

    # ---- evolution -------------------------------------------------------------------------------
    def parents(self) -> list[Architecture]:
        """The top-k architectures scored so far (ties broken by the architecture string)."""
        ok, evolution = [r for r in self.state["scored"] if r["status"] == "ok"], self.evolution
        if evolution.objective == "pareto":
            best = pareto.select(ok, evolution.topk, evolution.pareto_cost)
        else:
            best = pareto.best_first(ok, evolution.objective)[: evolution.topk]
        return [Architecture.parse(r["arch"]) for r in best]

    def breed(self, generation: int) -> dict:
        """The config of generation `generation`: its candidates with lineage, and draw statistics."""
        evolution = self.evolution
        brood = Brood(evolution, self.num_classes, generation, self.state["seen"])
        parents = self.parents() if generation and evolution.strategy == "evolution" else []
        wanted = evolution.mutations + evolution.crossovers if generation else evolution.population
        if parents:
            for operator, count in (("mutation", evolution.mutations), ("crossover", evolution.crossovers)):
                for _ in range(count):
                    brood.child(operator, parents)
        # generation 0, the random baseline, and children whose parents' neighbourhood is exhausted: random draws
        for _ in range(wanted - len(brood.candidates)):
            brood.random_child()
        return {"generation": generation, "candidates": brood.candidates, "draws": brood.draws,
                "missing": wanted - len(brood.candidates)}


class Brood:
    """One generation being bred: its random draws (`Random(seed:generation)`), the candidates admitted so far with
    their lineage, and how many draws met the limits."""

    def __init__(self, evolution: Evolution, num_classes: int, generation: int, seen: set[str]):
        self.evolution, self.num_classes, self.generation, self.seen = evolution, num_classes, generation, seen
        self.rng = random.Random(f"{evolution.seed}:{generation}")
        self.candidates, self.draws = [], {"total": 0, "met": 0}

    def admit(self, arch: Architecture, operator: str, parents: list[Architecture]) -> bool:
        """Take `arch` as a candidate if it is inside the limits (its latency predicted by a table too) and never
        suggested before."""
        evolution, self.draws["total"] = self.evolution, self.draws["total"] + 1
        if not evolution.limits.admits(evolution.limits.cost(evolution.space, arch, self.num_classes)):
            return False
        latency = evolution.latency_table
        predicted = {"latency_ms": latency.ms(arch), "latency_source": "table"} if latency else {}
        if latency and not latency.admits(predicted["latency_ms"]):
            return False
        self.draws["met"] += 1
        if str(arch) in self.seen:
            return False
        self.seen.add(str(arch))
        self.candidates.append({"arch": str(arch), "generation": self.generation, "operator": operator,
                                "parents": [str(p) for p in parents], **predicted})
        return True

    def made(self, operator: str, parents: list[Architecture]) -> tuple[Architecture, list[Architecture], Architecture]:
        """One draw of `operator` from `parents`: (its child, the parents it used, the architecture a fallback mutation
        starts from: the parent, or the crossover's child)."""
        evolution, rng = self.evolution, self.rng
        if operator == "mutation":
            parent = rng.choice(parents)
            return evolution.space.mutate(parent, evolution.level, evolution.mutation_prob, rng), [parent], parent
        pair = rng.sample(parents, 2) if len(parents) > 1 else parents * 2
        crossed = evolution.space.crossover(pair[0], pair[1], rng)
        return crossed, pair, crossed

    def child(self, operator: str, parents: list[Architecture]) -> bool:
        """One new child of `operator`, else one found around its parents (`search_around`); False when their
        neighbourhood is exhausted."""
        for _ in range(TRIES_PER_CHILD):
            arch, used, _ = self.made(operator, parents)
            if self.admit(arch, operator, used):
                return True
        return self.search_around(operator, parents)

    def search_around(self, operator: str, parents: list[Architecture]) -> bool:
        """A child found around the parents when `operator` made nothing new: a mutation that changes at least one
        gene, of the parent or of the crossover's child, its rate doubled step by step up to 1. False when that
        neighbourhood is exhausted within the limits."""
        fallback = "mutation" if operator == "mutation" else f"{operator}+mutation"
        evolution, rate = self.evolution, self.evolution.mutation_prob
        while True:
            for _ in range(TRIES_PER_CHILD):
                _, used, base = self.made(operator, parents)
                if self.admit(evolution.space.mutate(base, evolution.level, rate, self.rng, changed=True), fallback, used):
                    return True
            if rate >= 1:
                return False
            rate = min(1.0, max(2 * rate, MIN_FALLBACK_RATE))

    def random_child(self) -> bool:
        """A random architecture of the level inside the limits, in at most TRIES_PER_CHILD draws."""
        evolution = self.evolution
        return any(self.admit(evolution.space.sample(evolution.level, self.rng, evolution.distribution), "random", [])
                   for _ in range(TRIES_PER_CHILD))
