import math
import random

from glit_ray.searching import pareto

# (name, cost, top-1). Fronts drawn by hand:
#   rank 0: a (1, 50), b (2, 60), e (4, 70), g (4, 70) -- e and g are equal: neither dominates the other
#   rank 1: c (2, 55) (b beats it), d (3, 58) (b), f (5, 70) (e, g: same top-1, more cost)
#   rank 2: h (3, 54) (c beats it), i (6, 69) (f beats it)
#   rank 3: j (6, 50) (h beats it)
POINTS = [("a", 1, 50), ("b", 2, 60), ("c", 2, 55), ("d", 3, 58), ("e", 4, 70), ("f", 5, 70), ("g", 4, 70),
          ("h", 3, 54), ("i", 6, 69), ("j", 6, 50)]
RANKS = {"a": 0, "b": 0, "e": 0, "g": 0, "c": 1, "d": 1, "f": 1, "h": 2, "i": 2, "j": 3}
ROWS = [{"arch": n, "flops": c, "top1": t, "loss": 1.0} for n, c, t in POINTS]


def test_ranks_on_a_hand_made_set():
    ranks = pareto.ranks([r["top1"] for r in ROWS], [r["flops"] for r in ROWS])
    assert dict(zip([r["arch"] for r in ROWS], ranks)) == RANKS


def test_front_is_rank_zero_by_cost():
    assert [r["arch"] for r in pareto.front(ROWS, "flops")] == ["a", "b", "e", "g"]


def test_crowding_distance_by_hand():
    # front a (1, 50), b (2, 60), e (4, 70): ends infinite; b: top-1 (70 - 50) / 20 + cost (4 - 1) / 3 = 2
    distance = pareto.crowding([50, 60, 70], [1, 2, 4])
    assert math.isinf(distance[0]) and math.isinf(distance[2]) and distance[1] == 2.0
    # a point in a sparse stretch of the front is farther from its neighbours than one in a dense stretch
    dense, sparse = pareto.crowding([10, 11, 12, 20, 30], [1, 2, 3, 6, 9])[1], pareto.crowding([10, 11, 12, 20, 30], [1, 2, 3, 6, 9])[3]
    assert sparse > dense


def test_select_takes_lower_ranks_first_then_the_less_crowded():
    chosen = [r["arch"] for r in pareto.select(ROWS, 6, "flops")]
    assert set(chosen[:4]) == {"a", "b", "e", "g"}
    # rank 1 is c (2, 55), d (3, 58), f (5, 70): c and f are its ends (infinite crowding), d is between
    assert set(chosen[4:]) == {"c", "f"}


def test_ranks_match_the_definition_on_random_points():
    rng = random.Random(0)
    gain = [rng.randrange(20) for _ in range(80)]
    cost = [rng.randrange(20) for _ in range(80)]
    ranks = pareto.ranks(gain, cost)

    def dominates(i, j):
        return gain[i] >= gain[j] and cost[i] <= cost[j] and (gain[i], cost[i]) != (gain[j], cost[j])

    for j in range(80):
        dominators = [ranks[i] for i in range(80) if dominates(i, j)]
        assert ranks[j] == (max(dominators) + 1 if dominators else 0)


def test_a_tie_in_top1_is_broken_by_held_out_loss_then_the_string():
    rows = [{"arch": "a", "top1": 90.0, "loss": 0.5, "flops": 2}, {"arch": "b", "top1": 90.0, "loss": 0.3, "flops": 2},
            {"arch": "c", "top1": 91.0, "loss": 0.9, "flops": 3}, {"arch": "d", "top1": 90.0, "loss": 0.3, "flops": 1}]
    assert [r["arch"] for r in pareto.by_top1(rows)] == ["c", "b", "d", "a"]
    # Pareto: b (90, loss 0.3) now beats a (90, loss 0.5) at the same cost; d beats both (cheaper)
    assert pareto.ranks(pareto.gain(rows), [r["flops"] for r in rows]) == [2, 1, 0, 0]
    assert [r["arch"] for r in pareto.front(rows, "flops")] == ["d", "c"]


def test_the_loss_objective_orders_by_held_out_loss_then_top1_then_the_string():
    rows = [{"arch": "a", "top1": 90.0, "loss": 0.5}, {"arch": "b", "top1": 89.0, "loss": 0.3},
            {"arch": "c", "top1": 91.0, "loss": 0.9}, {"arch": "d", "top1": 90.0, "loss": 0.3},
            {"arch": "e", "top1": 90.0, "loss": 0.3}]
    assert [r["arch"] for r in pareto.best_first(rows, "loss")] == ["d", "e", "b", "a", "c"]
    assert pareto.best_first(rows, "top1") == pareto.by_top1(rows) == pareto.best_first(rows, "pareto")

