"""Who runs a trial, and whether that process still lives."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import stat
import threading
from datetime import datetime
from pathlib import Path

from ...errors import HarnessError, first_line
from ...numbers import natural
from ...user_cache import user_cache
from ...schema import FAIL_REASON_ATTR, PROCESS_TAG, WORKER_ATTR
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


# A worker proves it is the process its record names by holding, for its whole life, an exclusive
# lock on a file named by its pid and start time: the kernel drops the lock when the process ends
# (kill -9 included), and a record anyone wrote (the journal and a run's tags are writable by whoever
# runs the study) names a live worker only when a process holds its lease. A folder that no other
# user can take first or clean away: under the user's cache (a folder named in /tmp can be made first
# by another user, who then blocks every search; /tmp cleaners remove what a long search holds; a session's
# $XDG_RUNTIME_DIR is removed at logout while a nohup'd search still runs); one per host, as a home
# may be shared by several machines. The cache is found from the environment ($XDG_CACHE_HOME), which
# two shells of one user may set apart: a record names the folder its lease is in, and a checker
# looks there.
def _lease_root() -> Path | None:
    """The folder of this host's leases; None where no cache folder is known (harness.user_cache)."""
    cache = user_cache()
    return None if cache is None else cache / "harness" / "leases" / socket.gethostname()


LEASES = _lease_root()
_leases: dict[int, int] = {}  # pid -> the open lease of this process (a forked child takes its own)
_leases_lock = threading.Lock()


def _lease_folder() -> Path:
    if LEASES is None:
        raise HarnessError("no folder to keep this process's lease in (where the harness's processes prove they "
                           "live): this user has no home folder; set XDG_CACHE_HOME to a folder of yours")
    try:
        LEASES.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        LEASES.mkdir(mode=0o700, exist_ok=True)
        found = os.stat(LEASES, follow_symlinks=False)
    except OSError as exc:
        raise HarnessError(f"cannot make {LEASES}, where the harness's processes prove they live: "
                           f"{first_line(exc)}") from None
    if not _private(found):
        raise HarnessError(f"{LEASES} must be a folder of yours that only you can enter (mode 0700), where "
                           "the harness's processes prove they live: it is not; remove it")
    return LEASES


def _private(found: os.stat_result) -> bool:
    return stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid() and not stat.S_IMODE(found.st_mode) & 0o077


def _lease_name(pid, started) -> str:
    return f"{pid}-{started}"


def _lease_owner(name: str) -> int | None:
    """The pid of the lease ``name`` (as _lease_name writes it); None for any other name: left alone."""
    owner, _, when = name.partition("-")
    pid = natural(owner)
    if pid is None or name != _lease_name(pid, when) or (when != "None" and natural(when) is None):
        return None
    return pid


