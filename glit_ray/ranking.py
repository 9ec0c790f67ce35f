"""How well the supernet's order of architectures agrees with their order trained on their own.

A one-shot search is only as good as this agreement (`../shared/reference/supernet-trust.md`): the field reports
Kendall tau-b and Spearman rho between supernet and standalone accuracy, with bootstrap intervals over the
architectures, the same tau within the supernet's top fifth (where a search operates, and where agreement is known to
collapse), and precision at k (how many of the supernet's top-k are in the standalone top-k).
"""
from __future__ import annotations

import math
import random

from scipy import stats

TOP_SHARE = 0.2  # the supernet's top fifth
RESAMPLES = 2000


def kendall(a: list[float], b: list[float]) -> float:
    """Kendall tau-b (ties counted as scipy counts them); NaN when either side is constant."""
    return float(stats.kendalltau(a, b).statistic)


def spearman(a: list[float], b: list[float]) -> float:
    return float(stats.spearmanr(a, b).statistic)


def interval(a: list[float], b: list[float], statistic, resamples: int = RESAMPLES,
             seed: int = 0) -> tuple[float, float]:
    """The bootstrap 95 % interval of `statistic(a, b)`: the pairs resampled with replacement, the 2.5th and 97.5th
    percentiles of the statistic (resamples where it is undefined left out)."""
    rng, n = random.Random(seed), len(a)
    values = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        value = statistic([a[i] for i in picks], [b[i] for i in picks])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return math.nan, math.nan
    values.sort()
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]


def precision_at_k(supernet: list[float], standalone: list[float], k: int) -> float:
    """The share of the supernet's top-k that are in the standalone top-k (ties broken by position)."""
    def top(scores):
        return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])

    return len(top(supernet) & top(standalone)) / k


def agreement(supernet: list[float], standalone: list[float], k: int, seed: int = 0) -> dict:
    """Every figure of the agreement between two scorings of the same architectures (same order)."""
    if len(supernet) != len(standalone) or len(supernet) < 3:
        raise ValueError("the agreement needs the same architectures scored both ways, at least 3 of them")
    top = sorted(range(len(supernet)), key=lambda i: -supernet[i])[:max(3, math.ceil(TOP_SHARE * len(supernet)))]
    return {
        "architectures": len(supernet),
        "kendall_tau": kendall(supernet, standalone),
        "kendall_tau_95": interval(supernet, standalone, kendall, seed=seed),
        "spearman_rho": spearman(supernet, standalone),
        "spearman_rho_95": interval(supernet, standalone, spearman, seed=seed),
        "top_kendall_tau": kendall([supernet[i] for i in top], [standalone[i] for i in top]),
        "top_architectures": len(top),
        "precision_at_k": precision_at_k(supernet, standalone, k),
        "k": k,
    }
