"""What every `python -m glit_ray.*` entry point shares: bad input ends in one line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import UserError, one_line


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Call `main(argv)`; a UserError prints `error: <message>` on stderr and exits with code 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line and exit code 2, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")
