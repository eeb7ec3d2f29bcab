"""Issue 26, a thirteenth probe (T1-T4): the Optuna storage and the MLflow store are two stores, in
two files. `--storage journal:mlflow.db` in an empty folder made the MLflow store, then refused the
file it had just made; `--storage sqlite:///mlflow.db` wrote Optuna's tables into the MLflow store
("Can't locate revision", and the store unusable afterwards); an empty `mlflow.db.harness-lock` was
taken for a journal; a `?mode=ro` SQLite never saw made a new, writable store. Each spelling of one
file (relative, absolute, `./x/..`, `sqlite:////abs`, `sqlite://///abs`, a `file:` URI, a symbolic
or hard link), a file a store keeps beside its own, a server's database, and an option SQLite would
not read are refused before either store is made: exit 2, one line (both URLs, passwords hidden),
nothing written."""
import itertools
import os
import shutil
import uuid
from pathlib import Path

import pytest

from conftest import slow_cases, snapshot
from test_journal_input import COMMANDS

# (MLFLOW_TRACKING_URI, --storage) naming one file; ABS is the test's folder, made absolute.
SAME_FILE = [
    ("sqlite:///mlflow.db", "journal:mlflow.db"),
    ("sqlite:///mlflow.db", "journal:./sub/../mlflow.db"),
    ("sqlite:///mlflow.db", "journal:ABS/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite+pysqlite:///./mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///./sub/../mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///ABS/mlflow.db"),
    ("sqlite:///ABS/mlflow.db", "sqlite:////ABS/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite://///ABS/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///file:mlflow.db?uri=true"),
    ("sqlite:///mlflow.db", "sqlite:///file:ABS/mlflow.db?uri=true&timeout=5"),
    ("sqlite:///mlflow.db", "sqlite:///file:///ABS/mlflow.db?uri=true"),
    ("sqlite:///file:ABS/mlflow.db?uri=true", "journal:mlflow.db"),
    ("sqlite:///m2.db", "journal:m2.db"),
    ("sqlite:///m2.db", "journal:ABS/sub/../m2.db"),
    ("sqlite:///m2.db", "journal:link.db"),
    ("sqlite:///m2.db", "sqlite:///link.db"),
    ("sqlite:///m2.db", "journal:linked/m2.db"),
    ("sqlite:///m2.db", "journal:hard.db"),
    ("sqlite:///m2.db", "sqlite:///hard.db"),
    # A file one store keeps beside the other's: SQLite's, the harness's lock, Optuna's journal lock.
    ("sqlite:///mlflow.db", "journal:mlflow.db.harness-lock"),
    ("sqlite:///ABS/mlflow.db", "sqlite:///./mlflow.db.harness-lock"),
    ("sqlite:///mlflow.db", "journal:mlflow.db-wal"),
    ("sqlite:///mlflow.db", "journal:./mlflow.db-shm"),
    ("sqlite:///mlflow.db", "journal:mlflow.db-journal"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db-wal"),
    ("sqlite:///optuna_journal.log.lock", "journal:optuna_journal.log"),
    ("sqlite:///ABS/j.log.lock", "journal:./j.log"),
    ("sqlite:///j.log-wal", "sqlite:///j.log"),
]


def _place(folder: Path, tracking: str, storage: str, store: Path | None) -> tuple[dict, str]:
    """The folder as the user has it: the MLflow store there or not; the links the storage names.
    The env to run in, and the storage URL, with ABS filled in. ``store``: the MLflow store to copy
    in, or None."""
    (folder / "sub").mkdir()
    (folder / "linked").symlink_to(".")
    tracking, storage = (url.replace("ABS", str(folder)) for url in (tracking, storage))
    if store is not None:
        from harness.urls import sqlite_path

        shutil.copy(store, folder / Path(sqlite_path(tracking)).name)
    (folder / "link.db").symlink_to("m2.db")
    if (folder / "m2.db").exists():
        os.link(folder / "m2.db", folder / "hard.db")
    return {"MLFLOW_TRACKING_URI": tracking}, storage


def _refused(cli_in_process, folder: Path, argv, env: dict, storage: str, said: str) -> str:
    before = snapshot(folder)
    out = cli_in_process(*argv, "--storage", storage, cwd=folder, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and said in out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and not out.stdout
    assert snapshot(folder) == before  # no store made, none changed, no lock file
    return out.stderr


SAME_FILE_CASES = [(*pair, command, present) for pair in SAME_FILE for command in COMMANDS for present in (False, True)]
# The fast tier: every spelling with one command and a new file, every command with one spelling and a file
# new or existing; the whole suite every spelling with every command, new and existing.
FIRST = (*SAME_FILE[0], next(iter(COMMANDS)))


@pytest.mark.parametrize("tracking, storage, command, present", slow_cases(SAME_FILE_CASES, slow=[
    case for case in SAME_FILE_CASES if tuple(case[:2]) != FIRST[:2] and (case[2] != FIRST[2] or case[3])]),
    ids=[f"{t}-{s}-{c}-{'existing' if p else 'new'}" for t, s, c, p in SAME_FILE_CASES])
def test_one_file_for_both_stores_is_refused_in_every_spelling_before_either_is_made(
        tmp_path, cli_in_process, migrated_db, tracking, storage, command, present, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if not present and ("hard.db" in storage):
        pytest.skip("a hard link is made to a file that is there")
    env, storage = _place(tmp_path, tracking, storage, migrated_db if present else None)
    line = _refused(cli_in_process, tmp_path, COMMANDS[command], env, storage, "would share")
    assert f"the Optuna storage {storage} and the MLflow store {env['MLFLOW_TRACKING_URI']} would share" in line


def test_one_server_database_for_both_stores_is_refused_with_its_password_hidden(tmp_path, cli_in_process):
    """MLflow's and Optuna's tables in one database share alembic's version table; refused before
    any connection is tried (no server is needed to see it)."""
    env = {"MLFLOW_TRACKING_URI": "postgresql://harness:Hunter2secret@db-host/runs"}
    for storage in ("postgresql+psycopg://harness:Hunter2secret@DB-host:5432/runs", env["MLFLOW_TRACKING_URI"],
                    "postgresql://harness:Hunter2secret@/runs?host=db-host&port=5432"):
        for command in COMMANDS.values():
            line = _refused(cli_in_process, tmp_path, command, env, storage, "would share 'runs'")
            assert "Hunter2" not in line and "postgresql://harness@db-host/runs" in line


@pytest.mark.parametrize("tracking, storage", [("sqlite:///mlflow.db", "journal:mlflow.db"),
                                               ("sqlite:///mlflow.db", "sqlite:///./mlflow.db"),
                                               ("sqlite:///mlflow.db", "journal:mlflow.db-wal")])
def test_the_python_api_refuses_one_file_for_both_stores(tmp_path, monkeypatch, tracking, storage):
    """open_storage, which Objective's callers use, checks against the MLflow store Objective logs to."""
    from harness.errors import UsageError
    from harness.search.study import open_storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    with pytest.raises(UsageError, match="would share"):
        open_storage(storage)
    assert not list(tmp_path.iterdir())


def test_stores_in_different_files_beside_each_other_are_both_kept(tmp_path, monkeypatch):
    """Names that only look like a companion (no file of that stem) and the default pair pass."""
    from harness.search.study import check_storage

    monkeypatch.chdir(tmp_path)
    for tracking, storage in [("sqlite:///mlflow.db", "journal:optuna_journal.log"),
                              ("sqlite:///mlflow.db", "journal:study-journal"),
                              ("sqlite:///mlflow.db", "journal:mlflow.db2"), ("sqlite:///a.db", "sqlite:///b.db"),
                              ("sqlite:///mlflow.db", "journal:notes.lock"),
                              ("postgresql://h/runs", "postgresql://h/optuna"),
                              ("postgresql://h/runs", "postgresql://h:5433/runs"),
                              ("postgresql:///runs?host=/run/a", "postgresql:///runs?host=/run/b"),
                              # '.torn-' inside a name is no repair's copy: those end .torn-TIMESTAMP[.N]
                              ("sqlite:///mlflow.db", "journal:study.torn-notes.log"),
                              ("sqlite:///mlflow.db", "journal:j.log.torn-2026"),
                              ("sqlite:///mlflow.db", "sqlite:///o.db.torn-20260101T000000Z.x")]:
        check_storage(storage, tracking_uri=tracking)
    assert not list(tmp_path.iterdir())


# Query options the driver reads over the URL's own (libpq's host, port and dbname; MySQL's database):
# what it connects to decides, as SQLAlchemy's dialect hands it over.
ONE_SERVER_DATABASE = [("postgresql://u@b/db", "postgresql://u@a/db?host=b"),
                       ("postgresql://u@a/db", "postgresql://u@a/other?dbname=db"),
                       ("postgresql://u@a:5432/db", "postgresql://u@a:5433/db?port=5432"),
                       ("mysql://u@a/db", "mysql://u@a/other?database=db"),
                       ("mysql://u@b/db", "mysql+pymysql://u@a/db?host=b")]
TWO_SERVER_DATABASES = [("postgresql://u@a/x?dbname=mlflow", "postgresql://u@a/x?dbname=optuna"),
                        ("postgresql://u@a/db", "postgresql://u@a/db?host=b"),
                        ("mysql://u@a/db", "mysql://u@a/db?port=3307")]


@pytest.mark.parametrize("tracking, storage, same", [(*pair, True) for pair in ONE_SERVER_DATABASE] +
                         [(*pair, False) for pair in TWO_SERVER_DATABASES])
def test_a_server_database_is_compared_as_the_driver_connects_to_it(tmp_path, monkeypatch, tracking, storage, same):
    from harness.errors import UsageError
    from harness.search.study import check_storage

    monkeypatch.chdir(tmp_path)
    if same:
        with pytest.raises(UsageError, match="would share 'db'"):
            check_storage(storage, tracking_uri=tracking)
    else:
        check_storage(storage, tracking_uri=tracking)
    assert not list(tmp_path.iterdir())


def _made(folder: Path, name: str) -> str:
    """A file the harness, Optuna or SQLite names beside a store, as they leave it (or not there)."""
    (folder / "j.log").write_bytes(b"")
    (folder / "o.db").write_bytes(b"")
    if name in ("mlflow.db.harness-lock", "j.log.harness-lock", "j.log.torn-20260101T000000Z"):
        (folder / name).write_bytes(b"")
    return name


MADE = ["mlflow.db.harness-lock", "j.log.harness-lock", "new.log.harness-lock", "j.log.torn-20260101T000000Z",
        "j.log.torn-20260101T000000Z.1", "j.log.repair-tmp", "j.log.lock", f"j.log.lock{uuid.uuid4()}.rename",
        "o.db-wal", "o.db-shm", "o.db-journal"]


BESIDE = list(itertools.product(MADE, COMMANDS, ["journal:", "sqlite:///"]))


# The fast tier: every name with one command, every command with one name; the whole suite each with each.
@pytest.mark.parametrize("name, command, scheme", slow_cases(BESIDE, slow=[
    case for case in BESIDE if case[0] != MADE[0] and case[1] != next(iter(COMMANDS))]),
    ids=["-".join(case) for case in BESIDE])
def test_a_file_a_store_keeps_beside_its_own_is_no_store(tmp_path, cli_in_process, migrated_db, name, command,
                                                         scheme):
    """T3: the empty mlflow.db.harness-lock that every command leaves was taken for a new journal;
    here the store beside it is not the MLflow store of the command (that one is in sub/)."""
    (tmp_path / "sub").mkdir()
    for folder in (tmp_path, tmp_path / "sub"):
        shutil.copy(migrated_db, folder / "mlflow.db")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"}
    storage = scheme + _made(tmp_path, name)
    line = _refused(cli_in_process, tmp_path, COMMANDS[command], env, storage, f"{name!r} is the name of ")
    assert line.startswith(f"harness: error: Optuna storage {storage}: ")


def test_an_mlflow_store_in_a_file_a_store_keeps_beside_its_own_is_refused(tmp_path, cli_in_process):
    (tmp_path / "j.log").write_bytes(b"")
    env = {"MLFLOW_TRACKING_URI": "sqlite:///j.log.harness-lock"}
    _refused(cli_in_process, tmp_path, COMMANDS["search"], env, "journal:other.log",
             "MLflow store sqlite:///j.log.harness-lock: 'j.log.harness-lock' is the name of the harness's lock file")


# T4: options SQLite never reads as asked. SQLAlchemy drops a query without uri=true (mode=ro
# ignored: the store opened for writing), and with it appends the query to a path that is no
# file: URI, where SQLite takes it for part of the name (a new store "m.db?mode=ro").
DROPPED = ["sqlite:///m.db?mode=ro", "sqlite:///m.db?immutable=1", "sqlite+pysqlite:///m.db?timeout=5&mode=ro",
           "sqlite:///m.db?mode=ro&uri=true", "sqlite:///m.db?immutable=1&uri=1", "sqlite:///m.db?cache=shared&uri=true",
           "sqlite:////ABS/m.db?mode=ro&uri=yes", "sqlite:///file:m.db?mode=ro", "sqlite:///file:m.db?uri=false&mode=ro"]
READERS = {"compare": ["compare", "--mlflow-experiment", "linear_regression"], "predict": ["predict", "0" * 32, "--x", "1"]}


OPTIONS = list(itertools.product([*COMMANDS, *READERS], ["storage", "tracking"], DROPPED))


# The fast tier: every spelling with one command, every command with one spelling; the whole suite each with each.
@pytest.mark.parametrize("command, side, url", slow_cases(OPTIONS, slow=[
    case for case in OPTIONS if case[0] != next(iter(COMMANDS)) and case[2] != DROPPED[0]]),
    ids=["-".join(case) for case in OPTIONS])
@pytest.mark.filterwarnings("ignore:Query string argument")
def test_an_sqlite_option_sqlite_never_reads_is_refused_with_the_spelling_it_reads(
        tmp_path, cli_in_process, migrated_db, url, side, command):
    url = url.replace("/ABS", str(tmp_path))
    shutil.copy(migrated_db, tmp_path / "m.db")
    if command in READERS and side == "storage":
        pytest.skip("compare and predict take no Optuna storage")
    argv = COMMANDS.get(command) or READERS[command]
    if side == "storage":
        env, storage = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, url
    else:
        env, storage = {"MLFLOW_TRACKING_URI": url}, "journal:j.log"
    before = snapshot(tmp_path)
    out = cli_in_process(*argv, *(["--storage", storage] if command in COMMANDS else []), cwd=tmp_path, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"{url} is given SQLite options (" in out.stderr and "write sqlite:///file:" in out.stderr, out.stderr
    assert snapshot(tmp_path) == before and "Traceback" not in out.stderr
