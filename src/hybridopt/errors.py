"""Errors a user can cause.

The library raises `ValueError` (or a subclass) with a plain message that knows nothing of the
command line. The layers that know which flag set the value (the recipes and the CLI) wrap the call
in `for_flag("--name")`, which turns it into a `UserError` naming the flag; the CLI prints that on
stderr as one line and exits with status 2. Internal invariants stay `assert`s.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    """Bad input from the user: one clear sentence, exit status 2, never a traceback."""


@contextmanager
def for_flag(name: str, *errors: type[Exception]) -> Iterator[None]:
    """Turn `errors` (default: ValueError) raised inside into a `UserError` "`name`: message"."""
    try:
        yield
    except errors or (ValueError,) as e:
        raise UserError(f"{name}: {e}") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (a bare MemoryError): what a
    one-sentence error quotes of a library's exception."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
