"""Who runs a trial, and whether that process still lives."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from ...schema import FAIL_REASON_ATTR, WORKER_ATTR
from ..experimental import experimental_ok


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (Linux): the state first."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for it."""
    fields = _stat(pid)
    return fields[19] if fields else None


def identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}


def is_identity(worker) -> bool:
    """Whether ``worker`` is a record identity() writes: a host, a positive pid and a start time (None
    where the system keeps none)."""
    return (isinstance(worker, dict) and isinstance(worker.get("host"), str) and bool(worker["host"])
            and type(worker.get("pid")) is int and worker["pid"] > 0
            and isinstance(worker.get("started"), (str, type(None))))


def alive(worker: dict | None) -> bool | None:
    """True or False for a worker on this host; None when it runs elsewhere (or is unknown).

    A worker record is the journal's, which anyone who can write the study can forge: on this host it
    names a live worker only when its pid is a process's (0 and negative pids name process groups,
    which signal 0 always reaches) started at the time the record says (init, or a reused pid, is
    always there to be signalled)."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return None
    if not is_identity(worker):
        return False
    pid = worker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: its start time says whether it is the worker
    except OverflowError:  # a pid past what the system takes
        return False
    fields = _stat(pid)
    if fields is None:
        # No /proc here (not Linux): the signal is all there is to go by; with one, the process is gone.
        return _stat(os.getpid()) is None
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: signal 0 still reaches it
        return False
    return worker.get("started") == fields[19]


# A harness storage writes the owner in the same write that creates a trial (storages.py), and right
# after it takes a queued one; a RUNNING trial without one is from a process killed between those two
# writes, or from a harness before that (whose batch asked K trials before writing any owner). Such
# a trial is dead once it is older than any of those windows could be; an hour also leaves a
# trial of a plain Optuna script sharing the storage, which never writes an owner, that long.
OWNERLESS_S = 3600


def gone(trial) -> bool:
    """Whether a RUNNING trial's worker is known to be dead: its process on this host is gone, or it
    has had no owner for longer than OWNERLESS_S."""
    from datetime import datetime

    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker is not None:
        # A record no worker writes ("junk", {}, another shape) names no worker that could be alive.
        return not is_identity(worker) or alive(worker) is False
    started = trial.datetime_start
    if started is None:
        return False
    now = datetime.now(started.tzinfo)  # journal storages give UTC, RDB ones local time without a zone
    return (now - started).total_seconds() > OWNERLESS_S


def abandoned(trials) -> set[int]:
    """Numbers of the FAIL trials whose configuration was queued again: their runs are closed as FAILED."""
    from optuna.trial import TrialState

    trials = list(trials)
    return {t.number for t in trials if t.state == TrialState.FAIL} & retried_numbers(trials)

# Failures that say nothing about the configuration: it is run again. Any other reason (a
# diverged loss, the experiment's code raising) is the configuration's own result.
WORKER_DIED = "worker died"
INTERRUPTED = "interrupted"
UNFINISHED_REASONS = (INTERRUPTED, WORKER_DIED, "tracking failed", "journal write failed")


def unfinished_reason(reason: str | None) -> bool:
    """True for a failure that stopped a trial from outside (a FAIL with no reason recorded: its
    first write already failed, so nothing about it is known)."""
    return reason is None or reason.split(":", 1)[0] in UNFINISHED_REASONS


def unfinished(trials) -> list:
    """The FAIL trials stopped from outside whose configuration is not queued again yet."""
    from optuna.trial import TrialState

    trials = list(trials)
    retried = retried_numbers(trials)
    return [t for t in trials if t.state == TrialState.FAIL and t.number not in retried
            and unfinished_reason(t.user_attrs.get(FAIL_REASON_ATTR))]


def earlier_attempts(trial) -> list[int]:
    """The numbers of the trials whose configuration ``trial`` (a FrozenTrial) runs again, oldest
    first: Optuna's retry history of it (an int list; the journal is a file anyone may have edited)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    with experimental_ok():
        history = Retry.retry_history(trial)
    return [n for n in history if type(n) is int] if isinstance(history, list) else []


def retried_numbers(trials) -> set[int]:
    """Every trial whose configuration was queued again. Optuna's retry of a retry keeps the first
    trial's number as ``failed_trial``; each trial retried along the way is in ``retry_history``."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    with experimental_ok():
        numbers = set()
        for t in trials:
            history = Retry.retry_history(t)
            numbers.add(Retry.retried_trial_number(t))
            if isinstance(history, list):  # the journal is a file anyone may have edited
                numbers.update(n for n in history if isinstance(n, int))
    return numbers - {None}


def retry(study, trial) -> bool:
    """Queue ``trial``'s configuration again the way Optuna's retry callbacks do (so Optuna's
    ``retried_trial_number`` finds it), unless it already is; returns whether one was queued."""
    from .retries import Retry

    if trial.number in retried_numbers(study.get_trials(deepcopy=False)):
        return False
    with experimental_ok():
        Retry()(study, trial)
    return True
