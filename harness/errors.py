"""Errors the CLI turns into one line on stderr, without a traceback."""


def did_you_mean(value, allowed) -> str:
    """`` (did you mean 'x'?)`` for a value close to one allowed, else ""."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1) if isinstance(value, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


class UsageError(ValueError):
    """Bad input from the user (exit status 2): the message names the bad value and what is allowed."""


class HarnessError(RuntimeError):
    """Something the user must know about that is not their input (exit status 1)."""
