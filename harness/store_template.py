"""A new MLflow SQLite store in a tenth of a second instead of ~2 s: a copy of an empty store that
this machine's MLflow made before.

MLflow builds a new store by running every one of its schema migrations, ~2 s here: a third of a
short search's fixed cost (benchmarks/search_overhead.py). Where they end is the same for every
store of one MLflow release, so the first store made for a user is kept as a template in their
cache folder (``$XDG_CACHE_HOME/harness``, else ``~/.cache/harness``), without its Default
experiment (MLflow makes that one on opening a store that lacks it, with the artifact location it
gives any new store), and
later new stores start as a copy of it: the same tables, indexes and rows MLflow's migrations give.

Only on the MLflow release of ``harness.compat``, and only a template whose whole content (schema,
triggers, indexes and rows) hashes to that release's empty store (``compat.MLFLOW_EMPTY_STORE_SHA256``;
tests/test_store_template.py compares a copy with a store MLflow made, table for table). A template
that is not a regular file of this user, in a folder only this user can write, or is larger than
``MAX_BYTES``, or anything else, is not used: MLflow makes the store, and a good template is saved.
"""
from __future__ import annotations

import os
import secrets
import sqlite3
import stat
import tempfile
from contextlib import closing, suppress
from pathlib import Path

from . import compat
from .user_cache import user_cache
from .urls import sqlite_file_uri

MAX_BYTES = 16 * 2 ** 20  # an empty store of MLflow 3.17 is ~1 MB


def path() -> Path | None:
    cache = user_cache()
    if cache is None:
        return None
    return cache / "harness" / f"mlflow-{compat.installed('mlflow')}-{compat.MLFLOW_SCHEMA_REVISION}.db"


def usable(store: str) -> bool:
    """Whether the store file ``store`` (an ``sqlite:///`` path) is one a template may start or
    become: a plain file path in an existing folder, not there yet, on a tested MLflow."""
    return (store not in ("", ":memory:") and not store.startswith("file:") and not Path(store).exists()
            and Path(store).absolute().parent.is_dir() and compat.mlflow_tested())


def start_from_template(store: str) -> bool:
    """Put a copy of the template at ``store`` (which must not exist: ``usable``). False, with
    nothing written, where there is no good template."""
    template = path()
    if template is None:
        return False
    try:
        info = template.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or not _mine_alone(info) or info.st_size > MAX_BYTES \
            or not _private(template.parent):
        return False
    if not is_the_empty_store(template):
        return False
    target = Path(store).absolute()
    scratch = target.parent / f".{target.name}.{secrets.token_hex(8)}"
    try:
        # The mode SQLite gives a database it creates (0644, less the umask), as MLflow's would have.
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as out, open(template, "rb") as source:
            while chunk := source.read(2 ** 20):
                out.write(chunk)
        os.link(scratch, target)  # never over a store another process made meanwhile
    except OSError:
        return False
    finally:
        with suppress(OSError):
            os.unlink(scratch)
    return True


def _private(folder: Path) -> bool:
    """A folder of this user that no one else may write (so no one else can put a template there)."""
    try:
        info = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and _mine_alone(info)


def _mine_alone(info: os.stat_result) -> bool:
    """Owned by this user, and writable by no one else."""
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def keep_as_template(store: str) -> None:
    """Save the store MLflow just made at ``store`` (nothing logged to it yet) as the template,
    without its Default experiment. Best effort: a cache folder that cannot be written changes nothing."""
    template = path()
    if template is None:
        return
    try:
        template.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(prefix=".template.", dir=template.parent)
        os.close(fd)
    except OSError:
        return
    try:
        # SQLite's backup: a consistent copy of a store in WAL mode, whatever its -wal file holds.
        with closing(sqlite3.connect(sqlite_file_uri(store, "mode=ro"), uri=True)) as source, \
                closing(sqlite3.connect(scratch)) as copy:
            source.backup(copy)
            copy.execute("DELETE FROM experiment_tags")
            copy.execute("DELETE FROM experiments")
            copy.commit()
            copy.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it; a new store is put in WAL again
            copy.execute("VACUUM")
        if is_the_empty_store(Path(scratch)):
            os.replace(scratch, template)
    except (OSError, sqlite3.Error):
        pass
    finally:
        with suppress(OSError):
            os.unlink(scratch)


def fingerprint(file: Path) -> str | None:
    """The sha256 of everything in the store at ``file``: its schema (tables, indexes, triggers, views)
    and every row of every table. None where it is not an SQLite database."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with closing(sqlite3.connect(sqlite_file_uri(file, "mode=ro"), uri=True)) as db:
            # MLflow's migrations write a table's constraints in an order that differs run to run (a
            # set's): each statement's lines are compared as a sorted list.
            schema = sorted((kind, name, table, sorted(line.strip().rstrip(",") for line in sql.splitlines()))
                            for kind, name, table, sql in
                            db.execute("SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master"))
            digest.update(repr(schema).encode())
            for name in (row[1] for row in schema if row[0] == "table"):
                rows = db.execute(f'SELECT * FROM "{name}"').fetchall()
                digest.update(repr((name, sorted(map(repr, rows)))).encode())
    except sqlite3.Error:
        return None
    return digest.hexdigest()


def is_the_empty_store(file: Path) -> bool:
    """The template is exactly the empty store of the tested release, byte for byte in what it holds:
    a trigger, an index or a row anyone added (a poisoned cache) makes it another one."""
    return fingerprint(file) == compat.MLFLOW_EMPTY_STORE_SHA256
