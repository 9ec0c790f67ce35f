"""Progress bars for work running in Ray workers, drawn on the driver's terminal.

Ray's tqdm_ray redraws every bar it knows on each update; on a terminal that is a live display,
in a log file it is a flood of lines. So bars are drawn only when the driver's stderr is a
terminal, and the work always prints one summary line per epoch or generation as well.
"""
from __future__ import annotations

import sys

from ray.experimental.tqdm_ray import tqdm


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def driver_has_terminal() -> bool:
    return sys.stderr.isatty()


def bar(total: int, desc: str, enabled: bool):
    """A tqdm_ray bar when `enabled` (pass `driver_has_terminal()` from the driver), else a no-op."""
    return tqdm(total=total, desc=desc) if enabled else _NoBar()
