import random

import pytest

from glit_ray.core.errors import UserError
from glit_ray.models.constraints import Limits, sample_within
from glit_ray.models.cost import Cost, arch_cost, cost_range


def test_limits_are_closed_bounds_in_millions():
    limits = Limits(flops_min=10, flops_max=20, params_max=1)
    assert limits.admits(Cost(10_000_000, 1_000_000)) and limits.admits(Cost(20_000_000, 0))
    assert not limits.admits(Cost(9_999_999, 0)) and not limits.admits(Cost(15_000_000, 1_000_001))
    assert Limits().admits(Cost(10**12, 10**12))
    assert str(limits) == "flops-min 10M, flops-max 20M, params-max 1M"


def test_sampling_within_limits_meets_them_and_is_not_degenerate(micro):
    low, high = cost_range(micro, "high", 10)
    middle = (low.flops + high.flops) / 2e6
    limits = Limits(flops_max=middle)
    rng = random.Random(0)
    archs = [sample_within(micro, "high", rng, limits, 10) for _ in range(100)]
    assert all(arch_cost(micro, a, 10).flops <= middle * 1e6 for a in archs)
    assert len(set(archs)) > 50


@pytest.mark.parametrize("limits, message", [
    (Limits(flops_max=1), "no architecture of glit_micro (high level) meets flops-max 1M: its flops range is"),
    (Limits(params_min=100), "its params range is"),
    (Limits(flops_min=30, flops_max=20), "--flops-min 30M is above --flops-max 20M"),
])
def test_infeasible_limits_are_refused_up_front(micro, limits, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        limits.check_feasible(micro, "high", 10)


def test_feasible_limits_pass(micro):
    low, high = cost_range(micro, "high", 10)
    Limits(flops_max=low.flops / 1e6, params_min=low.params / 1e6).check_feasible(micro, "high", 10)


def test_hopeless_rejection_sampling_gives_up_with_a_message(tiny):
    low, _ = cost_range(tiny, "high", 1000)
    # feasible in range terms, but met only by the smallest of 4^12 architectures
    limits = Limits(flops_max=low.flops / 1e6)
    limits.check_feasible(tiny, "high", 1000)
    with pytest.raises(UserError, match="random draws from glit_tiny met none of the limits"):
        sample_within(tiny, "high", random.Random(0), limits, 1000)


def test_limits_can_be_read_in_the_authors_flops_convention(tiny):
    # 1,300 M: the paper's limit for Tiny, in the authors' formula, which counts less than ours;
    # the low level of the published distribution
    limits, published = Limits(flops_max=1300, convention="glit"), (3, 0, 1, 3, 0, 1, 3, 1, 0, 3, 0, 3)
    archs = [sample_within(tiny, "low", random.Random(s), limits, 1000, published) for s in range(40)]
    assert all(arch_cost(tiny, a, 1000, convention="glit").flops <= 1300e6 for a in archs)
    assert any(arch_cost(tiny, a, 1000).flops > 1300e6 for a in archs)
    low_ours, _ = cost_range(tiny, "high", 1000)
    low_theirs, _ = cost_range(tiny, "high", 1000, convention="glit")
    middle = (low_ours.flops + low_theirs.flops) / 2e6
    Limits(flops_max=middle, convention="glit").check_feasible(tiny, "high", 1000)
    with pytest.raises(UserError, match=r"no architecture of glit_tiny .*\(glit FLOPs\)"):
        Limits(flops_max=0.9 * low_theirs.flops / 1e6, convention="glit").check_feasible(tiny, "high", 1000)
    with pytest.raises(UserError, match="no architecture of glit_tiny"):
        Limits(flops_max=middle).check_feasible(tiny, "high", 1000)
