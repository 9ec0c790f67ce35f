"""GLiT's evolution (SPOS-style) as a Ray Tune `Searcher`, one generation per trial.

Generation 0 is `population` random architectures inside the limits. (`strategy="random"`, the
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
from typing import TYPE_CHECKING

from ray.tune.search import Searcher

from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture
from glit_ray.searching import pareto

if TYPE_CHECKING:  # for annotations only: the run settings are a layer above; objects come from the callers
    from glit_ray.searching.settings import SearchRun

TRIES_PER_CHILD = 50
MIN_FALLBACK_RATE = 0.05  # a fallback mutation's rate when --mutation-prob is 0 (it doubles from there to 1)
TRIAL_ATTEMPTS = 2  # a generation whose trial errors is run once more, then recorded as failed


class EvolutionSearcher(Searcher):
    """The evolution of one search run's `settings` (`settings.SearchRun`) over `num_classes` classes."""

    def __init__(self, settings: SearchRun, num_classes: int):
        super().__init__(metric="top1", mode="max")
        self.settings, self.num_classes = settings, num_classes
        self.state = {
            "generation": 0,   # the next generation to breed
            "scored": [],      # every finished candidate row, in generation and candidate order
            "seen": set(),     # arch strings ever suggested
            "pending": {},     # trial id -> suggested config
            "attempts": {},    # generation -> trial attempts so far
            "retry": None,     # a generation's config to suggest again after its trial errored
        }

    def __setstate__(self, state: dict):
        """Tune pickles the searcher into its snapshot (`Tuner.restore` unpickles it). One pickled by glit_ray before
        typed settings (2fa5798) held its settings field by field, and cannot drive this code."""
        if "settings" not in state:
            raise UserError("this search's Tune snapshot was written by an earlier glit_ray (before typed settings, "
                            "2fa5798): finish it with that version, or start the search again in a new --out")
        self.__dict__.update(state)

    # ---- Tune interface ------------------------------------------------------------------------
    def suggest(self, trial_id: str):
        state = self.state
        if state["generation"] >= self.settings.generations:
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
        ok, settings = [r for r in self.state["scored"] if r["status"] == "ok"], self.settings
        if settings.objective == "pareto":
            best = pareto.select(ok, settings.topk, settings.pareto_cost)
        else:
            best = pareto.best_first(ok, settings.objective)[: settings.topk]
        return [Architecture.parse(r["arch"]) for r in best]

    def search_around(self, operator: str, make, admit, rng: random.Random) -> bool:
        """A child found around the parents `make()` draws when `operator` made nothing new: a mutation that changes
        at least one gene, of the parent or of the crossover's child, its rate doubled step by step up to 1. False
        when that neighbourhood is exhausted within the limits."""
        fallback, rate = ("mutation" if operator == "mutation" else f"{operator}+mutation"), self.settings.mutation_prob
        space, level = self.settings.space, self.settings.level
        while True:
            for _ in range(TRIES_PER_CHILD):
                _, parents, base = make()
                if admit(space.mutate(base, level, rate, rng, changed=True), fallback, parents):
                    return True
            if rate >= 1:
                return False
            rate = min(1.0, max(2 * rate, MIN_FALLBACK_RATE))

    def breed(self, generation: int) -> dict:
        """The config of generation `generation`: its candidates with lineage, and draw statistics."""
        settings, seen = self.settings, self.state["seen"]
        space, level, limits = settings.space, settings.level, settings.limits
        rng = random.Random(f"{settings.seed}:{generation}")
        candidates, draws = [], {"total": 0, "met": 0}

        def admit(arch: Architecture, operator: str, parents: list[Architecture]) -> bool:
            draws["total"] += 1
            if not limits.admits(limits.cost(space, arch, self.num_classes)):
                return False
            draws["met"] += 1
            if str(arch) in seen:
                return False
            seen.add(str(arch))
            candidates.append({"arch": str(arch), "generation": generation, "operator": operator,
                               "parents": [str(p) for p in parents]})
            return True

        def child(operator: str, make) -> bool:
            """One new child of `operator`, else one found around its parents (`search_around`); False when their
            neighbourhood is exhausted. `make()` gives (the operator's child, its parents, the architecture a
            fallback mutation starts from: the parent, or the crossover's child)."""
            for _ in range(TRIES_PER_CHILD):
                arch, parents, _ = make()
                if admit(arch, operator, parents):
                    return True
            return self.search_around(operator, make, admit, rng)

        parents = self.parents() if generation and settings.strategy == "evolution" else []
        wanted = settings.mutations + settings.crossovers if generation else settings.population
        if parents:
            def mutate():
                parent = rng.choice(parents)
                return space.mutate(parent, level, settings.mutation_prob, rng), [parent], parent

            def cross():
                pair = rng.sample(parents, 2) if len(parents) > 1 else parents * 2
                crossed = space.crossover(pair[0], pair[1], rng)
                return crossed, pair, crossed

            for operator, count, make in (("mutation", settings.mutations, mutate),
                                          ("crossover", settings.crossovers, cross)):
                for _ in range(count):
                    child(operator, make)
        # generation 0, the random baseline, and children whose parents' neighbourhood is exhausted: random draws
        for _ in range(wanted - len(candidates)):
            any(admit(space.sample(level, rng, settings.distribution), "random", []) for _ in range(TRIES_PER_CHILD))
        return {"generation": generation, "candidates": candidates, "draws": draws, "missing": wanted - len(candidates)}
