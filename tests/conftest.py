import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What points MLflow or Optuna elsewhere: a tracking URI, an experiment, a run, a storage.
REDIRECTS = ("MLFLOW_", "OPTUNA_")


def _redirects() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(REDIRECTS)}


# The caller's shell changes nothing: gone before any test module imports mlflow, so neither this
# process (in-process commands, fixtures of any scope) nor a process it starts sees them.
for _name in _redirects():
    del os.environ[_name]

# New MLflow stores start from a template kept in the user's cache folder (harness/store_template.py):
# the suite keeps its own, made by its first store and shared by every process it starts, so that it
# neither reads nor writes the caller's ~/.cache.
import atexit  # noqa: E402
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="harness-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)


def _schema_head_once() -> None:
    """MLflow checks each SQL store it opens against its newest schema revision, which it finds by
    loading every one of its migration scripts (~0.1 s a store; the suite opens hundreds). For an
    installed MLflow that answer is one: this process asks once. A store's own revision is still read
    and compared each time, and processes the suite starts are untouched."""
    import functools

    from mlflow.store.db import utils

    utils._get_latest_schema_revision = functools.cache(utils._get_latest_schema_revision)


_schema_head_once()


@contextlib.contextmanager
def redirects_restored():
    """What a command run in-process put in os.environ (main() sets MLflow's network defaults) is
    gone afterwards."""
    before = _redirects()
    try:
        yield
    finally:
        for name in _redirects().keys() - before.keys():
            del os.environ[name]
        os.environ.update(before)


@pytest.fixture(autouse=True)
def _redirects_stay_in_their_test():
    """Nothing a test sets leaks into the next; what a module's fixture set (a server's login) stays."""
    with redirects_restored():
        yield


@pytest.fixture(autouse=True)
def _signal_handlers_stay_in_their_test():
    """A command run in-process ends by ignoring SIGINT and SIGTERM (its process is about to exit):
    the suite's own are back after each test, so that Ctrl-C or `timeout` still stop pytest instead
    of turning into 'interrupted' inside a later test's command."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def readme_blocks(heading: str, doc: str = "README.md") -> tuple[str, list[str]]:
    """The first python block and the command lines of the first bash block after ``heading`` in the
    README or in ``doc``, a file of docs/ (what a reader copies)."""
    text = (ROOT / doc).read_text()
    section = text[text.index(heading):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    commands = section[section.index("```bash\n") + len("```bash\n"):]
    commands = [line.split("  #")[0].strip() for line in commands[:commands.index("```")].splitlines()]
    return code, [c for c in commands if c]


def slow_cases(cases, slow=None) -> list:
    """The cases of a parametrize matrix with those in ``slow`` (by default all but the first) marked
    slow: the fast tier runs one case of a matrix whose every case trains, searches or starts a
    process, the whole suite every case. A case of several arguments is a tuple."""
    cases = list(cases)
    slow = cases[1:] if slow is None else slow
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.slow) if case in slow
            else case for case in cases]


def cli_env(**extra) -> dict:
    """The user's environment without anything that would redirect MLflow or Optuna."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(REDIRECTS)}
    # `mlflow run` looks up `python` on PATH: make it this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args, cwd, timeout=300, env=None, module=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness", *map(str, args)] if module else list(map(str, args))
    return subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def main_in(folder: Path, *args) -> int:
    """``harness ARGS`` in-process in ``folder``, its store named absolutely: for fixtures of a module
    or the session, which cannot use cli_in_process."""
    from harness.cli import main

    with redirects_restored(), pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        return main(list(map(str, args)))


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created once: building MLflow's schema takes seconds. It is also
    the suite's template (harness/store_template.py), so the first store the harness makes is a copy
    too, not a second build of the schema."""
    from mlflow import MlflowClient

    from harness import store_template

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    store_template.keep_as_template(str(path))
    return path


@pytest.fixture(scope="session")
def cluster_services(tmp_path_factory) -> dict:
    """PostgreSQL ($HARNESS_TEST_POSTGRES, or one started here) with an Optuna and an MLflow database,
    and `mlflow server` on the latter with served artifacts: the engines users scale out on, started
    once for the session (each start migrates MLflow's schema in a new database). Tests that share
    it keep apart by their study, experiment and model names. The server's login is in ``login``,
    not in the environment: a test that needs it in-process sets it (``served_login``)."""
    from harness import cluster
    from harness.errors import UsageError

    postgres = os.environ.get("HARNESS_TEST_POSTGRES")
    if not postgres:
        try:
            cluster.postgres_bin()
        except UsageError as exc:
            pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("services")
    with cluster.services(root, postgres) as (storage, tracking_uri):
        login = {k: os.environ[k] for k in cluster.LOGIN_VARS}
        with cluster.environment({}, unset=cluster.LOGIN_VARS):
            yield {"storage": storage, "tracking_uri": tracking_uri, "root": root, "login": login}


@contextlib.contextmanager
def served_login(services: dict):
    """``cluster_services``' login in this process's environment meanwhile (an MlflowClient of it)."""
    from harness import cluster

    with cluster.environment(services["login"]):
        yield


def new_store(folder: Path, migrated_db: Path) -> Path:
    """``folder`` as a user's working directory after their first run there: an empty ``mlflow.db``
    whose Default experiment keeps its artifacts in ``folder/mlruns`` (the template's own folder
    would gather every test's artifacts in one place, or in the folder pytest ran from)."""
    import sqlite3
    from contextlib import closing

    shutil.copy(migrated_db, folder / "mlflow.db")
    with closing(sqlite3.connect(folder / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (str(folder.resolve() / "mlruns" / "0"),))
    return folder


@pytest.fixture
def workdir(tmp_path, migrated_db) -> Path:
    """A working directory as a user has it after their first run: an empty default store."""
    return new_store(tmp_path, migrated_db)


@pytest.fixture
def in_workdir(workdir, monkeypatch) -> Path:
    """``workdir`` as the working directory of an in-process command, its store the tracking URI,
    whatever the caller's MLFLOW_* say."""
    monkeypatch.chdir(workdir)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    return workdir


def copy_store(source: Path, target: Path, made_in: Path | None = None) -> Path:
    """A copy of the folder ``source`` whose runs keep their artifacts in the copy, to damage at will;
    ``made_in``: the folder the store was made in, where not ``source`` (a copy of a disk's folder)."""
    import sqlite3
    from contextlib import closing

    shutil.copytree(source, target)
    with closing(sqlite3.connect(target / "mlflow.db")) as db, db:
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(made_in or source), str(target)))
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                   (str(made_in or source), str(target)))
    return target


