"""Has the supernet learnt? Its last probes against chance, before anything is searched on it.

A search ranks candidates by their top-1 with inherited weights; on a supernet whose paths score at chance that
ranking is noise, and the "best" architecture is a draw. Supernet training scores fixed probe paths on held-out
images every few epochs (`supernet_loop.PathSampler.probes`); the verdict reads the last round.

Learnt when the median probe stands clear of chance (the majority class's share of the probes' held-out images) by
more than the noise of a top-1 measured on that many images (3 binomial standard errors, and at least MIN_MARGIN
points) and by more than half the probes' own spread: a supernet where one path learnt and the others sit at
chance ranks those others at random.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass

MIN_MARGIN = 5.0  # top-1 points above chance, at the least
STANDARD_ERRORS = 3.0


@dataclass(frozen=True)
class Verdict:
    probes: dict[str, float]  # probe path -> held-out top-1 (%)
    chance: float  # top-1 (%) of always answering the probes' held-out set's majority class
    images: int  # held-out images each probe was scored on

    @property
    def median(self) -> float:
        return statistics.median(self.probes.values())

    @property
    def spread(self) -> float:
        return max(self.probes.values()) - min(self.probes.values())

    @property
    def needed(self) -> float:
        """The median top-1 a learnt supernet's probes reach, at the least."""
        p = self.chance / 100
        noise = 100 * STANDARD_ERRORS * math.sqrt(p * (1 - p) / max(self.images, 1))
        return self.chance + max(noise, MIN_MARGIN, self.spread / 2)

    @property
    def learnt(self) -> bool:
        return self.median >= self.needed

    def evidence(self) -> str:
        """The figures the verdict rests on, for a console line."""
        low, high = min(self.probes.values()), max(self.probes.values())
        return (f"its {len(self.probes)} probe paths score {low:.1f}-{high:.1f}% (median {self.median:.1f}%) on "
                f"{self.images:,} held-out images, chance is {self.chance:.1f}%, a learnt supernet's median is at "
                f"least {self.needed:.1f}%")

    def line(self) -> str:
        """train_supernet's last line."""
        return f"verdict: {'learnt' if self.learnt else 'NOT learnt'}: {self.evidence()}"

    def as_dict(self) -> dict:
        return {**asdict(self), "median": self.median, "needed": self.needed, "learnt": self.learnt}


def chance_of(labels: list[int]) -> float:
    """Top-1 (%) of always answering the most frequent of `labels`."""
    return 100 * max(Counter(labels).values()) / len(labels)


def of_meta(meta: dict) -> Verdict | None:
    """The verdict a supernet file's meta gives (`save_supernet`'s `probe_top1`, `probe_chance`, `probe_images`);
    None when it has no probe record (saved by hand, or before the probes were kept)."""
    if not meta.get("probe_top1") or "probe_chance" not in meta:
        return None
    return Verdict(dict(meta["probe_top1"]), meta["probe_chance"], meta["probe_images"])
