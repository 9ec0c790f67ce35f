"""How well the supernet's order of architectures agrees with their order trained on their own.

A one-shot search is only as good as this agreement (`../shared/reference/supernet-trust.md`): the field reports
Kendall tau-b and Spearman rho between supernet and standalone accuracy, with bootstrap intervals over the
architectures, the same tau within the supernet's top fifth (where a search operates, and where agreement is known to
collapse), and precision at k (how many of the supernet's top-k are in the standalone top-k).
"""
from __future__ import annotations

import math
import random
import statistics

import numpy as np
from scipy import stats

TOP_SHARE = 0.2  # the supernet's top fifth
RESAMPLES = 2000
CHUNK = 100  # resamples a statistic takes at once in `interval`: 100 x n x n pair signs in memory


def kendall(a, b):
    """Kendall tau-b (ties counted as scipy's `kendalltau` counts them: a pair tied on one side counts in the other
    side's normaliser, one tied on both in neither) along the last axis, so that a bootstrap's resamples are one call;
    NaN where either side is constant. A float for two lists."""
    sa, sb = (np.sign(x[..., :, None] - x[..., None, :]).astype(np.int8) for x in np.broadcast_arrays(
        np.asarray(a, float), np.asarray(b, float)))
    pairs = (-2, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sa * sb).sum(pairs, dtype=np.int64) / np.sqrt(
            (sa * sa).sum(pairs, dtype=np.int64) * (sb * sb).sum(pairs, dtype=np.int64))
    return float(tau) if tau.ndim == 0 else tau


def spearman(a, b):
    """Spearman's rho (Pearson's r of the average ranks, as scipy's `spearmanr`) along the last axis; NaN where either
    side is constant. A float for two lists."""
    ra, rb = (stats.rankdata(x, axis=-1) for x in (np.asarray(a, float), np.asarray(b, float)))
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(-1) / np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    return float(rho) if rho.ndim == 0 else rho


