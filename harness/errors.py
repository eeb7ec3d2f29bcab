"""Errors the CLI turns into one line on stderr, without a traceback."""


class UsageError(ValueError):
    """Bad input from the user (exit status 2): the message names the bad value and what is allowed."""


class HarnessError(RuntimeError):
    """Something the user must know about that is not their input (exit status 1)."""
