"""Errors the CLI turns into one line on stderr, without a traceback, and the one way to shorten an
exception into such a line."""


def first_line(exc: BaseException | None, limit: int = 300) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters; its type's name where the
    message is empty (a bare ``KeyError()``)."""
    text = str(exc).strip() if exc is not None else ""
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def described(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line``, for an exception raised by code the user wrote, where the type is half
    of what went wrong (``ZeroDivisionError: division by zero``)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__


def closest(value, allowed, cutoff: float = 0.6) -> str | None:
    """The allowed value closest to ``value`` (difflib's ratio of at least ``cutoff``), or None."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=cutoff)
    return close[0] if close and isinstance(value, str) else None


def did_you_mean(value, allowed) -> str:
    """`` (did you mean 'x'?)`` for a value close to one allowed, else ""."""
    close = closest(value, allowed)
    return f" (did you mean {close!r}?)" if close else ""


class UsageError(ValueError):
    """Bad input from the user (exit status 2): the message names the bad value and what is allowed."""


class HarnessError(RuntimeError):
    """Something the user must know about that is not their input (exit status 1)."""


class ExperimentCodeError(RuntimeError):
    """The experiment's own code (its model, loss, metrics, step) raised while a run trained: that run
    fails with this one line as its reason, and a search goes on with its next trial."""


class ExperimentExit(ExperimentCodeError):
    """The experiment's own code raised a BaseException that is neither an error nor an interrupt
    (``sys.exit()``, its own class): the run fails with it as any, and the command ends there (exit
    1): a search does not go on, since the code asked to stop."""


def asked_to_stop(exc: BaseException, what: str) -> ExperimentExit | None:
    """A BaseException out of the experiment's code that is no error and no interrupt (``sys.exit()``,
    a class of its own) as the one line ``what Type: message`` that ends the command (ExperimentExit);
    None for an error or an interrupt, which keep their handling."""
    if isinstance(exc, (Exception, KeyboardInterrupt)):
        return None
    return ExperimentExit(f"{what} {described(exc)}")


def experiment_exit(exc: BaseException, epoch: int) -> ExperimentExit | None:
    """``asked_to_stop`` for a run that trained ``epoch`` epochs: where its training stopped, or its
    figures were drawn after the last epoch."""
    return asked_to_stop(exc, f"the experiment's code raised at epoch {epoch}:")


def shown(names, most: int = 8, width: int = 40) -> str:
    """Names for a message, each and the list cut short: a name may be anything an experiment made."""
    cut = [repr(n if len(n) <= width else n[:width] + "...") for n in map(str, list(names)[:most])]
    return ", ".join(cut) + (f" and {len(names) - most} more" if len(names) > most else "") if cut else "none"
