"""A read-only view of one run in MLflow's SQLite store, for `harness predict`.

Importing mlflow and opening its SqlAlchemyStore is ~3 s of a 5 s predict, which needs only the
run's row and two files of its artifact folder. This reads them with the stdlib ``sqlite3``, and
only where it is known to read MLflow's tables right (see ``LocalStore.open``); anywhere else the
caller takes an MlflowClient.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

from .. import compat, tracking
from ..store_files import RUN_ID, StoreError, artifact_file, read_only_flags
from ..urls import local_folder, sqlite_file_uri, sqlite_path

def read_client(run_id: str, tracking_uri: str | None = None):
    """tracking.read_client() for loading one run's model (predict): on an SQLite store where it is
    known to read MLflow's tables right, a read-only reader that imports neither mlflow nor
    SQLAlchemy, seconds of a predict's start-up."""
    uri = tracking_uri or tracking.default_tracking_uri()
    tracking.check_readable_uri(uri)  # refused alike, whichever reader would read it
    return LocalStore.open(uri, run_id) or tracking.read_client(uri)


class LocalStore:
    """The part of MlflowClient's interface that harness.runs uses to load a model."""

    ERRORS = (StoreError, sqlite3.Error)  # what get_run raises for a missing run or a failing store

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
            db = sqlite3.connect(sqlite_file_uri(path, flags), uri=True, timeout=30)
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

    def artifact_in_place(self, run_id: str, path: str) -> Path:
        """The artifact's own file, as ``download_artifacts`` gives it (harness.runs reads it in place)."""
        return Path(self.download_artifacts(run_id, path))


def _local_folder(uri: str) -> Path | None:
    """The folder of an artifact URI that is a local absolute path (``file:///...`` or ``/...``) and
    exists, else None. With a '%' MLflow would unquote the path first: that case stays with MLflow."""
    folder = local_folder(uri) if uri.startswith(("file:///", "/")) and "%" not in uri else None
    return folder if folder is not None and folder.is_dir() else None
