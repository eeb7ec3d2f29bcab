"""Issue 26, a tenth probe (F2, F3, F6): the spellings of an SQLite URL that SQLAlchemy and SQLite
read, read alike by the harness; and a libpq option libpq refuses, refused as bad input.

``sqlite+pysqlite:`` (SQLAlchemy's dialect+driver form, which MLflow takes) bypassed every check:
an in-memory store let a search start, a reading command created the store, a read-only store was
not read, a new store was made without its lock and WAL. SQLite's own spellings of its options
(``immutable=yes``, ``vfs=memdb``, keys in their case) were misread the same way. Each is compared
here with what SQLAlchemy and SQLite themselves do with the URL.
"""
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from conftest import slow_cases
from harness.urls import is_sqlite, sqlite_in_memory, sqlite_path, sqlite_unwritable

BOOLEANS = ["1", "2", "yes", "YES", "true", "True", "on", "0x1", "01", "1abc",
            "0", "256", "no", "off", "false", "full", "extra", "0x100", "99999999999", "y"]
SPELLINGS = [
    "sqlite:///m.db", "sqlite+pysqlite:///m.db", "sqlite+aiosqlite:///m.db", "sqlite:///m.db?mode=ro",
    "sqlite:///m.db?uri=true&mode=ro", "sqlite:///file:m.db?uri=false&mode=ro",
    "sqlite+pysqlite:///:memory:", "sqlite+pysqlite://", "sqlite+pysqlite:///", "sqlite+pysqlite:///?timeout=5",
    "sqlite:///file:m.db?uri=true&vfs=memdb", "sqlite:///file:m.db?uri=true&vfs=mem%64b",
    "sqlite+pysqlite:///file:m.db?uri=1&mode=memory", "sqlite:///file::memory:?uri=yes",
    "sqlite:///file:m.db?uri=true&mode=ro", "sqlite+pysqlite:///file:m.db?uri=t&mode=ro&timeout=5",
    "sqlite:///file:m.db?uri=true&MODE=ro", "sqlite:///file:m.db?uri=true&Immutable=1",
    "sqlite:///file:m.db?uri=true&immutable=1&immutable=0",
    "sqlite:///file:m.db?uri=true&vfs=unix-none", "sqlite:///file:///ABS/m.db?uri=true&immutable=on",
    *[f"sqlite:///file:m.db?uri=true&immutable={value}" for value in BOOLEANS],
]


