"""`harness predict`'s read-only reader of MLflow's SQLite store (harness/local_store.py): the same
answers as MlflowClient, without importing mlflow, and MlflowClient wherever it is not known to be right."""
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing

import pytest
import torch
from mlflow import MlflowClient

from harness import compat, runs
from harness.commands.predict import _fmt
from harness.errors import HarnessError, UsageError
from harness.fast.local_store import LocalStore
from harness.fast.local_store import read_client as fast_read_client
from conftest import artifact_folder, cli_env, copy_store

VALUES = [0.1, 0.5, -2.0]


def _copy(trained, path):
    """A copy of the trained store whose run's artifact folder is the copy's own, to damage at will."""
    source, run_id = trained
    copy_store(source, path)
    with closing(sqlite3.connect(path / "mlflow.db")) as db:
        [(artifact_uri,)] = db.execute("SELECT artifact_uri FROM runs").fetchall()
    assert artifact_uri == str(_artifact((path, run_id), "")) and os.path.isdir(artifact_uri)
    return path, run_id, f"sqlite:///{path / 'mlflow.db'}"


@pytest.fixture
def store(trained, tmp_path):
    return _copy(trained, tmp_path / "store")


def _sql(store, statement: str, *args) -> None:
    with closing(sqlite3.connect(store[0] / "mlflow.db")) as db, db:
        db.execute(statement, args)


def _artifact(store, name: str):
    path, run_id = store[:2]
    return artifact_folder(path, run_id) / name


def test_predicts_exactly_what_mlflow_client_predicts_and_writes_nothing(store, monkeypatch):
    path, run_id, uri = store
    before = hashlib.sha256((path / "mlflow.db").read_bytes()).hexdigest()
    fast, slow = fast_read_client(run_id, uri), MlflowClient(uri)
    assert isinstance(fast, LocalStore)
    a, b = fast.get_run(run_id), slow.get_run(run_id)
    for field in ("run_id", "lifecycle_stage", "artifact_uri", "experiment_id", "status"):
        assert getattr(a.info, field) == getattr(b.info, field), field
    assert a.data.params == b.data.params
    (x1, y1), (x2, y2) = runs.predict(run_id, VALUES, client=fast), runs.predict(run_id, VALUES, client=slow)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # no client given: load_model takes the fast reader
    assert all(torch.equal(v, runs.load_model(run_id, slow).state_dict()[k])
               for k, v in runs.load_model(run_id).state_dict().items())
    assert hashlib.sha256((path / "mlflow.db").read_bytes()).hexdigest() == before


