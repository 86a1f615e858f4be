"""Errors a user can cause.

`UserError` carries one sentence naming the bad input and the fix; the CLI prints it on
stderr and exits with status 2. Internal invariants stay `assert`s.
"""


class UserError(Exception):
    """Bad input from the user: one clear sentence, exit status 2, never a traceback."""
