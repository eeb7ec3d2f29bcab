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
import re
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
        "j.log.torn-20260101T000000Z.1", "j.log.repair-tmp", "j.log.lock", f"j.log.lock{uuid.UUID(int=0x5EED)}.rename",
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


# Issue 26, the 17th probe (finding 1): spellings of one PostgreSQL database that were compared as
# written, not as libpq connects to them; both stores then went into one database for good.
LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGSERVICEFILE", "PGSYSCONFDIR")
PROBE = [("postgresql://postgres@127.0.0.1:55417/shared", "postgresql://postgres@127.0.0.1/shared?port=055417"),
         ("postgresql://postgres@/shared2?host=/srv/pg&port=55417",
          "postgresql://postgres@/shared2?host=/srv/pg/&port=55417"),
         ("postgresql://postgres@127.0.0.1:55417/", "postgresql://postgres@127.0.0.1:55417/postgres")]
ONE_DATABASE_SPELLED_TWO_WAYS = [
    *PROBE,
    ("postgresql://u@h/db", "postgresql://u@h:05432/db"),  # libpq's default port, a port with leading zeros
    ("postgresql://u@h:5432/db", "postgresql://u@h/db?port=+5432"),
    ("postgresql://u@/db?host=/srv/pg", "postgresql://u@/db?host=/srv/./pg//"),  # a socket folder, normalised
    ("postgresql://u@/db?host=/srv/pg", "postgresql://u@/db?host=/srv/linked"),  # ...through a symbolic link
    ("postgresql://u@db-host/db", "postgresql://u@DB-Host./db"),  # a name: no letter case, the root's dot
    ("postgresql://u@[::1]/db", "postgresql://u@[0:0::1]:5432/db"),  # an IP address in another spelling
    ("postgresql://u@127.0.0.1/db", "postgresql://u@127.1/db"),
    ("postgresql://u@127.0.0.1/db", "postgresql://u@[::ffff:127.0.0.1]/db"),
    ("postgresql://u@name/db?hostaddr=10.0.0.5", "postgresql://u@10.0.0.5/db"),  # libpq connects to hostaddr
    ("postgresql://u@b/db", "postgresql://u@/db?host=a,b&port=5432,5432"),  # a host list: any host in common
    ("postgresql://u@b:5433/db", "postgresql://u@/db?host=a:5432&host=B:5433"),  # SQLAlchemy's host list
    ("postgresql://u@a/db", "postgresql://u@/db?host=a&host=b"),
    ("mysql://u@H./db", "mysql+pymysql://u@h:03306/db"),  # MySQL alike: its default port, no letter case
    ("mysql://u@/db", "mysql://u@localhost:3306/db"),
    ("mysql://u@[::1]/db", "mysql://u@[0::1]/db"),
]
DATABASES_APART = [
    ("postgresql://u@h/db", "postgresql://u@h:5433/db"),
    ("postgresql://u@h/runs", "postgresql://u@h/study"),
    ("postgresql://u@h/db", "postgresql://u@g/db"),
    ("postgresql://u@/db?host=/srv/a", "postgresql://u@/db?host=/srv/b"),
    ("postgresql://u@/db?host=/srv/a", "postgresql://u@/db?host=/srv/a&port=5433"),
    ("postgresql://u@[::1]/db", "postgresql://u@[::2]/db"),
    ("postgresql://alice@h/", "postgresql://bob@h/"),  # each user's own database
    ("postgresql://u@/db?host=a,b", "postgresql://u@/db?host=c,d"),
    ("postgresql://u@/db?host=a,b&port=5432,5433", "postgresql://u@/db?host=b,a&port=5432,5433"),
    ("postgresql://u@name/db?hostaddr=10.0.0.5", "postgresql://u@name/db?hostaddr=10.0.0.6"),
    ("postgresql://u@h/Runs", "postgresql://u@h/runs"),  # database names are case-sensitive
    ("mysql://u@h/db", "mysql://u@h:3307/db"),
    ("mysql://u@h/db", "mysql://u@h/other"),
]


@pytest.fixture
def libpq_env(monkeypatch, tmp_path):
    """No libpq default from the environment, unless the test sets one; a socket folder and a link to it."""
    for name in LIBPQ_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def _spelled(url: str, folder: Path) -> str:
    """``url`` with its socket folders made real ones in ``folder`` (/srv/linked a link to /srv/pg)."""
    (folder / "srv" / "pg").mkdir(parents=True, exist_ok=True)
    if not (folder / "srv" / "linked").is_symlink():
        (folder / "srv" / "linked").symlink_to("pg")
    return url.replace("host=/srv/", f"host={folder}/srv/")


def _shares(storage: str, tracking: str) -> bool:
    from harness.errors import UsageError
    from harness.search.study import check_storage

    try:
        check_storage(storage, tracking_uri=tracking)
    except UsageError as exc:
        assert "would share" in str(exc), exc
        return True
    return False


@pytest.mark.parametrize("tracking, storage", ONE_DATABASE_SPELLED_TWO_WAYS)
def test_one_server_database_is_refused_in_every_spelling_the_driver_reads_alike(libpq_env, tmp_path, tracking,
                                                                               storage):
    tracking, storage = (_spelled(url, tmp_path / "s") for url in (tracking, storage))
    assert _shares(storage, tracking) and _shares(tracking, storage)
    assert not list(tmp_path.glob("*.db*")) and list(tmp_path.iterdir()) == [tmp_path / "s"]


