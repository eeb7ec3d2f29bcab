"""Optuna's own storages, each trial naming its worker from its first write; and the lock every
worker of a study takes (held while --max-trials is checked and a trial asked, see loop.py, and while
the study's parent run is found or created): PostgreSQL's advisory lock (MySQL's GET_LOCK) on the
storage's own database, or a lock file beside a SQLite database or a journal file.

A trial names its worker (WORKER_ATTR) in the very write that creates it, or takes it from the queue:
``study.ask()`` runs the sampler's ``before_trial`` after that write, and a worker killed there (a
slow sampler; a batch asks K trials before any trains) must leave a trial the next search and
`audit --fix` know to be dead (workers.gone), not one with no owner, left alone for an hour.
tests/test_reliability.py's kill -9 while a batch is asked fails without it (docs/design.md).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import TrialState

from ...filelock import LOCK_SUFFIX, file_lock
from ...urls import redact, sqlite_in_memory, sqlite_path
from ...schema import WORKER_ATTR
from . import optuna_private
from .optuna_private import backend
from .workers import alive, identity


class _Owned:
    def _create_owned(self, create, study_id: int, template_trial):
        # A template is someone's trial already (enqueued by the user, a retry): it stays as it is.
        return create(study_id, _owned() if template_trial is None else template_trial)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        taken = super().set_trial_state_values(trial_id, state, values)
        if taken and state == TrialState.RUNNING:  # a queued trial taken by this process
            self.set_trial_user_attr(trial_id, WORKER_ATTR, identity())
        return taken


def _owned():
    from optuna.trial import create_trial

    return create_trial(state=TrialState.RUNNING, user_attrs={WORKER_ATTR: identity()})


class HarnessRDBStorage(_Owned, RDBStorage):
    """RDBStorage whose trials name their worker, and whose heartbeat check spares a live one's."""


def _create_new_trial(self, study_id, template_trial=None):
    # Optuna's cache (_CachedStorage) calls the backend's private creation method; the public one does too.
    return self._create_owned(getattr(super(HarnessRDBStorage, self), optuna_private.CREATE_TRIAL_HOOK),
                              study_id, template_trial)


def _get_stale_trial_ids(self, study_id: int) -> list[int]:
    # A heartbeat late by more than the grace (a worker starved of CPU, a slow database) is not a
    # dead worker: a trial whose worker runs on this machine and lives is never failed as stale,
    # whichever worker checks (the search loop checks before every trial it asks).
    stale = getattr(super(HarnessRDBStorage, self), optuna_private.STALE_TRIALS_HOOK)(study_id)
    return [i for i in stale if alive(self.get_trial_user_attrs(i).get(WORKER_ATTR)) is not True]


# Only where this Optuna has them: a method of that name that Optuna no longer calls would do
# nothing. Without the creation hook, loop.ask names the worker right after Optuna's ask returns.
for _name, _method in ((optuna_private.CREATE_TRIAL_HOOK, _create_new_trial),
                       (optuna_private.STALE_TRIALS_HOOK, _get_stale_trial_ids)):
    if optuna_private.has_hook(RDBStorage, _name):
        setattr(HarnessRDBStorage, _name, _method)


class HarnessJournalStorage(_Owned, JournalStorage):
    """JournalStorage whose trials name their worker (through its public creation method)."""

    def create_new_trial(self, study_id, template_trial=None):
        return self._create_owned(super().create_new_trial, study_id, template_trial)


def file_path(storage) -> str | None:
    """The file a file-based storage lives in (a journal file or a SQLite database); None otherwise."""
    storage = backend(storage)
    if isinstance(storage, JournalStorage):
        return optuna_private.journal_file(storage)
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "sqlite":
        return _sqlite_file(storage.url)
    return None


def _sqlite_file(url: str) -> str | None:
    return None if sqlite_in_memory(url) else sqlite_path(url)


def _lock_beside(path: str | None) -> Path | None:
    return Path(path + LOCK_SUFFIX) if path else None


def lock_file(storage) -> Path | None:
    """The lock file of a file-based storage; None otherwise."""
    return _lock_beside(file_path(storage))


def study_lock(storage, name: str, create: bool = True):
    """A lock every worker of the storage takes, wherever it runs. On a database server ``name``
    picks one of many; a file storage has one lock file for every name, so never nest two.

    Held while a worker checks --max-trials and asks a trial (loop.ask), and while it finds or
    creates the study's parent MLflow run, so that exactly one is created. A storage with no shared lock (in-memory, gRPC)
    gets none: its workers live in one process anyway. ``create`` False: a lock file that is not
    there is not made (filelock.file_lock).
    """
    storage = backend(storage)
    path = lock_file(storage)
    if path is not None:
        return file_lock(path, create)
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name in ("postgresql", "mysql"):
        return _database_lock(storage.engine, name)
    return nullcontext()


@contextmanager
def _database_lock(engine, name: str):
    """A session-level lock on the database server, released even if this process dies (the server
    drops a dead connection's locks), so a killed worker never blocks the others."""
    from sqlalchemy import text

    key = "harness:" + name
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as connection:
        if postgres:
            number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": number})
        else:
            connection.execute(text("SELECT GET_LOCK(:k, -1)"), {"k": key[:64]})
        try:
            yield
        finally:
            if postgres:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": number})
            else:
                connection.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": key[:64]})
            connection.commit()


@contextmanager
def schema_lock(url: str, engine_kwargs: dict):
    """Held while Optuna creates or upgrades its tables: workers that open a fresh database at the
    same moment would otherwise race to create them (PostgreSQL: duplicate key on pg_type)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() == "sqlite":
        with file_lock(_lock_beside(_sqlite_file(url))):
            yield
        return
    engine = create_engine(url, **engine_kwargs)
    try:
        with _database_lock(engine, "schema"):
            yield
    finally:
        engine.dispose()


def describe(storage) -> str:
    """Where a study lives (password removed), for a study opened by the user's own script."""
    storage = backend(storage)
    if getattr(storage, "url", None):
        return redact(storage.url)
    path = file_path(storage)
    return f"journal:{path}" if path else type(storage).__name__
