"""The one exception type for bad user input.

Command-line entry points catch it and print its message as a single line (exit code 2), so every
message must name the problem and the fix.
"""


class UserError(ValueError):
    """Bad input from the user: a file, a flag or a combination of them (a ValueError to code that builds settings
    in Python)."""


def one_line(exc: UserError) -> str:
    """A UserError's message, also when a DataLoader or Ray wrapped it with the traceback it came through."""
    return str(exc).strip().splitlines()[-1].removeprefix(f"{__name__}.UserError: ")