def sqlite_opens(url: str, folder) -> str:
    """What SQLite does with ``url`` as SQLAlchemy hands it over, in ``folder`` where m.db exists:
    'memory' (a write kept in no file), 'read-only' (a write refused), or the file written."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    (filename,), kwargs = parsed.get_dialect()().create_connect_args(parsed)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    try:
        with closing(sqlite3.connect(filename, uri=kwargs.get("uri", False))) as db:
            db.execute("CREATE TABLE written (x)")
            db.commit()
    except sqlite3.OperationalError as exc:
        assert "readonly" in str(exc), exc
        return "read-only"
    changed = [p for p in folder.iterdir() if before.get(p.name) != p.stat().st_mtime_ns]
    return str(changed[0].resolve()) if changed else "memory"


@pytest.mark.filterwarnings("ignore:Query string argument")  # SQLAlchemy on a mode it ignores
@pytest.mark.parametrize("url", SPELLINGS)
def test_every_spelling_of_an_sqlite_url_is_read_as_sqlite_reads_it(url, tmp_path, monkeypatch):
    """The harness's reading of an SQLite URL (its file, in memory, read-only) is SQLite's own,
    through SQLAlchemy's pysqlite dialect: any driver, SQLAlchemy's true words for ``uri``, SQLite's
    keys in their case and every spelling of its booleans (sqlite3_uri_boolean: an integer's low
    byte, on/yes/true in any case)."""
    url = url.replace("/ABS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with closing(sqlite3.connect(tmp_path / "m.db")) as db:
        db.execute("CREATE TABLE kept (x)")
    opened = sqlite_opens(url, tmp_path)
    assert is_sqlite(url)
    if opened == "memory":
        assert sqlite_in_memory(url) and sqlite_unwritable(url)
    elif opened == "read-only":
        assert not sqlite_in_memory(url) and "read-only" in sqlite_unwritable(url)
        assert (tmp_path / sqlite_path(url)).resolve() == tmp_path / "m.db"
    else:
        assert not sqlite_in_memory(url)
        assert str((tmp_path / sqlite_path(url)).resolve()) == opened
        # Issue 26, a thirteenth probe (T4): options SQLite never read (m.db?mode=ro wrote m.db, or a
        # new file "m.db?mode=ro") are refused, with the spelling that hands them to SQLite.
        dropped = options_sqlite_never_reads(url)
        if "vfs=unix-none" in url:  # it writes the file, but opens no WAL store (test_writers_make_nothing.py)
            assert "opens no WAL database" in sqlite_unwritable(url)
            return
        assert sqlite_unwritable(url) is None if not dropped else \
            f"given SQLite options ({', '.join(dropped)})" in sqlite_unwritable(url) and "sqlite:///file:" in sqlite_unwritable(url)


def options_sqlite_never_reads(url: str) -> list[str]:
    """The query options of ``url`` that SQLite does not read as asked: SQLAlchemy's pysqlite dialect
    hands what it does not take for itself to SQLite only with uri=True, and SQLite reads a URI only
    from a filename that starts with "file:"; without uri=True, a read-only request is dropped."""
    from urllib.parse import parse_qsl, urlsplit

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    (filename,), kwargs = parsed.get_dialect()().create_connect_args(parsed)
    if kwargs.get("uri") and filename.startswith("file:"):
        return []
    taken = set(kwargs) | {"uri"}
    given = [f"{k}={v}" for k, v in parse_qsl(urlsplit(url).query) if k not in taken]
    return given if kwargs.get("uri") else [o for o in given if o in ("mode=ro", "immutable=1")]


@pytest.mark.parametrize("url", ["SQLite:///m.db", "SQLITE+pysqlite:///m.db", "postgresql://h/db", "sqlite:m.db",
                                 "file:m.db", "mysql+sqlite://h/db"])
def test_a_url_sqlalchemy_opens_with_no_sqlite_dialect_names_no_sqlite_file(url):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(url).get_dialect().name
    except (ArgumentError, NoSuchModuleError):
        dialect = None
    assert dialect != "sqlite" and not is_sqlite(url) and sqlite_path(url) is None


UNKEPT = ["sqlite+pysqlite:///:memory:", "sqlite+pysqlite://", "sqlite:///file:m.db?uri=true&vfs=memdb",
          "sqlite+pysqlite:///file:m.db?uri=1&mode=ro", *[f"sqlite:///file:imm.db?uri=true&immutable={v}"
                                                         for v in ("yes", "true", "on", "2")]]


@pytest.mark.parametrize("url", ["sqlite:///file:m.db?uri=true&mode=RO", "sqlite:///file:m.db?uri=true&cache=Shared"])
def test_an_option_value_sqlite_does_not_know_is_refused_and_sqlite_refuses_it_too(url, tmp_path, monkeypatch):
    """A mode SQLite does not know (its values are case-sensitive): MLflow retried it for 100 s, then
    exit 2 "no such access mode", with the store copied in meanwhile. Refused before anything, as SQLite would."""
    from sqlalchemy.engine import make_url

    monkeypatch.chdir(tmp_path)
    parsed = make_url(url)
    (filename,), kwargs = parsed.get_dialect()().create_connect_args(parsed)
    with pytest.raises(sqlite3.OperationalError, match="no such"):
        sqlite3.connect(filename, uri=kwargs["uri"])
    assert "which SQLite does not know" in sqlite_unwritable(url)


@pytest.mark.parametrize("url", [*UNKEPT, "sqlite+pysqlite:///file:m.db?uri=true&mode=RO"])
@pytest.mark.parametrize("command", [["search", "--n-trials", "1", "--epochs-range", "5", "6", "--study-name", "s"],
                                     ["train", "--epochs", "2"]])
def test_a_spelling_of_a_store_that_keeps_no_record_is_refused_before_anything_is_written(
        tmp_path, url, command, cli_in_process):
    """F2: the dialect form of an in-memory store started a search (exit 1 "no such table" after its
    journal and mlruns/ were written); vfs=memdb and immutable=yes left a store file behind."""
    result = cli_in_process(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert line.startswith("harness: error: MLflow store sqlite") and "use sqlite:///PATH" in line
    assert not list(tmp_path.iterdir())


READ_ONLY = ["sqlite:///file:o.db?uri=true&immutable=1", "sqlite:///file:o.db?mode=ro&uri=true",
             "sqlite+pysqlite:///file:o.db?mode=ro&uri=1&timeout=5", "sqlite:///file:o.db?uri=on&Immutable=1&immutable=yes",
             "sqlite:///file:///ABS/o.db?uri=true&immutable=0x1"]


@pytest.mark.parametrize("url", [*UNKEPT, *READ_ONLY, "sqlite+pysqlite:///file:m.db?uri=true&mode=RO",
                                 "sqlite:///file:m.db?uri=true&cache=Shared"])
@pytest.mark.parametrize("command", [["search", "--n-trials", "1", "--epochs-range", "5", "6", "--study-name", "s"],
                                     ["audit", "--study", "s", "--fix"]])
def test_an_optuna_storage_that_keeps_no_record_is_refused_before_anything_is_written(
        tmp_path, url, command, cli_in_process):
    """Issue 26, an eleventh probe (F2): `search --storage 'sqlite:///file:o.db?uri=true&immutable=1'`
    exited 2 leaving an empty o.db and its lock file (mode=ro: the lock file), where the MLflow side
    refuses the same spellings first: SQLAlchemy and the schema lock made them before SQLite said no."""
    url = url.replace("/ABS", str(tmp_path))
    result = cli_in_process(*command, "--storage", url, cwd=tmp_path)
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"harness: error: storage {url} is ") and "use sqlite:///PATH" in line, line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("url", slow_cases(READ_ONLY))  # each builds an Optuna SQLite schema
def test_an_optuna_storage_opened_read_only_is_refused_to_any_writer_and_read_by_readers(tmp_path, url, monkeypatch):
    """A writer's open_storage (the Python API's path too) refuses it; a reader's (audit without
    --fix) reads the study there, and makes no lock file beside it."""
    import optuna

    from harness.errors import UsageError
    from harness.search import study

    url = url.replace("/ABS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}").enqueue_trial({"x": 1})
    with pytest.raises(UsageError, match="opened read-only"):
        study.open_storage(url)
    storage = study.open_storage(url, repair=False)
    assert [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials] == ["WAITING"]
    assert [p.name for p in tmp_path.iterdir()] == ["o.db"]


@pytest.mark.parametrize("url", ["sqlite+pysqlite:///nothere.db", "sqlite:///file:nothere.db?uri=true",
                                 "sqlite+pysqlite:///file:nothere.db?uri=yes&mode=rw"])
@pytest.mark.parametrize("command", [["compare", "--study", "x"], ["predict", "0" * 32, "--x", "1"],
                                     ["reproduce", "0" * 32], ["audit", "--study", "x"]])
def test_reading_a_store_that_is_not_there_makes_no_file_in_any_spelling(tmp_path, url, command, cli_in_process):
    """F2: `compare` with sqlite+pysqlite:///nothere.db created a 954 KB nothere.db. (`audit` finds
    no journal first: it too makes nothing.)"""
    result = cli_in_process(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert command[0] == "audit" or "harness: error: no MLflow store at sqlite" in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_new_store_in_the_dialect_form_is_made_under_its_lock_in_wal_mode(tmp_path, monkeypatch):
    """F3: two searches on a new `sqlite+pysqlite:///m.db` raced (one exited "Online migration expected
    to match one row"): the store was made without its lock file and left in journal mode delete."""
    from harness import filelock, tracking

    locked = []
    real = filelock.file_lock
    monkeypatch.setattr(filelock, "file_lock", lambda path, *a, **k: locked.append(path) or real(path, *a, **k))
    tracking.open_client(f"sqlite+pysqlite:///{tmp_path / 'm.db'}")
    assert locked == [str(tmp_path / "m.db") + filelock.LOCK_SUFFIX]
    assert (tmp_path / "m.db.harness-lock").exists()
    with closing(sqlite3.connect(tmp_path / "m.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_an_optuna_storage_in_the_dialect_form_is_one_file_with_one_lock(tmp_path, monkeypatch):
    """The Optuna side of F3: its schema lock and its workers' lock are the file's, in any spelling."""
    from harness.search import study
    from harness.search.durable import storages

    monkeypatch.chdir(tmp_path)
    storage = study.open_storage("sqlite+pysqlite:///file:o.db?uri=true&timeout=5")
    assert storages.lock_file(storage) == Path("o.db.harness-lock")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.db", "o.db.harness-lock"]


@pytest.mark.parametrize("url", ["sqlite+pysqlite:///:memory:", "sqlite:///file:o.db?uri=true&vfs=memdb"])
def test_an_in_memory_optuna_storage_is_refused_in_any_spelling(url, tmp_path, monkeypatch):
    from harness.errors import UsageError
    from harness.search import study

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="is an in-memory SQLite database"):
        study.check_storage(url)


@pytest.mark.parametrize("option, allowed", [
    ("target_session_attrs=x", "invalid target_session_attrs value"), ("gssencmode=x", "invalid gssencmode value"),
    ("sslmode=bogus", "invalid sslmode value: \"bogus\"; allowed: disable, allow, prefer, require"),
    ("keepalives=often", "invalid integer value \"often\" for connection option \"keepalives\""),
])
def test_a_libpq_option_libpq_refuses_is_bad_input_in_one_line(tmp_path, capsys, option, allowed):
    """F6: `cluster --postgres URL?target_session_attrs=x` exited 1 "cannot connect" for a URL that
    libpq refuses before it connects to anything: the input is wrong, exit 2, password masked."""
    from harness.cli import main

    url = f"postgresql://harness:hunter22pw@127.0.0.1:9/postgres?{option}"
    assert main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("harness: error: --postgres postgresql://harness@127.0.0.1:9/postgres?") and allowed in line
    assert "hunter22" not in line and "cannot connect" not in line
    assert not (tmp_path / "c").exists()
