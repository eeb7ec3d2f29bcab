"""Issue 26, an eleventh probe (F1): every spelling of a store's path that SQLAlchemy opens names the
same file when the harness opens that store itself (a read-only reader, the fast predict path, the
store template's copy), through an SQLite ``file:`` URI it builds.

`sqlite://///tmp/x/mlflow.db` (SQLAlchemy reads the database as `//tmp/x/mlflow.db`, which POSIX takes
for `/tmp/x/mlflow.db`) became `file://tmp/x/mlflow.db`, whose `tmp` SQLite reads as a host: compare,
audit, predict and reproduce of a read-only store exited 1 "invalid uri authority".
"""
import sqlite3
from contextlib import closing

import pytest

from harness import tracking
from harness.urls import sqlite_file_uri, sqlite_path, sqlite_uri_url

# Folder names SQLite's URI or SQLAlchemy's URL read specially ('%' decoded, '?' and '#' end a path).
FOLDERS = ["plain", "a b", "p%41ct", "q?x", "h#y", "~", "mixed %3F?#&=;"]
# How a URL may name m.db in FOLDER: ABS is the absolute path of the test's folder, without its '/'.
SPELLINGS = ["sqlite:////ABS/FOLDER/m.db", "sqlite://///ABS/FOLDER/m.db", "sqlite:////ABS/./FOLDER/./m.db",
             "sqlite:////ABS/FOLDER/../FOLDER/m.db", "sqlite:///FOLDER/m.db", "sqlite:///./FOLDER//m.db",
             "sqlite+pysqlite://///ABS/FOLDER/m.db?timeout=5",
             "sqlite:///file:FOLDER/m.db?uri=true", "sqlite:///file:////ABS/FOLDER/m.db?uri=true"]


def url_of(spelling: str, tmp_path, folder: str) -> str:
    from urllib.parse import quote

    # As a user writes the folder in a URL: SQLAlchemy decodes %xx and '?' ends its path; an SQLite
    # URI inside it decodes %xx once more.
    named = quote(quote(folder, safe=""), safe="") if "file:" in spelling else quote(folder, safe=" ~#&=;")
    return spelling.replace("/ABS", quote(str(tmp_path))).replace("FOLDER", named)


def sqlalchemy_opens(url: str):
    """The connection SQLAlchemy's pysqlite dialect makes of ``url``."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    (filename,), kwargs = parsed.get_dialect()().create_connect_args(parsed)
    return sqlite3.connect(filename, uri=kwargs.get("uri", False))


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_file_uri_the_harness_builds_opens_the_file_sqlalchemy_opens(spelling, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / folder).mkdir()
    url = url_of(spelling, tmp_path, folder)
    with closing(sqlalchemy_opens(url)) as db, db:
        db.execute("CREATE TABLE made (url)")
        db.execute("INSERT INTO made VALUES (?)", (url,))
    assert [p.name for p in (tmp_path / folder).iterdir()] == ["m.db"]  # the file the spelling names

    path = sqlite_path(url)
    for flags in ("mode=ro", "mode=ro&immutable=1"):
        with closing(sqlite3.connect(sqlite_file_uri(path, flags), uri=True)) as db:
            assert db.execute("SELECT url FROM made").fetchall() == [(url,)]
        with closing(sqlalchemy_opens(sqlite_uri_url(path, flags))) as db:
            assert db.execute("SELECT url FROM made").fetchall() == [(url,)]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                db.execute("CREATE TABLE written (x)")
    assert [p.name for p in (tmp_path / folder).iterdir()] == ["m.db"]


@pytest.mark.parametrize("spelling", ["sqlite://///ABS/FOLDER/mlflow.db", "sqlite+pysqlite://///ABS/FOLDER/mlflow.db",
                                      "sqlite:////ABS/./FOLDER/../FOLDER/mlflow.db"])
def test_a_store_opened_read_only_is_read_in_any_spelling_of_its_path(spelling, tmp_path, migrated_db, monkeypatch):
    """What `compare`, `audit` and `reproduce` open where the store's folder cannot be written (as
    root every folder can: the folder's verdict is the one thing stood in for), and the fast reader
    of `predict` (which opens every store through a ``file:`` URI)."""
    from conftest import new_store
    from harness import store_files
    from harness.fast.local_store import LocalStore

    folder = tmp_path / "mixed %3F?#"
    folder.mkdir()
    new_store(folder, migrated_db)
    url = url_of(spelling, tmp_path, folder.name)
    monkeypatch.setattr(store_files, "read_only_flags", lambda path: "mode=ro&immutable=1")
    client = tracking.read_client(url)
    assert tracking.read_only(client)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert LocalStore.open(url, "0" * 32) is not None
    # Nothing made beside it (a '?' cut the path short, and a new store was made at the piece).
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"] and list(tmp_path.iterdir()) == [folder]
