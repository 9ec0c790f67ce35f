import random
import zlib

import pytest
from ray.tune.search import Searcher

from glit_ray.models.arch import Architecture
from glit_ray.models.constraints import Limits
from glit_ray.models.cost import arch_cost
from glit_ray.models.latency_table import TableLatency
from glit_ray.models.space import SearchSpace
from glit_ray.search import build_parser, settings_from_args
from glit_ray.searching import pareto
from glit_ray.searching.searcher import EvolutionSearcher
from glit_ray.searching.settings import Evolution, Latency

BUDGET = dict(population=12, generations=4, topk=4, mutations=5, crossovers=5, mutation_prob=0.3, seed=7)


def fake_top1(arch: str) -> float:
    """A deterministic score: more global heads score higher (with a wobble that is the same in every process)."""
    parsed = Architecture.parse(arch)
    return 50 + 5 * sum(parsed.distribution) + zlib.crc32(arch.encode()) % 97 / 100


def fake_loss(arch: str) -> float:
    return zlib.crc32(arch.encode()) % 1000 / 1000


def fake_rows(config, fail=(), top1=fake_top1):
    return [{**c, "status": "failed", "error": "boom"} if i in fail else
            {**c, "status": "ok", "error": None, "top1": top1(c["arch"]), "loss": fake_loss(c["arch"])}
            for i, c in enumerate(config["candidates"])]


def make(space, **overrides):
    """A searcher over 10 classes of `space`'s high level: the evolution's defaults, the BUDGET and `overrides`."""
    return EvolutionSearcher(Evolution(**{"space": space, "level": "high", "distribution": None, "limits": Limits(),
                                          **BUDGET, **overrides}), 10)


def run_to_end(searcher, start=0, top1=fake_top1):
    configs = []
    for n in range(start, 100):
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED:
            return configs
        configs.append(config)
        searcher.on_trial_complete(f"t{n}", {"rows": fake_rows(config, top1=top1)})
    raise AssertionError("never finished")


def test_generation_zero_is_random_unique_and_inside_limits(micro):
    limits = Limits(flops_max=12)
    config = make(micro, limits=limits).suggest("t0")
    archs = [c["arch"] for c in config["candidates"]]
    assert len(archs) == len(set(archs)) == 12
    assert all(c["operator"] == "random" and c["parents"] == [] for c in config["candidates"])
    assert all(limits.admits(arch_cost(micro, Architecture.parse(a), 10)) for a in archs)
    assert 0 < config["draws"]["met"] <= config["draws"]["total"]


def coarse_top1(arch: str) -> float:
    """A top-1 that ties often (one value per count of global heads): the held-out loss decides among the tied."""
    return 50 + 5 * sum(Architecture.parse(arch).distribution)


@pytest.mark.parametrize("objective, top1", [("loss", fake_top1), ("top1", coarse_top1)])
def test_children_come_from_the_top_k_and_are_new(micro, objective, top1):
    """Every bred child's parents are among the top-k of all earlier generations, in the order the search's own
    ranking (`pareto.best_first`, the order best.json and the report use) gives for the objective."""
    searcher = make(micro, objective=objective)
    configs = run_to_end(searcher, top1=top1)
    assert len(configs) == BUDGET["generations"]
    seen = set()
    for config in configs:
        generation = config["generation"]
        scored_before = [r for r in searcher.state["scored"] if r["generation"] < generation and r["status"] == "ok"]
        top_archs = {r["arch"] for r in pareto.best_first(scored_before, objective)[: BUDGET["topk"]]}
        assert generation == 0 or len(top_archs) == BUDGET["topk"]
        for c in config["candidates"]:
            assert c["arch"] not in seen
            seen.add(c["arch"])
            if c["operator"] != "random":
                assert set(c["parents"]) <= top_archs
                assert len(c["parents"]) == (1 if c["operator"] == "mutation" else 2)
        if generation:
            assert len(config["candidates"]) == BUDGET["mutations"] + BUDGET["crossovers"]
            bred = [c for c in config["candidates"] if c["operator"] in ("mutation", "crossover")]
            assert len(bred) >= len(config["candidates"]) // 2  # random fill only covers a shortfall
            assert [c for c in config["candidates"] if c not in bred] == config["candidates"][len(bred):]
    assert len(searcher.state["scored"]) == 12 + 3 * 10
    assert searcher.suggest("again") == Searcher.FINISHED


def test_evolution_is_deterministic_for_a_seed(micro):
    def archs(seed):
        return [c["arch"] for config in run_to_end(make(micro, seed=seed)) for c in config["candidates"]]
    assert archs(3) == archs(3) and archs(3) != archs(4)