@pytest.fixture
def cli_in_process(monkeypatch, capfd):
    """``harness ARGS`` in-process in ``cwd`` with ``env`` added, as a CompletedProcess: its exit
    status and what reached file descriptors 1 and 2 (MLflow's and Optuna's logging too). For
    matrices: an interpreter's start costs more than a refusal.

    A store in ``cwd`` is named absolutely, unless ``env`` names one: MLflow keeps one store object
    per URI, and its relative default would stay the store of the first folder it was opened in."""
    from harness.cli import main

    def run(*args, cwd, env=None) -> subprocess.CompletedProcess:
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            store = Path(cwd).resolve() / "mlflow.db"
            if "MLFLOW_TRACKING_URI" not in os.environ and store.exists():
                patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
            capfd.readouterr()
            status = main(list(map(str, args)))
            out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, status, out, err)

    return run


def snapshot(folder: Path, exclude=()) -> dict:
    """Everything under ``folder`` by its path relative to it (a file: its SHA-256; a link: where it
    points; a folder: None), less the relative paths in ``exclude``: what a refused or reading command
    must leave as it was, no file or folder added, none changed."""
    import hashlib

    def what(path: Path):
        if path.is_symlink():
            return f"-> {os.readlink(path)}"
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    return {str(p.relative_to(folder)): what(p) for p in sorted(Path(folder).rglob("*"))
            if str(p.relative_to(folder)) not in exclude}


def client_for(workdir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def artifact_folder(workdir: Path, run_id: str) -> Path:
    """Where a run of ``workdir``'s store keeps its artifacts (its MLflow experiment's folder)."""
    from harness.urls import local_folder

    return local_folder(client_for(workdir).get_run(run_id).info.artifact_uri)


def all_runs(workdir: Path):
    client = client_for(workdir)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=10000)


AUDITED = "audited"  # searched_once's study


@pytest.fixture(scope="session")
def searched_once(tmp_path_factory, migrated_db) -> Path:
    """A tracked two-trial search, in-process, made once for the session (test_audit's and
    test_untrusted_artifacts' each made their own): its folder, its study AUDITED in ``j.log``.
    Tests tamper with copies of it (copy_store), never with it."""
    import optuna
    from mlflow import MlflowClient

    from harness.experiment import load
    from harness.search import space as space_module
    from harness.search.durable.audit import audit
    from harness.search.objective import Objective
    from harness.search.study import create_study, make_pruner, open_storage

    workdir = new_store(tmp_path_factory.mktemp("searched"), migrated_db)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with redirects_restored(), pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        space = space_module.resolve(load("linear_regression"), overrides={"epochs": [3, 4]})
        url = f"journal:{workdir / 'j.log'}"
        study = create_study(AUDITED, open_storage(url), direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0),
                             pruner=make_pruner("none"), space=space, experiment="linear_regression")
        with Objective("linear_regression", space, track=True, device="cpu", seed=0) as objective:
            study.optimize(objective, n_trials=2)
        reopened = open_storage(url)
        assert audit(optuna.load_study(study_name=AUDITED, storage=reopened), reopened, MlflowClient(uri)).clean
    return workdir


@pytest.fixture(scope="session")
def trained(tmp_path_factory, migrated_db):
    """A store holding one trained run (5 epochs of the default experiment): (folder, run id).
    Tests damage copies of it, never it."""
    import sqlite3
    from contextlib import closing

    path = tmp_path_factory.mktemp("trained")
    new_store(path, migrated_db)
    # The template's Default experiment keeps artifacts where pytest started: keep these here, to damage copies.
    with closing(sqlite3.connect(path / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ?", (str(path / "mlruns" / "0"),))
    # In-process: a process of its own would cost more than the training (its readers need no more).
    assert main_in(path, "train", "--epochs", "5") == 0
    [run] = all_runs(path)
    return path, run.info.run_id