@pytest.mark.parametrize("tracking, storage", DATABASES_APART)
def test_two_server_databases_are_kept_apart(libpq_env, tmp_path, tracking, storage):
    tracking, storage = (_spelled(url, tmp_path / "s") for url in (tracking, storage))
    assert not _shares(storage, tracking) and not _shares(tracking, storage)


# What libpq reads from the environment fills in only what the URL leaves out.
LIBPQ_DEFAULTS = [({"PGPORT": "5433"}, "postgresql://u@h/db", "postgresql://u@h:5433/db", True),
                  ({"PGPORT": "5433"}, "postgresql://u@h/db", "postgresql://u@h:5432/db", False),
                  ({"PGPORT": "5433"}, "postgresql://u@h:5432/db", "postgresql://u@h/db?port=5432", True),
                  ({"PGUSER": "alice"}, "postgresql://h/", "postgresql://h/alice", True),
                  ({"PGUSER": "alice"}, "postgresql://h/", "postgresql://bob@h/bob", False),
                  ({"PGDATABASE": "runs"}, "postgresql://u@h/", "postgresql://u@h/runs", True),
                  ({"PGDATABASE": "runs"}, "postgresql://u@h/", "postgresql://u@h/u", False),
                  ({"PGHOST": "/srv/pg"}, "postgresql://u@/db", "postgresql://u@/db?host=/srv/pg/", True),
                  ({"PGHOST": "h"}, "postgresql://u@/db", "postgresql://u@g/db", False)]


@pytest.mark.parametrize("env, tracking, storage, same", LIBPQ_DEFAULTS)
def test_libpqs_defaults_from_the_environment_fill_in_what_a_url_leaves_out(libpq_env, tmp_path, env, tracking,
                                                                            storage, same):
    for name, value in env.items():
        libpq_env.setenv(name, _spelled(f"host={value}", tmp_path / "s")[len("host="):])
    tracking, storage = (_spelled(url, tmp_path / "s") for url in (tracking, storage))
    assert _shares(storage, tracking) == same


def test_no_host_is_libpqs_compiled_in_socket_folder(libpq_env):
    """Where a URL names no host, libpq connects to the socket folder it was built with: Debian's
    (and psycopg's wheels') /var/run/postgresql, PostgreSQL's own /tmp."""
    folders = ["/var/run/postgresql", "/tmp"]
    named = [folder for folder in folders if _shares(f"postgresql://u@/db?host={folder}", "postgresql://u@/db")]
    assert len(named) == 1, named
    assert _shares(f"postgresql://u@/db?host={named[0]}/", "postgresql://u@:5432/db")
    assert not _shares("postgresql://u@/db?host=/srv/elsewhere", "postgresql://u@/db")


PROBE_CASES = [(*pair, command) for pair in PROBE for command in COMMANDS]


@pytest.mark.parametrize("tracking, storage, command", slow_cases(PROBE_CASES),
                         ids=[f"{t}-{s}-{c}" for t, s, c in PROBE_CASES])
def test_every_command_refuses_one_server_database_spelled_two_ways_before_either_store_is_made(
        libpq_env, tmp_path, cli_in_process, tracking, storage, command):
    env = {"MLFLOW_TRACKING_URI": tracking}
    line = _refused(cli_in_process, tmp_path, COMMANDS[command], env, storage, "would share")
    assert f"the Optuna storage {storage} and the MLflow store {tracking} would share" in line


def test_the_python_api_refuses_one_server_database_spelled_two_ways(libpq_env):
    from harness.errors import UsageError
    from harness.search.study import open_storage

    libpq_env.setenv("MLFLOW_TRACKING_URI", PROBE[0][0])
    with pytest.raises(UsageError, match="would share 'shared'"):
        open_storage(PROBE[0][1])


@pytest.mark.slow
def test_spellings_refused_as_one_database_reach_one_database_of_a_real_server(libpq_env):
    """On the PostgreSQL CI gives ($HARNESS_TEST_POSTGRES): what the check takes for one database is
    one (the same database of the same running server), what it keeps apart is not."""
    import psycopg
    from sqlalchemy.engine import make_url

    if not os.environ.get("HARNESS_TEST_POSTGRES"):
        pytest.skip("no $HARNESS_TEST_POSTGRES")
    given = make_url(os.environ["HARNESS_TEST_POSTGRES"]).set(drivername="postgresql")
    if os.environ.get("PGPASSFILE"):  # libpq matches a passfile's port as written: not 0PORT
        line = Path(os.environ["PGPASSFILE"]).read_text().splitlines()[0]
        libpq_env.setenv("PGPASSWORD", re.split(r"(?<!\\):", line)[4].replace("\\:", ":").replace("\\\\", "\\"))
    libpq_env.setenv("PGDATABASE", given.database)
    url, bare = (u.render_as_string(hide_password=False) for u in (given, given.set(port=None)))
    spellings = [f"{bare}?port=0{given.port}", f"{bare}?host=/nonexistent,{given.host}&port=1,{given.port}",
                 given.set(database="").render_as_string(hide_password=False)]

    def reached(spelling: str):
        with psycopg.connect(spelling, connect_timeout=5) as connection:
            return connection.execute("SELECT current_database(), pg_postmaster_start_time()").fetchone()

    for spelling in spellings:
        assert _shares(spelling, url) and reached(spelling) == reached(url), spelling
    other = given.set(database="template1").render_as_string(hide_password=False)
    assert not _shares(other, url) and reached(other) != reached(url)