def test_save_restore_into_a_blank_searcher_continues_the_same_evolution(micro, tmp_path):
    reference = [c["arch"] for config in run_to_end(make(micro)) for c in config["candidates"]]
    first = make(micro)
    done = []
    for n in range(2):
        config = first.suggest(f"t{n}")
        first.on_trial_complete(f"t{n}", {"rows": fake_rows(config)})
        done.append(config)
    pending = first.suggest("t2")  # in flight when the run stops
    first.save(str(tmp_path / "searcher.pkl"))

    blank = make(micro)  # as the search builds it from run.json's settings; restore brings back the evolution
    blank.restore(str(tmp_path / "searcher.pkl"))
    assert blank.suggest("t3") is None  # generation 2 is still being scored
    blank.on_trial_complete("t2", {"rows": fake_rows(pending)})
    rest = run_to_end(blank, start=4)
    resumed = [c["arch"] for config in [*done, pending, *rest] for c in config["candidates"]]
    assert resumed == reference


def test_an_errored_generation_is_retried_once_then_recorded_as_failed(micro):
    searcher = make(micro)
    config = searcher.suggest("t0")
    searcher.on_trial_complete("t0", None, error=True)
    assert searcher.suggest("t1") == config  # the same candidates again
    searcher.on_trial_complete("t1", None, error=True)
    assert searcher.state["generation"] == 1
    failed = searcher.state["scored"]
    assert len(failed) == 12 and all(r["status"] == "failed" for r in failed)
    assert searcher.parents() == []  # failures never count as scores
    nxt = searcher.suggest("t2")
    assert all(c["operator"] == "random" for c in nxt["candidates"])  # no parents: random again


def test_failed_candidates_are_kept_but_never_parents(micro):
    searcher = make(micro)
    config = searcher.suggest("t0")
    best = min(range(12), key=lambda i: fake_loss(config["candidates"][i]["arch"]))  # the default objective's best
    searcher.on_trial_complete("t0", {"rows": fake_rows(config, fail={best})})
    assert config["candidates"][best]["arch"] not in {str(a) for a in searcher.parents()}
    assert sum(r["status"] == "failed" for r in searcher.state["scored"]) == 1


def test_unknown_and_repeated_trial_ids_are_ignored(micro):
    searcher = make(micro)
    config = searcher.suggest("t0")
    searcher.on_trial_complete("nobody", {"rows": []})
    searcher.on_trial_complete("t0", {"rows": fake_rows(config)})
    searcher.on_trial_complete("t0", {"rows": fake_rows(config)})
    assert len(searcher.state["scored"]) == 12 and searcher.state["generation"] == 1


def test_a_space_too_small_for_new_children_says_so(micro_dict):
    micro_dict["depth"] = 2
    micro_dict["global_heads"] = [0, 3]
    space = SearchSpace.from_dict(micro_dict)  # 2^2 = 4 high-level architectures in all
    searcher = make(space, population=3, generations=3, topk=2, mutations=2, crossovers=2)
    configs = run_to_end(searcher)
    assert len(configs[0]["candidates"]) == 3 and configs[0]["missing"] == 0
    assert len(configs[1]["candidates"]) == 1 and configs[1]["missing"] == 3
    assert configs[2]["candidates"] == [] and configs[2]["missing"] == 4


def test_the_random_baseline_has_the_same_budget_and_limits_but_no_parents(micro):
    limits = Limits(flops_max=12)
    random_configs = run_to_end(make(micro, limits=limits, strategy="random"))
    evolution_configs = run_to_end(make(micro, limits=limits))
    assert [len(c["candidates"]) for c in random_configs] == [len(c["candidates"]) for c in evolution_configs]
    candidates = [c for config in random_configs for c in config["candidates"]]
    assert all(c["operator"] == "random" and c["parents"] == [] for c in candidates)
    assert len({c["arch"] for c in candidates}) == len(candidates)
    assert all(limits.admits(arch_cost(micro, Architecture.parse(c["arch"]), 10)) for c in candidates)
    again = [c["arch"] for config in run_to_end(make(micro, limits=limits, strategy="random")) for c in config["candidates"]]
    assert again == [c["arch"] for c in candidates]
    args = build_parser().parse_args(["--level", "high", "--strategy", "random"])
    assert settings_from_args(args).strategy == "random"


def test_pareto_and_loss_objectives_take_parents_by_rank_and_crowding_or_by_held_out_loss(micro):
    """With a cost that falls as top-1 rises for some rows, the top-1 ranking and the Pareto one differ; the loss
    objective takes the lowest held-out losses."""
    searcher = make(micro, objective="pareto", pareto_cost="flops", topk=3)
    rows = []
    for n, (top1, flops) in enumerate([(90, 30), (89, 31), (88, 32), (70, 5), (60, 2), (50, 40)]):
        arch = str(micro.sample("high", random.Random(n)))
        rows.append({"arch": arch, "status": "ok", "top1": top1, "loss": 1.0, "flops": flops})
    searcher.state["scored"] = rows
    # the front is (90, 30), (70, 5), (60, 2): its ends first (infinite crowding), then its middle
    parents = [str(a) for a in searcher.parents()]
    assert set(parents[:2]) == {rows[0]["arch"], rows[4]["arch"]} and parents[2] == rows[3]["arch"]
    by_top1 = make(micro, objective="top1", topk=3)
    by_top1.state["scored"] = rows
    assert [str(a) for a in by_top1.parents()] == [r["arch"] for r in rows[:3]]
    by_loss = make(micro, objective="loss", topk=3)
    by_loss.state["scored"] = [{**r, "loss": 1 / r["flops"]} for r in rows]  # the costliest: the lowest loss
    assert [str(a) for a in by_loss.parents()] == [rows[i]["arch"] for i in (5, 2, 1)]
    args = build_parser().parse_args(["--level", "high", "--objective", "pareto", "--pareto-cost", "latency"])
    settings = settings_from_args(args)
    assert settings.objective == "pareto" and settings.pareto_cost == "latency_ms"
    assert settings.latency == Latency(batch=1, max_ms=None)  # a latency front needs latency measured