SCRIPT = """
import contextlib, io, json, os, sys
from harness.cli import main
out = []
for folder, argv in json.loads(sys.argv[1]):
    os.chdir(folder)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    imported = sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "sqlalchemy", "alembic"})
    out.append([rc, stdout.getvalue(), stderr.getvalue(), imported])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def predicted(trained, tmp_path_factory):
    """What one process printed (an interpreter's start costs more than its commands): `harness predict`
    on a copy of the trained store, its default store (rc, stdout, stderr, modules imported so far) for
    a run there and one not there; then predict and reproduce in a copy at a schema revision the
    reader does not know (MLflow keeps one store object per URI, checked only when first made: a
    store of its own)."""
    good = _copy(trained, tmp_path_factory.mktemp("good") / "store")
    other = _copy(trained, tmp_path_factory.mktemp("other") / "store")
    _sql(other, "UPDATE alembic_version SET version_num = 'ffffffffffff'")
    run_id = trained[1]
    calls = [(good[0], ["predict", run_id, "--x", *map(str, VALUES)]), (good[0], ["predict", "0" * 32, "--x", "1"]),
             (other[0], ["predict", run_id, "--x", "1"]), (other[0], ["reproduce", run_id])]
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([[str(f), a] for f, a in calls])], env=cli_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return good, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_predict_on_the_default_store_never_imports_mlflow(predicted):
    (path, run_id, uri), calls = predicted
    inputs, outputs = runs.predict(run_id, VALUES, client=MlflowClient(uri))
    (rc, stdout, stderr, _), (missing_rc, _, missing_err, imported) = calls[:2]
    assert imported == []
    assert (rc, stderr) == (0, "")
    assert stdout.splitlines() == [f"{_fmt(x)} -> {_fmt(y)}" for x, y in zip(inputs.tolist(), outputs.tolist())]
    assert missing_rc == 2 and missing_err == (f"harness: error: run '{'0' * 32}' does not exist in the MLflow "
                                               "store sqlite:///mlflow.db\n")


def test_a_deleted_run_reads_as_through_mlflow_client(store):
    path, run_id, uri = store
    slow = MlflowClient(uri)
    slow.delete_run(run_id)
    fast = fast_read_client(run_id, uri)
    assert isinstance(fast, LocalStore)
    assert fast.get_run(run_id).info.lifecycle_stage == slow.get_run(run_id).info.lifecycle_stage == "deleted"
    assert torch.equal(runs.predict(run_id, VALUES, client=fast)[1], runs.predict(run_id, VALUES, client=slow)[1])


def _within(seconds: float, call):
    """What ``call`` returns or raises, or a failure if it blocks (a FIFO opened for reading does)."""
    result = {}

    def target():
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for {seconds}s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.parametrize("name", ["config.json", "state_dict.pt"])
@pytest.mark.parametrize("kind", ["fifo", "folder", "link out to a device"])
def test_an_artifact_that_is_not_a_regular_file_is_refused_at_once(store, name, kind):
    path, run_id, uri = store
    target = _artifact(store, name)
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to("/dev/zero")
    with pytest.raises(HarnessError, match=f"run {run_id} has no readable {name}") as error:
        _within(20, lambda: runs.predict(run_id, VALUES, client=fast_read_client(run_id, uri)))
    assert "\n" not in str(error.value)


def test_a_fifo_config_is_one_line_from_the_command_line(store, capsys, monkeypatch):
    from harness.cli import main

    path, run_id, uri = store
    target = _artifact(store, "config.json")
    target.unlink()
    os.mkfifo(target)
    monkeypatch.chdir(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # main() sets signal handlers, so it runs in this thread: were it to block opening the FIFO, a
    # writer opening it later ends the wait, and the test fails instead of hanging.
    rescued = []
    rescue = threading.Timer(20, lambda: (rescued.append(True), open(target, "wb").close()))
    rescue.daemon = True
    rescue.start()
    try:
        rc = main(["predict", run_id, "--x", "1"])
    finally:
        rescue.cancel()
    out = capsys.readouterr()
    assert not rescued, "blocked on the FIFO"
    assert rc == 1 and out.out == ""
    assert out.err == (f"harness: run {run_id} has no readable config.json (StoreError): "
                       "was it logged by the harness?\n")


def test_a_link_to_a_regular_file_in_the_run_s_folder_is_read_and_one_out_of_it_refused(store):
    path, run_id, uri = store
    target = _artifact(store, "state_dict.pt")
    moved = _artifact(store, "state_dict.real.pt")
    target.rename(moved)
    target.symlink_to(moved.name)
    fast = fast_read_client(run_id, uri)
    assert isinstance(fast, LocalStore)
    assert torch.equal(runs.predict(run_id, VALUES, client=fast)[1],
                       runs.predict(run_id, VALUES, client=MlflowClient(uri))[1])
    target.unlink()
    target.symlink_to(moved.rename(path / "elsewhere.pt"))
    for client in (fast, MlflowClient(uri)):  # MLflow refuses a link out of the folder: so does the reader
        with pytest.raises(HarnessError, match=f"run {run_id} has no readable state_dict.pt"):
            runs.predict(run_id, VALUES, client=client)


def test_another_schema_revision_or_mlflow_version_goes_through_mlflow_client(store, monkeypatch):
    path, run_id, uri = store
    expected = runs.predict(run_id, VALUES, client=fast_read_client(run_id, uri))[1]
    monkeypatch.setattr(compat, "MLFLOW_TESTED", ("0.0.0",))
    client = fast_read_client(run_id, uri)
    assert isinstance(client, MlflowClient)
    assert torch.equal(runs.predict(run_id, VALUES, client=client)[1], expected)
    monkeypatch.undo()
    _sql(store, "UPDATE alembic_version SET version_num = 'ffffffffffff'")
    assert LocalStore.open(uri, run_id) is None


@pytest.mark.slow
def test_a_store_at_another_revision_is_read_by_mlflow_and_refused_as_before(predicted):
    (rc, stdout, stderr, _), (reproduce_rc, _, reproduce_err, imported) = predicted[1][2:]
    assert imported
    assert rc == reproduce_rc == 1 and stdout == "" and stderr == reproduce_err  # read_client's refusal
    assert stderr.startswith("harness: cannot read the MLflow store sqlite:///mlflow.db") and stderr.count("\n") == 1


def test_stores_and_runs_it_does_not_know_go_through_mlflow_client(store, tmp_path):
    path, run_id, uri = store
    for other in ("http://127.0.0.1:9", "postgresql://u@127.0.0.1:9/db", "sqlite://", "sqlite:////dev/null"):
        assert LocalStore.open(other, run_id) is None, other
    assert LocalStore.open(uri, "a/b") is None  # MLflow's own message for an id it refuses
    assert LocalStore.open(uri, "0" * 32) is not None  # it says the run does not exist, as MLflow does
    folder = _artifact(store, "")
    (path / "mlr%75ns").symlink_to(path / "mlruns")  # MLflow would unquote the URI's path: not read here
    for artifact_uri in ("s3://bucket/artifacts", "mlflow-artifacts:/0/x/artifacts", "relative/artifacts",
                         str(path / "no-such-folder"), str(folder).replace("/mlruns/", "/mlr%75ns/")):
        _sql(store, "UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", artifact_uri, run_id)
        assert LocalStore.open(uri, run_id) is None, artifact_uri
    _sql(store, "UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", f"file://{folder}", run_id)
    assert isinstance(LocalStore.open(uri, run_id), LocalStore)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(65536))
    assert LocalStore.open(f"sqlite:///{garbage}", run_id) is None


def test_a_store_that_does_not_exist_is_refused_and_not_created(tmp_path):
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/missing/x.db"):
        with pytest.raises(UsageError, match="no MLflow store at"):
            fast_read_client("0" * 32, uri)
    assert list(tmp_path.iterdir()) == []
