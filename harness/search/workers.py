"""Who runs a trial, whether that process still lives, and a lock shared by the workers of a study."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from ..filelock import LOCK_SUFFIX, file_lock

WORKER_ATTR = "harness.worker"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}


def alive(worker: dict | None) -> bool | None:
    """True or False for a worker on this host; None when it runs elsewhere (or is unknown)."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return None
    pid = worker.get("pid")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError):
        return None if not isinstance(pid, int) else True
    return worker.get("started") in (None, _start_time(pid))


def lock_path(storage_url: str) -> Path | None:
    """A lock file beside a file-based storage; None for server storages (they arbitrate themselves)."""
    scheme, _, rest = storage_url.partition(":")
    if scheme == "journal":
        return Path(rest + LOCK_SUFFIX)
    if scheme == "sqlite" and rest.startswith("///"):
        return Path(rest[3:] + LOCK_SUFFIX)
    return None


def study_lock(storage_url: str):
    """Held while a worker finds or creates the study's parent run, so that exactly one is created."""
    return file_lock(lock_path(storage_url))
