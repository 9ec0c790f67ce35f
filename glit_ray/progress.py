"""The driver's console: our own lines, and progress bars for work running in Ray workers.

Ray's tqdm_ray redraws every bar it knows on each update; on a terminal that is a live display,
in a log file it is a flood of lines. So bars are drawn only when the driver's stderr is a
terminal, and the work always prints one summary line per epoch or generation as well.

Of what Ray forwards from workers to the driver, the console shows only our workers' lines
(`say`) and the bars; Ray's own warnings and the tracebacks of errors that reach the driver as one
line stay in Ray's log files (`/tmp/ray/session_latest/logs`). So do two notes Ray prints on the
driver about its own machinery: the raylet's on many worker start-ups (`without_startup_notes`)
and the core worker's on restartable actors' arguments (`stderr_without`, around creating them).
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC, tqdm
from rich.console import Console

LOG_WIDTH = 160  # columns of rich's output when it goes to a file or a pipe (a log), where lines are not re-wrapped
STARTUP_NOTE = "maximum expected startup concurrency"  # in the raylet's "N PYTHON worker processes have been started"
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
    return tqdm(total=total, desc=desc) if enabled else _NoBar()


def console(stderr: bool = True) -> Console:
    """Where our own lines go: rich on a terminal, and lines wide enough not to be folded in a log."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=True, width=None if stream.isatty() else LOG_WIDTH)


def say(line: str) -> None:
    """Print a line from a Ray worker for the driver's console. It goes to the process's own stdout, once (Ray
    Train patches `print` in its workers to log a line and echo it too)."""
    print(WORKER_LINE + line, file=sys.__stdout__, flush=True)


def show_only_our_worker_lines() -> None:
    """On a driver that forwards worker output (`ray.init(log_to_driver=True)`), print only our workers' lines
    and tqdm_ray's bars: Ray's handler is replaced by ours under its name. Of the raylet's messages, all but its
    note on worker start-ups (`without_startup_notes`)."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _print_our_lines)
    if not getattr(ray_worker.print_to_stdstream, "quiet", False):  # the error listener looks it up at each message
        ray_worker.print_to_stdstream = without_startup_notes(ray_worker.print_to_stdstream)


def without_startup_notes(print_to_stdstream):
    """Ray's printer of the raylet's messages on the driver, less its note that many worker processes are starting
    at once (a Tune trial's Ray Train run starts five); the note stays in the raylet's log, and its other messages
    (a worker killed for memory, a request no node can hold) still print."""
    def print_messages(data: dict, ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if STARTUP_NOTE not in line]
        if lines:
            print_to_stdstream({**data, "lines": lines}, ignore_prefix)

    print_messages.quiet = True
    return print_messages


@contextmanager
def stderr_without(marker: str):
    """Hold back what the process writes to its stderr (fd 2, Ray's C++ logging too) inside the block, then
    write it out without the lines holding `marker`. For a line Ray's core worker logs on the driver's console
    and in its own log file (python-core-driver-*.log) alike: the file keeps it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            os.write(2, b"".join(line for line in held if marker.encode() not in line))


def _print_our_lines(batch: dict) -> None:
    """Ray's handler for a batch of forwarded lines, keeping ours (unprefixed) and the bars' updates."""
    from ray._private.worker import print_worker_logs

    lines = batch.get("lines", [])
    bars = [line for line in lines if RAY_TQDM_MAGIC in line]
    if bars:
        print_worker_logs({**batch, "lines": bars}, sys.stderr)
    for line in lines:
        if line.startswith(WORKER_LINE):
            print(line[len(WORKER_LINE):], file=sys.stderr, flush=True)


def quiet_tune_console() -> None:
    """Tune's new console prints its configuration box ("Number of trials 9223372036854775807") at any
    verbosity; its old one prints nothing at `verbose=0`."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
