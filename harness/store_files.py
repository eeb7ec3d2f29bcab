"""Files of a local MLflow store, read in place: the SQLite database where this process cannot write
beside it, and a run's artifact in its folder. Imports neither mlflow nor SQLAlchemy."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

# MLflow's own check: an id it refuses goes through MLflow, so that its message stays the same.
RUN_ID = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")


class StoreError(Exception):
    def __init__(self, message: str, error_code: str = "INTERNAL_ERROR"):
        super().__init__(message)
        self.error_code = error_code  # as on MlflowException, so that tracking.missing reads both


def run_id_refused(run_id: str) -> str | None:
    """Why MLflow refuses ``run_id`` as a run id, or None: said as the user's input (MLflow's own
    refusal reads as a store failure)."""
    if RUN_ID.match(run_id):
        return None
    shown = repr(run_id) if len(run_id) <= 80 else f"{run_id[:60]!r}... ({len(run_id)} characters)"
    return (f"{shown} is not a run id: MLflow's run ids are a letter or digit, then up to 255 letters, digits, "
            "'_' or '-' (the 32 hex digits MLflow prints)")


def not_made(path: str | Path) -> bool:
    """Whether no store is at ``path`` yet: no file, or one of no bytes. Opening it would make one."""
    return not Path(path).exists() or empty_file(path)


def empty_file(path: str | Path) -> bool:
    """Whether ``path`` is a file of no bytes: no SQLite database yet, which SQLAlchemy opens as a new
    one (MLflow or Optuna then writes its whole schema into it, so a reader must not open it)."""
    try:
        return Path(path).stat().st_size == 0 and Path(path).is_file()
    except OSError:
        return False


def artifact_file(folder: Path, path: str, run_id: str) -> Path:
    """The artifact's own file in the run's artifact folder, read in place; a path or link out of
    the folder, a FIFO, device or folder is refused before anything opens it."""
    target = (folder / path).resolve()
    if not target.is_relative_to(folder.resolve()):  # MLflow refuses a path or link out of it too
        raise StoreError(f"artifact {path!r} of run {run_id} is outside the run's artifact folder")
    if not stat.S_ISREG(target.stat().st_mode):
        raise StoreError(f"artifact {path!r} of run {run_id} is not a regular file")
    return target


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
