"""What every `python -m glit_ray.*` entry point shares: bad input ends in one line and exit code 2, and the
caller keeps its Ctrl-C handler across the Ray Train and Tune runs behind it."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from glit_ray.core.errors import UserError, one_line


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Call `main(argv)`; a UserError prints `error: <message>` on stderr and exits with code 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def callers_signal_handlers() -> Iterator[None]:
    """Put the caller's Ctrl-C (and SIGUSR1) handlers back when a Ray Train or Tune run ends.

    Both install their own for a run and leave them installed: Ray Train's holds the run's controller
    actor, which then outlives the run, and Tune's turns the next Ctrl-C into a warning about a run
    that is over. In a process that goes on (a notebook, a sweep) Ctrl-C must interrupt again."""
    signals = (signal.SIGINT, signal.SIGUSR1) if threading.current_thread() is threading.main_thread() else ()
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line and exit code 2, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def default(settings: type, name: str):
    """The default a settings class gives its field `name`: what the command line's option defaults to."""
    return settings.__dataclass_fields__[name].default
