"""What every `python -m glit_ray.*` entry point shares: bad input ends in one line and exit code 2, and the
caller keeps its Ctrl-C handler across the Ray Train and Tune runs behind it."""
from __future__ import annotations

import argparse
import dataclasses
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


def described(default, help: str) -> dataclasses.Field:
    """A settings field's `default` with the `help` its command-line option shows (`add_setting`)."""
    return dataclasses.field(default=default, metadata={"help": help})


def like(settings: type, name: str) -> dataclasses.Field:
    """A field that is `settings`' field `name` again (its default and help), in another settings class."""
    same = settings.__dataclass_fields__[name]
    return dataclasses.field(default=same.default, metadata=same.metadata)


def add_setting(parser: argparse.ArgumentParser, flag: str, settings: type, name: str | None = None, **kwargs) -> None:
    """The option `flag` of `settings`' field `name` (default: the flag's own name): its default and help the
    field's (`described`), each written once, on the settings; a default of None is the help's to explain."""
    field = settings.__dataclass_fields__[name or flag.removeprefix("--").replace("-", "_")]
    default = "" if field.default is None else " (default: %(default)s)"  # None: the help says what it means
    parser.add_argument(flag, default=field.default, help=field.metadata["help"] + default, **kwargs)
