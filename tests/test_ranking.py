"""The ranking agreement a supernet is judged by: tau-b, rho, bootstrap intervals, the top fifth, precision at k."""
import math
import random

import pytest
import scipy.stats

from glit_ray.searching.ranking import agreement, interval, kendall, precision_at_k


def test_the_agreement_matches_a_direct_computation():
    rng = random.Random(0)
    standalone = [rng.uniform(60, 90) for _ in range(30)]
    supernet = [s / 2 + rng.gauss(0, 3) for s in standalone]  # a noisy but real ordering
    found = agreement(supernet, standalone, k=5)
    assert found["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(supernet, standalone).statistic)
    assert found["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(supernet, standalone).statistic)
    low, high = found["kendall_tau_95"]
    assert low < found["kendall_tau"] < high and 0 < low  # 30 architectures of a real ordering: clear of 0
    top = sorted(range(30), key=lambda i: -supernet[i])[:6]  # the supernet's top fifth
    assert found["top_kendall_tau"] == pytest.approx(
        scipy.stats.kendalltau([supernet[i] for i in top], [standalone[i] for i in top]).statistic)
    assert found["top_architectures"] == 6 and found["architectures"] == 30


def test_reversed_tied_and_shuffled_orders():
    assert kendall([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert precision_at_k([1, 2, 3, 4], [1, 2, 3, 4], 2) == 1 and precision_at_k([1, 2, 3, 4], [4, 3, 2, 1], 2) == 0
    assert all(math.isnan(v) for v in interval([1, 1, 1], [1, 2, 3], kendall, resamples=50))  # a constant side: no tau
    assert interval([1, 2, 3], [3, 2, 1], kendall, resamples=200, seed=1) == interval([1, 2, 3], [3, 2, 1], kendall,
                                                                                        resamples=200, seed=1)
    with pytest.raises(ValueError, match="at least 3"):
        agreement([1, 2], [1, 2], k=1)
