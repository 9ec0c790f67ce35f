"""The driver's console: our own lines, and progress bars for work running in Ray workers.

Ray's tqdm_ray redraws every bar it knows on each update; on a terminal that is a live display,
in a log file it is a flood of lines. So bars are drawn only when the driver's stderr is a
terminal, and the work always prints one summary line per epoch or generation as well.

Of what Ray forwards from workers to a command's console, only our workers' lines (`say`) and
the bars print (`ray_workarounds.apply`); Ray's own warnings and the tracebacks of errors that
reach the driver as one line stay in Ray's log files (`/tmp/ray/session_latest/logs`).
"""
from __future__ import annotations

import sys

from rich.console import Console

LOG_WIDTH = 160  # columns of rich's output when it goes to a file or a pipe (a log), where lines are not re-wrapped
WORKER_LINE = "[glit_ray] "  # how a worker's own line (`say`) starts, so that the driver tells it from Ray's


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def driver_has_terminal() -> bool:
    return sys.stderr.isatty()


def bar(total: int, desc: str, enabled: bool):
    """A tqdm_ray bar when `enabled` (pass `driver_has_terminal()` from the driver), else a no-op."""
    if not enabled:
        return _NoBar()
    from ray.experimental.tqdm_ray import tqdm  # here: the model layer (`import glit_ray`) imports no Ray

    return tqdm(total=total, desc=desc)


def console(stderr: bool = True) -> Console:
    """Where our own lines go: rich on a terminal, and lines wide enough not to be folded in a log."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=True, width=None if stream.isatty() else LOG_WIDTH)


def say(line: str) -> None:
    """Print a line from a Ray worker for the driver's console. It goes to the process's own stdout, once (Ray
    Train patches `print` in its workers to log a line and echo it too)."""
    print(WORKER_LINE + line, file=sys.__stdout__, flush=True)
