"""A read-only view of one run in MLflow's SQLite store, for `harness predict`.

Importing mlflow and opening its SqlAlchemyStore is ~3 s of a 5 s predict, which needs only the
run's row and two files of its artifact folder. This reads them with the stdlib ``sqlite3``, and
only where it is known to read MLflow's tables right (see ``LocalStore.open``); anywhere else the
caller takes an MlflowClient.
"""
from __future__ import annotations

import os
import re
import sqlite3
import stat
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

from .. import compat
from ..urls import local_folder, sqlite_path

# MLflow's own check: an id it refuses goes through MLflow, so that its message stays the same.
RUN_ID = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")


class StoreError(Exception):
    def __init__(self, message: str, error_code: str = "INTERNAL_ERROR"):
        super().__init__(message)
        self.error_code = error_code  # as on MlflowException, so that tracking.missing reads both


ERRORS = (StoreError, sqlite3.Error)  # what get_run raises for a missing run or a failing store


class LocalStore:
    """The part of MlflowClient's interface that harness.runs uses to load a model."""

    def __init__(self, tracking_uri: str, connection: sqlite3.Connection):
        self.tracking_uri = tracking_uri
        self._db = connection

    @classmethod
    def open(cls, tracking_uri: str, run_id: str) -> LocalStore | None:
        """A reader for ``run_id``, or None where an MlflowClient must read it: not an existing
        SQLite file, an MLflow version or schema revision not tested, an id MLflow refuses, or a
        run whose artifacts are not in a local folder."""
        store = sqlite_path(tracking_uri)
        if store is None or not RUN_ID.match(run_id) or not compat.mlflow_tested():
            return None
        path = Path(store)
        if not path.is_file():
            return None  # read_client says so, and creates nothing
        try:
            # mode=ro: never creates, migrates or writes the store.
            flags = read_only_flags(path) or "mode=ro"
            db = sqlite3.connect(f"file:{quote(str(path))}?{flags}", uri=True, timeout=30)
        except sqlite3.Error:
            return None
        try:
            reader = cls(tracking_uri, db)
            revision = db.execute("SELECT version_num FROM alembic_version").fetchall()
            row = reader._row(run_id)
            tested = len(revision) == 1 and compat.schema_tested(revision[0][0])
            if tested and (row is None or _local_folder(row[2]) is not None):
                return reader
        except sqlite3.Error:  # damaged, locked, not MLflow's: MLflow's own message says which
            pass
        db.close()
        return None

    def _row(self, run_id: str):
        return self._db.execute("SELECT run_uuid, lifecycle_stage, artifact_uri, experiment_id, status "
                                "FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()

    def get_run(self, run_id: str):
        row = self._row(run_id)
        if row is None:
            raise StoreError(f"Run with id={run_id} not found", "RESOURCE_DOES_NOT_EXIST")
        params = dict(self._db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
        info = SimpleNamespace(run_id=row[0], lifecycle_stage=row[1], artifact_uri=row[2],
                               experiment_id=str(row[3]), status=row[4])
        return SimpleNamespace(info=info, data=SimpleNamespace(params=params))

    def download_artifacts(self, run_id: str, path: str, dst_path: str | None = None) -> str:
        """The artifact's own file, not a copy in ``dst_path``: callers only read it, and check its
        size first. A FIFO, device or folder is refused before anything opens it."""
        row = self._row(run_id)
        folder = _local_folder(row[2]) if row else None
        if folder is None:
            raise StoreError(f"run {run_id} has no local artifact folder")
        return str(artifact_file(folder, path, run_id))


def artifact_file(folder: Path, path: str, run_id: str) -> Path:
    """The artifact's own file in the run's artifact folder, read in place; a path or link out of
    the folder, a FIFO, device or folder is refused before anything opens it."""
    target = (folder / path).resolve()
    if not target.is_relative_to(folder.resolve()):  # MLflow refuses a path or link out of it too
        raise StoreError(f"artifact {path!r} of run {run_id} is outside the run's artifact folder")
    if not stat.S_ISREG(target.stat().st_mode):
        raise StoreError(f"artifact {path!r} of run {run_id} is not a regular file")
    return target


def _local_folder(uri: str) -> Path | None:
    """The folder of an artifact URI that is a local absolute path (``file:///...`` or ``/...``) and
    exists, else None. With a '%' MLflow would unquote the path first: that case stays with MLflow."""
    folder = local_folder(uri) if uri.startswith(("file:///", "/")) and "%" not in uri else None
    return folder if folder is not None and folder.is_dir() else None


def stranded_wal(path: Path) -> str | None:
    """Why SQLite cannot read the store at ``path`` from this process, or None: its last commits wait
    in its -wal file with no -shm beside it (a copy taken while a writer ran), and its folder cannot
    be written to make one. SQLite reads a -wal only through a -shm; opened without it, the store
    would lack those commits."""
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    if os.access(path.parent, os.W_OK) or shm.exists() or not (wal.is_file() and wal.stat().st_size):
        return None
    return (f"its last commits are in {wal.name}, which SQLite reads only through a {shm.name} beside it, and "
            f"{str(path.absolute().parent)!r} cannot be written to make one: copy {path.name} and {wal.name} together to a "
            "folder you can write, and read the copy")


def read_only_flags(path: Path) -> str | None:
    """The SQLite URI parameters that open the store at ``path`` for reading where this process
    cannot write beside it (a read-only mount, an archive, another user's folder), else None.

    Every store the harness makes is in WAL mode, and SQLite reads a WAL file only through its -shm
    file, which it cannot create there: without a -wal holding commits, the file alone is the whole
    store and opens as immutable; with one, read-only (which works where the -shm is there too)."""
    if os.access(path.parent, os.W_OK) and os.access(path, os.W_OK):
        return None
    wal = Path(f"{path}-wal")
    if os.access(path.parent, os.W_OK) or (wal.is_file() and wal.stat().st_size):
        return "mode=ro"
    return "mode=ro&immutable=1"