def _hold_lease(pid: int, started: str | None) -> None:
    with _leases_lock:
        if pid in _leases:
            return
        folder = _lease_folder()
        for old in folder.iterdir():  # leases of processes gone: their pid and start time never come back
            owner = _lease_owner(old.name)
            if owner is not None and old.name != _lease_name(owner, _start_time(owner)):
                with contextlib.suppress(OSError):  # not a file (a folder made there): not a lease, left
                    old.unlink(missing_ok=True)
        lease = folder / _lease_name(pid, started)
        try:
            fd = os.open(lease, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            raise HarnessError(f"cannot hold {lease}, where this process proves it lives: {first_line(exc)}; "
                               "it must be a plain file or nothing") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise HarnessError(f"cannot hold {lease}, where this process proves it lives: it is not a plain "
                               "file; remove it")
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a checker tries it
        _leases[pid] = fd


def _leased(pid: int, started: str | None, folder: Path | None) -> bool:
    """Whether a process holds the lease of (pid, started) in ``folder``: a lease this process can
    take is nobody's, and one in a folder not as _lease_folder keeps it (this user's, 0700) none of
    this user's processes took."""
    if folder is None:
        return False
    try:
        if not _private(os.stat(folder, follow_symlinks=False)):
            return False
        # Never blocking on what is there: a FIFO would hold the open until someone writes to it.
        fd = os.open(folder / _lease_name(pid, started), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (OSError, ValueError):  # ValueError: a NUL in a recorded folder
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def identity() -> dict:
    """This process's worker record; from the first one on, this process holds its lease."""
    pid = os.getpid()
    started = _start_time(pid)
    _hold_lease(pid, started)
    return {"host": socket.gethostname(), "pid": pid, "started": started, "leases": str(LEASES)}


MAX_FOLDER = 4096  # characters: PATH_MAX


def is_identity(worker) -> bool:
    """Whether ``worker`` is a record identity() writes: exactly a host, a positive pid, a start
    time (None where the system keeps none) and, from 2026-12-07 on, its lease folder (an absolute
    path; before, the checker's own)."""
    return (isinstance(worker, dict) and worker.keys() in ({"host", "pid", "started"},
                                                            {"host", "pid", "started", "leases"})
            and isinstance(worker["host"], str) and bool(worker["host"])
            and type(worker["pid"]) is int and worker["pid"] > 0
            and isinstance(worker["started"], (str, type(None)))
            and ("leases" not in worker or _folder(worker["leases"]) is not None))


def _folder(recorded) -> Path | None:
    """A recorded lease folder: an absolute path of at most MAX_FOLDER characters, else None."""
    if isinstance(recorded, str) and 0 < len(recorded) <= MAX_FOLDER and os.path.isabs(recorded) \
            and "\0" not in recorded:
        return Path(recorded)
    return None


def alive(worker) -> bool | None:
    """True or False for a worker on this host; None for a record of a worker on another host.

    A worker record is the journal's (or a run's tag), which anyone who can write the study can forge:
    a record of no shape identity() writes names no worker; on this host one names a live worker only
    when its process, started at the time the record says (init, or a reused pid, is always there),
    holds its lease; another user's, whose lease this user cannot open, when it is a harness process
    (_harness_process)."""
    if not is_identity(worker):
        return False
    if worker["host"] != socket.gethostname():
        return None
    pid = worker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: its start time says whether it is the one recorded
    except OverflowError:  # a pid past what the system takes
        return False
    fields = _stat(pid)
    if fields is None:
        # No /proc here (not Linux), where identity() knows no start time; with one, the process is gone.
        if _stat(os.getpid()) is not None or worker["started"] is not None:
            return False
    elif fields[0] in ("Z", "X") or worker["started"] != fields[19]:
        return False  # killed, not yet reaped (signal 0 still reaches it), or another process on that pid
    if _owner(pid) not in (None, os.getuid()):
        # Another user's process (a study shared by several users): its lease is in that user's folder,
        # which only that user may enter. What this user can see of it proves it a harness process.
        return _harness_process(pid)
    return _leased(pid, worker["started"], _folder(worker["leases"]) if "leases" in worker else LEASES)


# How a harness process is started: the `harness` console script (the kernel runs its interpreter
# with the script's path next) or `python -m harness`.
_INTERPRETER = re.compile(rb"(python|pypy)[0-9.]*")
_MODULE = re.compile(rb"harness(\..+)?")


def _harness_process(pid: int) -> bool:
    """Whether another user's process is provably a harness process: its command line is the harness's
    (/proc/PID/cmdline, which any user may read, where /proc/PID/exe is its owner's only) and it holds
    an exclusive flock, as every harness process holds its lease from its first record on (/proc/locks
    names the holder's pid). Init, a shell, sshd or cron of another user is neither."""
    try:
        if not harness_command(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")):
            return False
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    # "ID: FLOCK  ADVISORY  WRITE PID DEVICE:INODE START END"; a waiter's line has "->" after the ID.
    return any(line.split()[1:5] == ["FLOCK", "ADVISORY", "WRITE", str(pid)] for line in locks)


def harness_command(argv: list[bytes]) -> bool:
    """Whether a command line is the harness's: an interpreter running the `harness` script or
    ``-m harness`` (a module of it)."""
    if len(argv) < 2 or not _INTERPRETER.fullmatch(os.path.basename(argv[0])):
        return False
    return os.path.basename(argv[1]) == b"harness" or any(
        (arg == b"-m" and _MODULE.fullmatch(after)) or (arg.startswith(b"-m") and _MODULE.fullmatch(arg[2:]))
        for arg, after in zip(argv[1:], argv[2:] + [b""]))


def _owner(pid: int) -> int | None:
    """The uid a process runs as (None where /proc does not say)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


# A harness storage writes the owner in the same write that creates a trial (storages.py), and right
# after it takes a queued one; a RUNNING trial without one is from a process killed between those two
# writes, or from a harness before that (whose batch asked K trials before writing any owner). Such
# a trial is dead once it is older than any of those windows could be; an hour also leaves a
# trial of a plain Optuna script sharing the storage, which never writes an owner, that long. A
# `harness train` run gets its process's record in the write after the one that creates it.
OWNERLESS_S = 3600
NO_RECORD = object()  # the attr or tag that names an owner is not there at all


def owner_gone(record, started: datetime | None) -> bool:
    """Whether the worker a RUNNING trial's or run's ``record`` names is known to be dead: its record
    names no live worker of this host, or it has none (NO_RECORD) and is older than OWNERLESS_S (or
    of no known age). A record of another host's worker is left to that host (RDB heartbeats)."""
    if record is not NO_RECORD:
        return alive(record) is False
    if started is None:
        return True
    now = datetime.now(started.tzinfo)  # journal storages give UTC, RDB ones local time without a zone
    return (now - started).total_seconds() > OWNERLESS_S


def process_record(tags: dict):
    """The record of the process a run or logged model names in its PROCESS_TAG (tags are untrusted):
    the tag's JSON, its text where that is none, NO_RECORD without the tag."""
    import json

    text = tags.get(PROCESS_TAG)
    if text is None:
        return NO_RECORD
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: brackets nested past what json reads
        return text


def gone(trial) -> bool:
    """Whether a RUNNING trial's worker is known to be dead (owner_gone)."""
    return owner_gone(trial.user_attrs.get(WORKER_ATTR, NO_RECORD), trial.datetime_start)


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
