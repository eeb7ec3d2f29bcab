"""An exclusive lock on a file beside a store, for processes on one machine."""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


# Not ".lock": Optuna's journal storage uses "<journal>.lock" for its own lock, as a symlink.
LOCK_SUFFIX = ".harness-lock"


@contextlib.contextmanager
def file_lock(path: str | Path | None, create: bool = True):
    """Hold an exclusive flock on ``path`` (created if missing); no-op for None. ``create`` False: a
    lock file that is not there is held by no one, and is not made (a command that may yet be
    refused leaves nothing behind)."""
    if path is None:
        yield
        return
    try:
        handle = open(path, "a" if create else "r")
    except FileNotFoundError:
        if create:
            raise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
