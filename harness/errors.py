"""Errors the CLI turns into one line on stderr and exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names the bad value and what is allowed."""