def test_converged_parents_breed_around_themselves_not_at_random(micro):
    """Scores that peak at one architecture (and tie often: 7 values) make the top-k alike within a few generations:
    their crossovers give architectures seen before, and the children come from mutating around them instead."""
    target = micro.sample("high", random.Random(99)).blocks

    def peaked(arch: str) -> float:
        return 100.0 - 10 * sum(a != b for a, b in zip(Architecture.parse(arch).blocks, target))

    budget = dict(population=20, generations=12, topk=5, mutations=10, crossovers=10, mutation_prob=0.1,
                  objective="top1")  # parents by the peaked top-1
    configs = run_to_end(make(micro, **budget), top1=peaked)
    bred = [c for config in configs[1:] for c in config["candidates"]]
    operators = {op: sum(c["operator"] == op for c in bred) for op in ("mutation", "crossover", "crossover+mutation", "random")}
    assert len(bred) == 11 * 20 and operators["random"] <= 0.1 * len(bred), operators
    assert operators["crossover+mutation"] > 0 and operators["mutation"] > 0, operators
    for c in bred:  # a fallback child is one mutation away from its parent (or its parents' crossover)
        assert c["parents"] and all(micro.validate(Architecture.parse(p), "high") for p in c["parents"])
    assert max(peaked(c["arch"]) for c in bred) == 100.0  # it found the peak
    again = run_to_end(make(micro, **budget), top1=peaked)
    assert [c["candidates"] for c in again] == [c["candidates"] for c in configs]


def test_a_mutation_that_must_change_changes_one_gene_at_least(micro, rng):
    arch = micro.sample("high", rng)
    assert all(micro.mutate(arch, "high", 0.0, rng, changed=True) != arch for _ in range(50))
    assert micro.mutate(arch, "high", 0.0, rng) == arch


@pytest.mark.parametrize("earlier", [
    {"space": "micro", "level": "high", "population": 12, "generations": 4},  # before typed settings: field by field
    {"settings": "the whole SearchRun"},  # before the searcher took its evolution settings only
])
def test_a_searcher_pickled_by_an_earlier_glit_ray_is_refused_in_one_line(micro, earlier):
    """Tune's snapshot pickles the searcher whole; one of an earlier release held other settings than `evolution`."""
    import pickle

    from glit_ray.core.errors import UserError

    old = EvolutionSearcher.__new__(EvolutionSearcher)
    old.__dict__.update({**earlier, "num_classes": 10, "state": {"generation": 2, "scored": []}})
    with pytest.raises(UserError, match=r"written by an earlier glit_ray \(before the searcher took its evolution "
                                        r"settings only\): finish it with that version, or start the search again"):
        pickle.loads(pickle.dumps(old))
    again = pickle.loads(pickle.dumps(make(micro)))  # today's round-trips
    assert again.evolution == make(micro).evolution


@pytest.mark.parametrize("level", ["high", "low"])
def test_a_latency_table_limit_keeps_every_bred_candidate_under_it_and_records_the_prediction(micro, micro_latency_table,
                                                                                              level):
    distribution = (3, 2, 1, 0, 1, 2) if level == "low" else None
    free = TableLatency(micro_latency_table)
    unlimited = run_to_end(make(micro, level=level, distribution=distribution, latency_table=free))
    predicted = sorted(c["latency_ms"] for config in unlimited for c in config["candidates"])
    limit = predicted[len(predicted) // 2]  # half of what the unlimited search bred is over it
    latency = TableLatency(micro_latency_table, max_ms=limit)
    configs = run_to_end(make(micro, level=level, distribution=distribution, latency_table=latency))
    candidates = [c for config in configs for c in config["candidates"]]
    assert len(candidates) == BUDGET["population"] + 3 * (BUDGET["mutations"] + BUDGET["crossovers"])
    assert all(c["latency_source"] == "table" for c in candidates)
    assert all(c["latency_ms"] == latency.ms(Architecture.parse(c["arch"])) <= limit for c in candidates)
    assert all(config["draws"]["met"] < config["draws"]["total"] for config in configs[:1])  # rejected as bred
    assert {c["arch"] for c in candidates} != {c["arch"] for config in unlimited for c in config["candidates"]}
    if level == "low":
        assert all(Architecture.parse(c["arch"]).distribution == distribution for c in candidates)
