"""Who runs a trial, and whether that process still lives."""
from __future__ import annotations

import os
import socket
from pathlib import Path

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


def abandoned(trials) -> set[int]:
    """Numbers of the FAIL trials whose worker died: Optuna's retry callbacks point back at them."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    failed = {t.number for t in trials if t.state == TrialState.FAIL}
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", ExperimentalWarning)
        retried = {RetryFailedTrialCallback.retried_trial_number(t) for t in trials}
    return failed & retried
