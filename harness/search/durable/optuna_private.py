"""Every use of Optuna's private API, in one place. tests/test_optuna_private.py fails loudly when one
of them changes; constraints.txt pins Optuna to a release it passed on (pyproject.toml admits any
Optuna 5: a hook this Optuna lacks is not installed, see storages.py).

Why each is needed (Optuna has no public way to do these):
- ``RDBStorage._create_new_trial``: what Optuna's cache wrapper calls to create a trial; a trial
  names its worker in that very write (storages.py says why), so the harness's must sit there.
- ``RDBStorage._get_stale_trial_ids``: what ``fail_stale_trials`` asks for the trials whose heartbeat
  is late; a live worker's trial on this machine is taken out of it there (storages.py).
- the journal file backend's lock and ``get_lock_file``: a repair (journal.py) must hold the very
  lock Optuna's own appends take.
- the journal's ``JournalOperation`` codes and ``JournalStorageReplayResult``: a line is checked against
  the operations this Optuna replays, and replayed as it would be, before it is trusted (journal.py).
- ``Study._thread_local.in_optimize_loop`` and ``Study._stop_flag``: ``study.stop()`` (GridSampler's
  ``after_trial`` calls it once its grid is used up) raises outside ``Study.optimize``'s loop, in the
  middle of ``tell``, before the trial's state is written; the harness's loop runs trials as that loop
  does, and stops when asked as it does.
- the journal file lock's suffixes: a journal's name must leave room for them (study.py).
- ``_CachedStorage._backend``, ``JournalStorage._backend`` and its ``_file_path``, ``study._storage``, ``FrozenTrial._trial_id``: to reach the storage
  a study or trial lives in, and to set a finished trial's state (audit --fix).
"""
from __future__ import annotations

import contextlib

CREATE_TRIAL_HOOK = "_create_new_trial"
STALE_TRIALS_HOOK = "_get_stale_trial_ids"


def has_hook(cls, name: str) -> bool:
    """Whether Optuna's ``cls`` has the private method ``name`` that the harness replaces (it is
    replaced only then: see storages.py)."""
    return callable(getattr(cls, name, None))


def journal_lock(file_backend):
    """A context manager holding the journal file's own lock (the one Optuna's appends take)."""
    from optuna.storages.journal._file import get_lock_file

    return get_lock_file(file_backend._lock)


def journal_lock_suffixes() -> tuple[str, str]:
    """What Optuna's journal file backend appends to a journal's name for its lock (a symbolic
    link), and to the lock's name after a uuid4 when it renames it on release."""
    from optuna.storages.journal._file import LOCK_FILE_SUFFIX, RENAME_FILE_SUFFIX

    return LOCK_FILE_SUFFIX, RENAME_FILE_SUFFIX


def journal_lock_names(path: str) -> tuple[str, str]:
    """The lock Optuna's journal file backend makes beside ``path`` (a symbolic link), and the
    longest name it makes there (the lock renamed on release)."""
    lock_suffix, rename_suffix = journal_lock_suffixes()
    lock = path + lock_suffix
    return lock, lock + "x" * 36 + rename_suffix  # a uuid4's 36 characters


def journal_operations():
    from optuna.storages.journal._storage import JournalOperation

    return JournalOperation


def replay_result():
    """An empty replay of a journal, as JournalStorage keeps it: apply_logs applies operations."""
    import uuid

    from optuna.storages.journal._storage import JournalStorageReplayResult

    return JournalStorageReplayResult(f"{uuid.uuid4()}-")  # a worker id no line has: none is "its own"


def storage_of(study):
    return study._storage


def backend(storage):
    """The storage itself, out of Optuna's cache wrapper if it is in one."""
    from optuna.storages._cached_storage import _CachedStorage

    return storage._backend if isinstance(storage, _CachedStorage) else storage


def journal_log(storage):
    """The log backend of a JournalStorage (None for another storage)."""
    from optuna.storages import JournalStorage

    storage = backend(storage)
    return storage._backend if isinstance(storage, JournalStorage) else None


def journal_file(storage) -> str | None:
    """The file a JournalStorage's file backend writes (None for another backend)."""
    return getattr(storage._backend, "_file_path", None)


def trial_id(trial) -> int:
    return trial._trial_id


@contextlib.contextmanager
def optimize_loop(study):
    """This thread runs the study's trials as ``Study.optimize``'s loop does (the flag is per thread):
    a ``study.stop()`` from a sampler or callback is taken, not refused mid-``tell``."""
    local = study._thread_local
    before, local.in_optimize_loop = local.in_optimize_loop, True
    try:
        yield
    finally:
        local.in_optimize_loop = before


def stop_asked(study) -> bool:
    """Whether ``study.stop()`` was called since ``clear_stop``."""
    return bool(study._stop_flag)


def clear_stop(study) -> None:
    """What ``Study.optimize`` does when it starts: a stop asked of an earlier loop is not this one's."""
    study._stop_flag = False
