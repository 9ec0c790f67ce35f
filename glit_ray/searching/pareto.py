"""Ranking candidates: by held-out top-1, by held-out loss, or by Pareto rank over (top-1, cost) as NSGA-II does.

Held-out top-1 on a few hundred images takes few distinct values, so candidates equal in top-1 are
ranked by held-out loss (lower first), a finer signal of the same held-out pass; then by the
architecture string, so that the order is a function of the scores alone. The Pareto objective
breaks ties in top-1 the same way: of two candidates equal in top-1, the lower loss is the better.

A candidate dominates another when it is no worse on both (top-1 at least as high, cost at most as
low) and better on one. Rank 0 is the front (dominated by none), rank 1 the front once rank 0 is
removed, and so on; within a rank, the crowding distance (the perimeter of the box to its
neighbours, normalised per objective; infinite at the ends) prefers candidates in sparse regions
of the front. Selection takes the lowest rank first, then the largest crowding distance.
"""
from __future__ import annotations

import numpy as np


def by_top1(rows: list[dict]) -> list[dict]:
    """Rows best first by top-1, then held-out loss, then architecture string: best.json's order and the searcher's."""
    return sorted(rows, key=lambda r: (-r["top1"], r["loss"], r["arch"]))


def by_loss(rows: list[dict]) -> list[dict]:
    """Rows best first by held-out loss (lower first), then top-1, then architecture string: the order of
    `--objective loss`, finer than top-1 on a few hundred held-out images (P13b)."""
    return sorted(rows, key=lambda r: (r["loss"], -r["top1"], r["arch"]))


def best_first(rows: list[dict], objective: str) -> list[dict]:
    """Rows in the order a search of `objective` calls best: by held-out loss for "loss", else by top-1 (a Pareto
    search's single best, best.json's head, is its best top-1)."""
    return by_loss(rows) if objective == "loss" else by_top1(rows)


def gain(rows: list[dict]) -> list[int]:
    """Each row's place in the order of (top-1, -loss): top-1 with ties broken by held-out loss, as a number that the
    Pareto ranking compares (rows equal in both share a place)."""
    keys = [(r["top1"], -r["loss"]) for r in rows]
    place = {key: i for i, key in enumerate(sorted(set(keys)))}
    return [place[key] for key in keys]


def ranks(gain: list[float], cost: list[float]) -> list[int]:
    """The non-dominated rank of each point (higher `gain` and lower `cost` are better)."""
    gain, cost = np.asarray(gain, dtype=float), np.asarray(cost, dtype=float)
    no_worse = (gain[:, None] >= gain[None, :]) & (cost[:, None] <= cost[None, :])
    better = (gain[:, None] > gain[None, :]) | (cost[:, None] < cost[None, :])
    dominates = no_worse & better  # [i, j]: i dominates j
    dominated_by = dominates.sum(axis=0)
    rank = np.full(len(gain), -1)
    front, level = np.flatnonzero(dominated_by == 0), 0
    while front.size:
        rank[front] = level
        dominated_by = dominated_by - dominates[front].sum(axis=0)
        front, level = np.flatnonzero((dominated_by == 0) & (rank < 0)), level + 1
    return rank.tolist()


def crowding(gain: list[float], cost: list[float]) -> list[float]:
    """NSGA-II's crowding distance of each point of one front."""
    points = np.column_stack([np.asarray(gain, dtype=float), np.asarray(cost, dtype=float)])
    distance = np.zeros(len(points))
    for objective in points.T:
        order = np.argsort(objective, kind="stable")
        span = objective[order[-1]] - objective[order[0]]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0 and len(points) > 2:
            distance[order[1:-1]] += (objective[order[2:]] - objective[order[:-2]]) / span
    return distance.tolist()


def select(rows: list[dict], count: int, cost: str) -> list[dict]:
    """The `count` best rows by (rank, -crowding) over (`gain`, rows[cost]); ties by architecture string."""
    if not rows:
        return []
    rank = ranks(gain(rows), [r[cost] for r in rows])
    distance = [0.0] * len(rows)
    for level in set(rank):
        members = [i for i, r in enumerate(rank) if r == level]
        for i, d in zip(members, crowding([rows[i]["top1"] for i in members], [rows[i][cost] for i in members])):
            distance[i] = d
    order = sorted(range(len(rows)), key=lambda i: (rank[i], -distance[i], rows[i]["arch"]))
    return [rows[i] for i in order[:count]]


def front(rows: list[dict], cost: str) -> list[dict]:
    """The rows of rank 0, by increasing cost (then decreasing top-1)."""
    if not rows:
        return []
    rank = ranks(gain(rows), [r[cost] for r in rows])
    return sorted((r for r, k in zip(rows, rank) if k == 0), key=lambda r: (r[cost], -r["top1"], r["arch"]))
