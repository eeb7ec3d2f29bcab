"""Reading commands on a store nobody may write: a read-only mount or an archived copy.

Every store the harness makes is in WAL mode, and SQLite reads a WAL database through a -shm file
it creates beside it: `predict`, `compare`, `audit` and `reproduce` must read such a store all the same.
Root ignores permission bits, so as root the commands run without the capabilities that let it.
"""
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from contextlib import closing

import pytest

from conftest import cli_env, copy_store, main_in, new_store, run_cli, snapshot

pytestmark = pytest.mark.slow  # a search, and the commands in a process of a user who cannot write the store

# Root as a user without the right to write what it does not own the write bits of.
NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
               "--inh-caps=-dac_override,-dac_read_search,-fowner", "--"]


# One process for many commands: each runs as `harness` does (cli.main) in its own folder and with
# its own MLFLOW_* variables, its status and what reached file descriptors 1 and 2 kept apart, then a
# line of JSON with them all. An interpreter's start costs more than a read.
READER = r"""
import json, os, sys, tempfile
from harness.cli import main

results = []
for args, cwd, env in json.loads(sys.argv[1]):
    for name in [n for n in os.environ if n.startswith(("MLFLOW_", "OPTUNA_"))]:
        del os.environ[name]
    os.environ.update(env)
    os.chdir(cwd)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        try:
            status = main(args)
        except SystemExit as exc:
            status = exc.code
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        results.append([status, *(f.seek(0) or f.read().decode() for f in (out, err))])
print(json.dumps(results))
"""


def as_reader(*commands) -> list[subprocess.CompletedProcess]:
    """Each of ``commands`` (ARGS, folder, MLFLOW_* variables) as ``harness ARGS`` run in that folder by
    a user who cannot write the store: all in one process."""
    script = [sys.executable, "-c", READER, json.dumps([(list(map(str, args)), str(cwd), env)
                                                        for args, cwd, env in commands])]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("as root, setpriv is needed to drop the right to write a read-only folder")
        script = NO_OVERRIDE + script
    done = run_cli(*script, cwd=commands[0][1], env=cli_env(), module=False)
    assert done.returncode == 0, done.stderr
    return [subprocess.CompletedProcess(args, *result) for (args, *_), result in
            zip(commands, json.loads(done.stdout.splitlines()[-1]))]


def read_only(folder) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def archived(tmp_path_factory, migrated_db):
    """A search's folder, archived, once for the module (every test checks it is left unchanged):
    the search in-process (was a process of its own), in a folder copied afterwards, since this
    process keeps its connections to the store open."""
    tmp_path = tmp_path_factory.mktemp("archived")
    searched = tmp_path / "searched"
    searched.mkdir()
    new_store(searched, migrated_db)
    assert main_in(searched, "search", "--n-trials", 2, "--epochs-range", 3, 4, "--study-name", "s") == 0
    store = copy_store(searched, tmp_path / "store")
    with closing(sqlite3.connect(store / "mlflow.db")) as db:  # closed: SQLite folds the -wal into the file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # what the harness leaves
        trials = sorted(run for (run,) in db.execute("SELECT run_uuid FROM runs WHERE name LIKE 'trial-%'"))
    assert len(trials) == 2 and not list(store.glob("mlflow.db-*"))
    read_only(store)
    yield store, trials
    for path in [store, *store.rglob("*")]:
        path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