def interval(a: list[float], b: list[float], statistic, resamples: int = RESAMPLES,
             seed: int = 0) -> tuple[float, float]:
    """The bootstrap 95 % interval of `statistic(a, b)` (`kendall` or `spearman`): the pairs resampled with
    replacement, the 2.5th and 97.5th percentiles of the statistic (resamples where it is undefined left out)."""
    rng, n = random.Random(seed), len(a)
    picks = np.array([[rng.randrange(n) for _ in range(n)] for _ in range(resamples)])
    a, b = np.asarray(a, float), np.asarray(b, float)
    values = np.concatenate([statistic(a[rows], b[rows]) for rows in np.array_split(picks, max(1, resamples // CHUNK))])
    values = np.sort(values[~np.isnan(values)])
    if not len(values):
        return math.nan, math.nan
    return float(values[int(0.025 * (len(values) - 1))]), float(values[int(0.975 * (len(values) - 1))])


def precision_at_k(supernet: list[float], standalone: list[float], k: int) -> float:
    """The share of the supernet's top-k that are in the standalone top-k (ties broken by position)."""
    def top(scores):
        return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])

    return len(top(supernet) & top(standalone)) / k


def defined(value: float) -> float | None:
    """`value`, or None where it is undefined (NaN): JSON has no NaN."""
    return None if math.isnan(value) else value


def agreement(supernet: list[float], standalone: list[float], k: int, seed: int = 0) -> dict:
    """Every figure of the agreement between two scorings of the same architectures (same order); None for one
    that is undefined (a side all ties)."""
    if len(supernet) != len(standalone) or len(supernet) < 3:
        raise ValueError("the agreement needs the same architectures scored both ways, at least 3 of them")
    top = sorted(range(len(supernet)), key=lambda i: -supernet[i])[:max(3, math.ceil(TOP_SHARE * len(supernet)))]
    return {
        "architectures": len(supernet),
        "kendall_tau": defined(kendall(supernet, standalone)),
        "kendall_tau_95": tuple(map(defined, interval(supernet, standalone, kendall, seed=seed))),
        "spearman_rho": defined(spearman(supernet, standalone)),
        "spearman_rho_95": tuple(map(defined, interval(supernet, standalone, spearman, seed=seed))),
        "top_kendall_tau": defined(kendall([supernet[i] for i in top], [standalone[i] for i in top])),
        "top_architectures": len(top),
        "precision_at_k": precision_at_k(supernet, standalone, k),
        "k": k,
    }


def networks(rows: list[dict]) -> dict[str, list[dict]]:
    """An audit table's rows by network (its architecture), one row per seed, in the table's order."""
    trained: dict[str, list[dict]] = {}
    for row in rows:
        trained.setdefault(row["arch"], []).append(row)
    return trained


def audit_verdict(rows: list[dict], k: int, baselines: tuple[str, ...], objective: str = "top1") -> dict:
    """The audit's verdict from its table's rows (one per trained network; `glit_ray.audit`): the agreement over
    the networks the supernet scored, in the order of the search's `objective` (its held-out loss, lower first, for
    "loss"; else its top-1), each network's standalone top-1 the mean over its seeds; the found
    network's (the search's rank 1) percentile among the `random` group and its margin over each group of
    `baselines`, and the seed-to-seed spread of one training beside the spread between networks."""
    nets = [{"arch": arch, "group": runs[0]["group"], "winner": runs[0]["winner"], "supernet": runs[0]["supernet_top1"],
             "supernet_loss": runs[0].get("supernet_loss"),
             "standalone": statistics.fmean(r["standalone_top1"] for r in runs),
             "sd": statistics.stdev(r["standalone_top1"] for r in runs) if len(runs) > 1 else None}
            for arch, runs in networks(rows).items()]
    scored = [n for n in nets if n["supernet"] is not None]
    verdict: dict = {"networks": len(nets), "trainings": len(rows), "by": "loss" if objective == "loss" else "top1"}
    if len(scored) >= 3:
        standalone = [n["standalone"] for n in scored]
        by = {"top1": [n["supernet"] for n in scored], "loss": [-n["supernet_loss"] for n in scored]}
        verdict.update(agreement(by[verdict["by"]], standalone, min(k, len(scored))))
        # the other order beside it: held-out loss orders finely where top-1 ties (a few hundred held-out images)
        verdict["top1_kendall_tau"] = defined(kendall(by["top1"], standalone))
        verdict["loss_kendall_tau"] = defined(kendall(by["loss"], standalone))
    winner = next(n for n in nets if n["winner"])
    verdict["winner"] = {"arch": winner["arch"], "standalone_top1": winner["standalone"],
                         "supernet_top1": winner["supernet"]}
    randoms = [n["standalone"] for n in nets if n["group"] == "random"]
    if randoms:
        below = sum(v < winner["standalone"] for v in randoms) + 0.5 * sum(v == winner["standalone"] for v in randoms)
        verdict["random"] = {"networks": len(randoms), "mean_top1": statistics.fmean(randoms), "best_top1": max(randoms),
                             "winner_percentile": 100 * below / len(randoms)}
    verdict["margin_over"] = {n["group"]: winner["standalone"] - n["standalone"] for n in nets
                              if n["group"] in baselines}
    sds = [n["sd"] for n in nets if n["sd"] is not None]
    if sds and len(nets) > 1:
        verdict["seed_sd"] = statistics.fmean(sds)
        verdict["between_networks_sd"] = statistics.stdev(n["standalone"] for n in nets)
    return verdict


def seeds_said(seeds: int, ranking_seeds: int | None) -> str:
    """An audit's trainings per network (`--seeds`, `--ranking-seeds`), as the console and the report say them."""
    if not ranking_seeds or ranking_seeds == seeds:
        return f"{seeds} seed(s)"
    return f"{seeds} seed(s) ({ranking_seeds} for the ranking's networks but the winner)"


def verdict_lines(verdict: dict) -> list[str]:
    """The audit's verdict as the console and the report say it."""
    def figure(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.2f}"

    lines = []
    if "kendall_tau" in verdict:
        (tau_lo, tau_hi), (rho_lo, rho_hi) = verdict["kendall_tau_95"], verdict["spearman_rho_95"]
        order = "held-out loss" if verdict.get("by") == "loss" else "top-1"  # (an audit.json before `by`: top-1)
        lines += [f"supernet {order} against standalone top-1 over {verdict['architectures']} networks: Kendall tau-b "
                  f"{figure(verdict['kendall_tau'])} (95 % interval {figure(tau_lo)} to {figure(tau_hi)}), Spearman "
                  f"rho {figure(verdict['spearman_rho'])} ({figure(rho_lo)} to {figure(rho_hi)})",
                  f"within the supernet's top {verdict['top_architectures']}: tau {figure(verdict['top_kendall_tau'])}; "
                  f"precision at {verdict['k']}: {round(verdict['precision_at_k'] * verdict['k'])} of the supernet's "
                  f"top {verdict['k']} are in the standalone top {verdict['k']}"]
        other = "top1" if verdict.get("by") == "loss" else "loss"
        if f"{other}_kendall_tau" in verdict:  # an audit.json written before it was added has none
            lines.insert(1, f"by the supernet's {'top-1' if other == 'top1' else 'held-out loss (lower first)'} "
                            f"instead: Kendall tau-b {figure(verdict[f'{other}_kendall_tau'])}")
    winner, found = verdict["winner"], f"found architecture: {verdict['winner']['standalone_top1']:.2f} % standalone"
    if winner["supernet_top1"] is not None:
        found += f" (supernet {winner['supernet_top1']:.2f} %)"
    if "random" in verdict:
        r = verdict["random"]
        found += (f", above {r['winner_percentile']:.0f} % of {r['networks']} random networks of its FLOPs band "
                  f"(mean {r['mean_top1']:.2f} %, best {r['best_top1']:.2f} %)")
    margins = [f"{m:+.2f} pts over the {group}" for group, m in verdict["margin_over"].items()]
    lines.append(found + ("; " + ", ".join(margins) if margins else ""))
    if "seed_sd" in verdict:
        lines.append(f"seed noise: one training's sd {verdict['seed_sd']:.2f} pts, against an sd of "
                     f"{verdict['between_networks_sd']:.2f} pts between the networks' means")
    reading = []
    if "kendall_tau" in verdict:
        low = verdict["kendall_tau_95"][0]
        reading.append("the supernet orders networks better than chance" if low is not None and low > 0 else
                       "the supernet's order cannot be told from chance over this sample")
    if "random" in verdict:
        reading.append("its find is at or above the 80th percentile of random networks of its cost"
                       if verdict["random"]["winner_percentile"] >= 80 else
                       "its find is below the 80th percentile of random networks of its cost")
    if "seed_sd" in verdict and verdict["seed_sd"] >= verdict["between_networks_sd"]:
        reading.append("one training's noise is as large as the differences between the networks: they have not "
                       "learnt enough to be told apart, so train them longer (--epochs) before trusting this order")
    if reading:
        lines.append("reading: " + "; ".join(reading))
    return lines