def test_predict_compare_audit_and_reproduce_read_a_store_nobody_may_write(archived, tmp_path):
    store, trials = archived
    before = snapshot(store)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    writers = (["audit", "--study", "s", "--fix"], ["search", "--n-trials", 1, "--study-name", "s"])
    predict, compare, audit, reproduce, inside, out, *wrote, register = as_reader(
        (["predict", trials[0], "--x", 1, 2], cwd, env),
        (["compare", "--study", "s"], cwd, env),
        (["audit", "--study", "s", "--storage", f"journal:{store / 'optuna_journal.log'}"], cwd, env),
        (["reproduce", trials[0]], cwd, env),
        # From inside the archive too, with the default relative URI (a read-only working directory):
        # the figure is refused at once, and goes where --out says.
        (["compare", "--study", "s"], store, {}),
        (["compare", "--study", "s", "--out", cwd / "s.png"], store, {}),
        *((writer, store, {}) for writer in writers),
        (["register", trials[0], "--name", "m"], store, {}))

    assert predict.returncode == 0 and [line.split(" -> ")[0] for line in predict.stdout.splitlines()] == ["1", "2"], \
        predict.stderr
    assert compare.returncode == 0 and all(run in compare.stdout for run in trials), compare.stderr
    assert audit.returncode == 0 and "2 trials, 2 child runs: clean" in audit.stdout, audit.stdout + audit.stderr
    assert reproduce.returncode == 0, reproduce.stderr
    assert f"reproduced run {trials[0]} exactly" in reproduce.stdout
    assert "not logged: the MLflow store is read-only" in reproduce.stdout
    assert inside.returncode == 2 and "cannot write in folder '.'" in inside.stderr and not inside.stdout, inside.stderr
    assert out.returncode == 0 and all(run in out.stdout for run in trials), out.stderr

    # What writes it says so in one line, with what still works, and writes nothing (not a bare
    # OSError from Optuna's lock).
    for out in wrote:
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr  # bad input: checked first
        assert "the Optuna journal 'optuna_journal.log' cannot be written here ('.' is not writable by" in out.stderr
    # Registering writes to the MLflow store (issue 26: a bare "PermissionError: [Errno 13]", or 30 on
    # a read-only mount): one line naming it, exit 1 (a store failure), before anything is written.
    assert register.returncode == 1 and register.stderr.count("\n") == 1, register.stderr
    assert f"the MLflow store '{store.resolve() / 'mlflow.db'}' is read-only here, and registering writes" in \
        register.stderr

    assert snapshot(store) == before and not list(store.glob("mlflow.db-*"))
    # Reading made nothing where it ran but the figures asked for (MLflow made a folder 'file:' there).
    assert sorted(p.name for p in cwd.iterdir()) == ["compare-s.png", "s.png"]


@pytest.mark.parametrize("spelling", ["sqlite+pysqlite:///{}", "sqlite:////{}"])  # the store is /abs: //abs
def test_the_reading_commands_read_it_in_other_spellings_of_its_url(archived, tmp_path, spelling):
    """Issue 26, a tenth probe (F2): with `sqlite+pysqlite:///mlflow.db` (SQLAlchemy's dialect+driver
    form, which MLflow takes) predict, audit and reproduce exited 1 "unable to open database file"
    where `sqlite:///mlflow.db` read the same store. An eleventh (F1): `sqlite://///abs/mlflow.db`
    (SQLAlchemy's database `//abs/...`, which POSIX takes for `/abs/...`) became the file URI
    `file://abs/...`, and all four exited 1 "invalid uri authority" (every other spelling of a path:
    tests/test_urls_paths.py)."""
    store, trials = archived
    before = snapshot(store)
    env = {"MLFLOW_TRACKING_URI": spelling.format(store / "mlflow.db")}
    predict, compare, audit, reproduce = as_reader(
        (["predict", trials[0], "--x", 1], tmp_path, env),
        (["compare", "--study", "s", "--out", tmp_path / "s.png"], tmp_path, env),
        (["audit", "--study", "s", "--storage", f"journal:{store / 'optuna_journal.log'}"], tmp_path, env),
        (["reproduce", trials[0]], tmp_path, env))
    assert predict.returncode == 0 and predict.stdout.startswith("1 -> "), predict.stderr
    assert compare.returncode == 0 and all(run in compare.stdout for run in trials), compare.stderr
    assert audit.returncode == 0 and "2 trials, 2 child runs: clean" in audit.stdout, audit.stdout + audit.stderr
    assert reproduce.returncode == 0 and f"reproduced run {trials[0]} exactly" in reproduce.stdout, reproduce.stderr
    assert snapshot(store) == before and not list(store.glob("mlflow.db-*"))
