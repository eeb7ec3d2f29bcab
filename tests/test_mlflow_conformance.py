"""The one-transaction SQL write (harness/fast/mlflow_sql.py) against MLflow's public path, value for value.

Both write the same record into two runs of one store; everything MLflow's public API reads back
must be equal: run data (latest metrics, params, tags), status, metric histories, search_runs
filters and ordering, and the UI's REST endpoints. On an MLflow release outside compat.MLFLOW_TESTED
the direct path is off and the first test fails, saying so: re-run this file on the new release,
then add it to MLFLOW_TESTED and constraints.txt.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import slow_cases
from harness import compat, tracking
from harness.fast import mlflow_sql
from harness.fast.mlflow_sql import sink_for
from harness.schema import FAIL_REASON_TAG
from harness.tracking import RunRecord

EPOCHS = 600  # 1200 curve values: more than one public log_batch call


def record() -> RunRecord:
    train = [1.0 / (e + 1) for e in range(EPOCHS)]
    test = [0.5 + 0.1 * math.sin(e) for e in range(EPOCHS)]
    test[7] = -0.25
    return RunRecord(params={}, history={"train_loss": train, "test_loss": test, "train_acc": [0.5] * EPOCHS},
                     finals={"final_train_loss": train[-1], "final_test_loss": test[-1], "weight": 0.6999,
                             "big": math.inf, "small": -math.inf, "nothing": math.nan, "count": 3},
                     tags={"optuna.trial_state": "COMPLETE", "harness.fail_reason": "x" * 500},
                     artifacts={"state_dict.pt": bytes(range(256)) * 40, "config.json": b'{"lr": 0.01}'})


KINDS = ["one run", "a batch"]


def _records(client, kind: str, name: str = "conformance") -> tuple[str, str, str]:
    """One record written by MLflow's public path and the same by the direct path, in a new
    experiment: alone (create_run, write), or as one of a batch's runs (create_runs, write_many: one
    transaction). (experiment, public run, direct run)"""
    experiment = client.create_experiment(name)
    params = {"lr": "0.01", "epochs": str(EPOCHS), "optimizer": "sgd"}
    public = client.create_run(experiment, run_name="public", tags={"optuna.trial_number": "1"}).info.run_id
    tracking.write(client, public, RunRecord(params=params, history={}))
    tracking.write(client, public, record())
    client.set_terminated(public, "FINISHED")
    sink = sink_for(client)
    if kind == "one run":
        direct = sink.create_run(experiment, "direct", {"optuna.trial_number": "1"}, params)
        sink.write(direct, record(), "FINISHED")
    else:
        direct, other = sink.create_runs(experiment, [("direct", {"optuna.trial_number": "1"}, params),
                                                      ("other", {"optuna.trial_number": "2"}, {"lr": "0.1"})])
        sink.write_many([(other, RunRecord(params={}, history={"train_loss": [9.0]}, tags={"x": "y"}), "KILLED"),
                         (direct, record(), "FINISHED")])
        assert client.get_run(other).info.status == "KILLED" and client.get_run(other).data.params == {"lr": "0.1"}
        client.delete_run(other)  # out of the comparisons below, which search the experiment
    return experiment, public, direct


@pytest.fixture(params=slow_cases(KINDS))  # a batch: in the whole suite
def store(request, workdir, monkeypatch):
    """A store holding the records of one kind (see _records)."""
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.search_runs, which takes no URI
    client = tracking.open_client(uri)
    return uri, client, *_records(client, request.param)


def test_the_direct_path_is_on_for_this_mlflow(workdir):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")  # a copy of the suite's migrated store: no schema built
    assert mlflow_sql.DirectWriter.for_client(client) is not None, (
        f"MLflow {mlflow.__version__} is not in compat.MLFLOW_TESTED {compat.MLFLOW_TESTED}: the harness writes "
        "through MLflow's slower public path. Run this file on it, then add it there and to constraints.txt.")


def _same_run(client, public: str, direct: str) -> None:
    a, b = client.get_run(public), client.get_run(direct)
    assert (a.info.user_id, a.info.experiment_id) == (b.info.user_id, b.info.experiment_id)
    assert b.info.run_name == b.data.tags["mlflow.runName"] == "direct"
    assert a.info.artifact_uri.replace(public, direct) == b.info.artifact_uri
    assert {k: repr(v) for k, v in a.data.metrics.items()} == {k: repr(v) for k, v in b.data.metrics.items()}
    assert a.data.params == b.data.params
    ignore = {"mlflow.runName"}
    assert {k: v for k, v in a.data.tags.items() if k not in ignore} == \
           {k: v for k, v in b.data.tags.items() if k not in ignore}
    assert (a.info.status, a.info.lifecycle_stage) == (b.info.status, b.info.lifecycle_stage) == ("FINISHED", "active")
    assert b.info.end_time is not None and b.info.end_time >= b.info.start_time


def test_what_mlflow_reads_back_is_the_same(store, tmp_path):
    uri, client, experiment, public, direct = store
    _same_run(client, public, direct)
    for key in ("train_loss", "test_loss", "train_acc", "final_test_loss", "big", "small", "nothing", "count"):
        a = sorted((m.step, repr(m.value)) for m in client.get_metric_history(public, key))
        b = sorted((m.step, repr(m.value)) for m in client.get_metric_history(direct, key))
        assert a == b and a, key
    assert client.get_run(direct).data.metrics["big"] == client.get_run(public).data.metrics["big"] > 1e308
    assert math.isnan(client.get_run(direct).data.metrics["nothing"])
    # search_runs: filters on metrics, params and tags, and ordering by a metric, see both alike.
    for where in ("metrics.final_test_loss < 10", "metrics.weight > 0.5", "params.lr = '0.01'",
                  "tags.`optuna.trial_state` = 'COMPLETE'", "attributes.status = 'FINISHED'", "metrics.small < 0"):
        found = {r.info.run_id for r in client.search_runs([experiment], filter_string=where)}
        assert found == {public, direct}, where
    # Artifacts: the direct path writes them into the run's local folder, log_artifacts copies them there.
    listed = [sorted((f.path, f.file_size, f.is_dir) for f in client.list_artifacts(run)) for run in (public, direct)]
    assert listed[0] == listed[1] and len(listed[0]) == 2
    for name, content in record().artifacts.items():
        for run in (public, direct):
            assert Path(client.download_artifacts(run, name, str(tmp_path / run))).read_bytes() == content
    frame = mlflow.search_runs([experiment], order_by=["metrics.final_test_loss ASC"], output_format="pandas")
    assert set(frame["run_id"]) == {public, direct} and frame["metrics.final_test_loss"].nunique() == 1


UI = """
import json, os, sys
os.environ["_MLFLOW_SERVER_FILE_STORE"] = sys.argv[1]
os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = "./artifacts"
from mlflow.server import app
client = app.test_client()
out = {}
for run in sys.argv[2:]:
    got = client.get("/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
                     query_string={"run_ids": run, "metric_key": "train_loss", "max_results": 1000})
    out[run] = {"history": [(m["step"], m["value"]) for m in got.get_json()["metrics"]]}
    got = client.get("/ajax-api/2.0/mlflow/runs/get", query_string={"run_id": run}).get_json()["run"]
    out[run]["metrics"] = sorted((m["key"], m["value"], m["step"]) for m in got["data"]["metrics"])
    out[run]["status"] = got["info"]["status"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ui_views(tmp_path_factory, migrated_db):
    """What the UI's REST endpoints show of the records of both kinds, each in an experiment of one
    store, asked of one server process (an interpreter's start costs more than the requests):
    {kind: (public run, direct run, {run: what the endpoints showed})}."""
    from conftest import new_store

    folder = new_store(tmp_path_factory.mktemp("ui"), migrated_db)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        client = tracking.open_client(uri)
        made = {kind: _records(client, kind, f"conformance ({kind})")[1:] for kind in KINDS}
    runs = [run for pair in made.values() for run in pair]
    out = subprocess.run([sys.executable, "-c", UI, uri, *runs], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {kind: (public, direct, got) for kind, (public, direct) in made.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_ui_endpoints_show_the_same(ui_views, kind):
    public, direct, got = ui_views[kind]
    assert got[public]["history"] == got[direct]["history"] and len(got[direct]["history"]) == EPOCHS
    assert got[public]["metrics"] == got[direct]["metrics"] and got[direct]["status"] == "FINISHED"


def test_a_record_the_direct_path_does_not_take_goes_the_public_way(store):
    uri, client, experiment, public, direct = store
    sink = sink_for(client)
    run = sink.create_run(experiment, "odd", {}, {"lr": "1"})
    odd = RunRecord(params={}, history={"loss with (parens)": [1.0, 2.0]}, tags={"t": "v"})
    assert not sink._direct.write(run, [("loss with (parens)", 1.0, 0)], {}, {}, None)
    with pytest.raises(Exception, match="Names may only contain"):  # MLflow's own validation speaks
        sink.write(run, odd, "FINISHED")
    assert client.get_run(run).info.status == "RUNNING"
    # A run that already has one of the record's metrics: MLflow's merge rules apply, not an insert.
    sink.write(run, RunRecord(params={}, history={"loss": [1.0]}), None)
    assert not sink._direct.write(run, [("loss", 0.5, 1)], {}, {}, None)
    sink.write(run, RunRecord(params={}, history={}, finals={"loss": 0.5}), "FINISHED")
    assert sorted(m.value for m in client.get_metric_history(run, "loss")) == [0.5, 1.0]
    assert client.get_run(run).info.status == "FINISHED"


def test_the_fast_reader_knows_the_schema_revision_of_a_new_store(migrated_db):
    """harness/local_store.py reads MLflow's tables as this revision has them, and stores at any
    other revision go through MlflowClient: a new store must be at it, or predict loses its fast path."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(migrated_db)) as db:  # made by MlflowClient on a new file
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(compat.MLFLOW_SCHEMA_REVISION,)], (
            f"MLflow {mlflow.__version__} migrates a new store to another revision: check that local_store "
            "and mlflow_sql still use its tables right, then update MLFLOW_SCHEMA_REVISION")


def test_a_rename_in_the_record_renames_the_run_as_mlflow_does(store):
    """A pruned trial's run is renamed in its final write: the name the runs table shows, the tag
    and search by run name must agree with MLflow's own rename."""
    uri, client, experiment, public, direct = store
    sink = sink_for(client)
    names = {}
    for way in ("public", "direct"):
        run = sink.create_run(experiment, f"trial-{way}", {"optuna.trial_number": "7"}, {"lr": "1"})
        rec = RunRecord(params={}, history={"test_loss": [1.0, 0.5]},
                        tags={"mlflow.runName": f"trial-{way} (pruned at epoch 1)", "mlflow.note.content": "**pruned**"})
        if way == "public":
            tracking.write(client, run, rec)
            client.set_terminated(run, "KILLED")
        else:
            assert sink._direct.write(run, [("test_loss", 1.0, 0), ("test_loss", 0.5, 1)], rec.tags, {}, "KILLED")
        names[way] = run
    for way, run in names.items():
        got = client.get_run(run)
        assert got.info.run_name == got.data.tags["mlflow.runName"] == f"trial-{way} (pruned at epoch 1)"
        assert got.data.tags["mlflow.note.content"] == "**pruned**" and got.info.status == "KILLED"
        found = client.search_runs([experiment], filter_string=f"attributes.run_name = 'trial-{way} (pruned at epoch 1)'")
        assert [r.info.run_id for r in found] == [run]


# ---- the direct path takes exactly what MLflow's log_batch takes -----------------------------------

NAMES = ["w/", "a//b", "./c", "../x", "", "x" * 250, "x" * 251, "caf\u00e9", "a\u0301", "with space", ".",
         "a/./b", "trailing/", "/lead", "a:b", "a\\b", "loss (test)", "ok_name-1.2/x"]


@pytest.fixture
def fresh(tmp_path, migrated_db):
    import shutil

    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, sink_for(client), client.create_experiment("names", artifact_location=str(tmp_path / "a"))


@pytest.mark.parametrize("kind", slow_cases(["metric", "param", "tag"]))
def test_the_direct_path_takes_a_name_exactly_when_log_batch_does(fresh, kind):
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    client, sink, experiment = fresh
    for name in NAMES:
        direct, public = (sink.create_run(experiment, "r", {}, {}) for _ in range(2))
        entry = {"metric": ([(name, 1.0, 0)], {}, {}), "param": ([], {}, {name: "v"}),
                 "tag": ([], {name: "v"}, {})}[kind]
        taken = sink._direct.write(direct, *entry, None)
        try:
            client.log_batch(public, metrics=[Metric(name, 1.0, 0, 0)] if kind == "metric" else [],
                             params=[Param(name, "v")] if kind == "param" else [],
                             tags=[RunTag(name, "v")] if kind == "tag" else [])
            refusal = None
        except MlflowException as exc:
            refusal = exc.message
        assert taken == (refusal is None), f"{kind} {name!r}: direct {taken}, log_batch {refusal}"
        if taken:
            a, b = client.get_run(public).data, client.get_run(direct).data
            assert (a.metrics, a.params, own(a.tags)) == (b.metrics, b.params, own(b.tags)), name
            continue
        # Refused: the sink takes the public path, which says why, and the run is left as it was.
        with pytest.raises(MlflowException) as raised:
            sink.write(direct, RunRecord(params=entry[2], history={name: [1.0]} if kind == "metric" else {},
                                         tags=entry[1]), "FINISHED")
        assert raised.value.message == refusal
        run = client.get_run(direct)
        assert run.info.status == "RUNNING" and not run.data.metrics and not run.data.params, name


def own(tags: dict) -> dict:
    return {k: v for k, v in tags.items() if not k.startswith("mlflow.")}


# Records MLflow's log_batch takes that an INSERT of every value as given would not store as it does.
ODD = {
    "a value twice at one step": {"history": {"a": [1.0, 2.0]}, "finals": {"a": 1.0}},
    "two values at one step": {"history": {"a": [1.0, 2.0]}, "finals": {"a": 3.0}},
    "a lower value at the last step": {"history": {"a": [1.0, 5.0]}, "finals": {"a": 2.0}},
    "nan twice": {"history": {"a": [math.nan, math.nan]}, "finals": {"a": math.nan}},
    "nan beside 0.0": {"history": {"a": [0.0]}, "finals": {"a": math.nan}},
    "0.0 beside nan": {"history": {"a": [math.nan]}, "finals": {"a": 0.0}},
    "inf beside the largest double": {"history": {"b": [math.inf]}, "finals": {"b": 1.7976931348623157e308}},
    "-inf beside the lowest double": {"history": {"b": [-1.7976931348623157e308]}, "finals": {"b": -math.inf}},
    "-0.0 beside 0.0": {"history": {"z": [-0.0, 0.0]}, "finals": {"z": 0.0}},
    "an int beside its float": {"history": {"n": [3.0]}, "finals": {"n": 3}},
    "tiny and huge values": {"history": {"t": [5e-324, 1e308, -1e-310]}, "finals": {}},
}


@pytest.mark.parametrize("case", ODD)
def test_a_record_log_batch_takes_is_stored_as_log_batch_stores_it(fresh, case):
    client, sink, experiment = fresh
    rec = RunRecord(params={}, history=ODD[case]["history"], finals=ODD[case]["finals"], tags={"t": "v"})
    public = sink.create_run(experiment, "public", {}, {})
    tracking.write(client, public, rec)
    client.set_terminated(public, "FINISHED")
    direct = sink.create_run(experiment, "direct", {}, {})
    metrics = [(k, v, s) for k, vs in rec.history.items() for s, v in enumerate(vs)] + \
              [(k, v, 0) for k, v in rec.finals.items()]
    assert sink._direct.write(direct, metrics, rec.tags, {}, "FINISHED"), case  # taken, not left to MLflow
    a, b = client.get_run(public), client.get_run(direct)
    assert {k: repr(v) for k, v in a.data.metrics.items()} == {k: repr(v) for k, v in b.data.metrics.items()}
    assert a.info.status == b.info.status == "FINISHED"
    for key in a.data.metrics:
        stored = [sorted((m.step, repr(m.value)) for m in client.get_metric_history(run, key)) for run in (public, direct)]
        assert stored[0] == stored[1], key


@pytest.mark.parametrize("metrics", [[("s", 1.0, 2 ** 63)], [("v", 10 ** 400, 0)]],
                         ids=["step past 64 bits", "an int no double holds"])
def test_a_record_the_direct_path_cannot_store_as_given_goes_to_mlflow_untouched(fresh, metrics):
    """Never an error half way through the transaction: MLflow's public path decides, and refuses."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client, sink, experiment = fresh
    run = sink.create_run(experiment, "r", {}, {})
    assert sink._direct.write(run, metrics, {}, {}, "FINISHED") is False
    assert client.get_run(run).info.status == "RUNNING" and not client.get_run(run).data.metrics
    with pytest.raises((MlflowException, OverflowError)):  # the client converts the value first
        client.log_batch(run, metrics=[Metric(k, v, 0, s) for k, v, s in metrics])


NAMED = """
import torch
from torch import nn
from harness.experiment import Data, Experiment

def make_data():
    X = torch.linspace(0, 1, 20).unsqueeze(1)
    return Data(X[:15], X[:15], X[15:], X[15:])

EXPERIMENT = Experiment(name="named", make_data=make_data, make_model=lambda: nn.Linear(1, 1), losses=("mse",),
                        defaults={{"optimizer": "sgd", "loss": "mse", "epochs": 2}}, {field})
"""


@pytest.mark.parametrize("field, name", [
    ('scalars=lambda model: {"w/": 1.0}', "w/"),
    ('scalars=lambda model: {"w": 1.0}, truth={"w": 0.5}, metrics=lambda p, y: {"a" * 240: (p - y).abs().mean()}',
     "final_train_" + "a" * 28 + "..."),  # a name in a message is cut short: it may be of any length
    ('metrics=lambda p, y: {"a\\u0301": (p - y).abs().mean()}', "train_a\u0301"),
])
@pytest.mark.parametrize("command", ["train", "search"])
def test_an_experiment_logging_a_name_mlflow_refuses_is_refused_before_training(tmp_path, capsys, monkeypatch,
                                                                                 command, field, name):
    """Not a run that trains and then FAILS on its record, with every later summary of its study."""
    from search_helpers import check_refused_in_process

    code, folder = tmp_path / "code", tmp_path / "run"
    code.mkdir(), folder.mkdir()
    (code / "named.py").write_text(NAMED.format(field=field))
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    check_refused_in_process([command, "--experiment", str(code / "named.py")],
                             f"logs a metric named {name!r}, which MLflow refuses", capsys, folder, monkeypatch)


@pytest.mark.parametrize("field, line", [
    ('scalars=lambda model: {"final_valid_loss": 1.0}', "has a scalar named 'final_valid_loss', a name the run logs"),
    ('scalars=lambda model: {"train_loss": 1.0}', "has a scalar named 'train_loss', a name the run logs"),
    ('scalars=lambda model: {"w": 10 ** 400}', "scalars() gave 'w' = 1000"),
    ('scalars=lambda model: {"w": "high"}', "scalars() gave 'w' = 'high', not a number a float holds"),
    ('scalars=lambda model: [1.0]', "scalars() must return a dict of names to numbers, got list"),
    ('metrics=lambda p, y: {"w/": (p - y).abs().mean()}', "metrics() gave a value named 'w/'; names must be"),
    ('metrics=lambda p, y: {"loss": (p - y).abs().mean()}', "metrics() gave a value named 'loss', the name of the "
                                                           "run's own loss"),
])
@pytest.mark.parametrize("command", ["train", "search"])
def test_a_scalar_or_metric_that_would_clash_or_not_store_is_refused_before_training(tmp_path, capsys, monkeypatch, command,
                                                                                      field, line):
    """A metric's name that is no identifier is named in the refusal. A scalar named like a curve the run logs mixed its value into that curve (audit then found the
    run's points and finals wrong); one no float holds stopped the search as a store failure."""
    from search_helpers import check_refused_in_process

    code, folder = tmp_path / "code", tmp_path / "run"
    code.mkdir(), folder.mkdir()
    (code / "named.py").write_text(NAMED.format(field=field))
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    check_refused_in_process([command, "--experiment", str(code / "named.py")], line, capsys, folder, monkeypatch)


# Names the pre-flight's model and 8-sample batch do not show: an experiment may name its values
# after what it sees (a batch's size, the epoch, the trained weights).
LATE = {
    "a long name on a bigger batch": ('metrics=lambda p, y: {("a" * 300 if len(p) > 8 else "err"): (p - y).abs().mean()}',
                                      "logs a metric named 'train_" + "a" * 34 + "...', which MLflow refuses"),
    "a scalar named as a curve after training": (
        'scalars=lambda model, calls=[]: calls.append(1) or ({"w": 1.0} if len(calls) == 1 else {"final_train_loss": 1.0})',
        "has a scalar named 'final_train_loss', a name the run logs itself"),
    "a curve that starts late": (
        'metrics=lambda p, y, calls=[]: calls.append(1) or {("e" if len(calls) < 20 else "f"): (p - y).abs().mean()}',
        "the experiment's values must have the same names every epoch"),
}


# A search per case (~1 s): the fast tier fails each case in a training, the whole suite in searches too.
@pytest.mark.parametrize("case", LATE)
@pytest.mark.parametrize("command", slow_cases(["train", "search", "search --batch"]))
def test_a_name_mlflow_refuses_that_shows_only_after_the_pre_flight_fails_that_run_alone(tmp_path, capsys, monkeypatch,
                                                                                          command, case):
    """The run is FAILED with the reason in one line (the name cut short), keeps the curves MLflow
    takes, and holds no value under a name MLflow refuses; a search goes on and ends with its
    parent closed. Before: the run's record failed to write and the search stopped as if tracking
    had failed, telling the user to check the store."""
    from harness.cli import main

    field, line = LATE[case]
    # its own module (a process keeps one per file content): the counters below start at 0
    (tmp_path / "named.py").write_text(NAMED.format(field=field) + f"# {command} {case}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = (["train", "--epochs", "30"] if command == "train" else
            ["search", "--n-trials", "4", "--epochs-range", "30", "31", "--pairs", "sgd+mse"]
            + (["--batch", "4"] if command.endswith("--batch") else [])) + ["--experiment", str(tmp_path / "named.py")]
    assert main(argv) == (1 if command == "train" else 0)
    err = capsys.readouterr().err
    assert line in err and "a" * 60 not in err and "Traceback" not in err, err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trials = [r for r in runs if command == "train" or "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == (1 if command == "train" else 4) and len(runs) == len(trials) + (command != "train")
    for run in runs:
        assert run.info.status in (("FINISHED",) if run not in trials else ("FAILED", "FINISHED")), run.data.tags
        assert all(tracking.accepted_name(name) for name in run.data.metrics)
    failed = [run for run in trials if run.info.status == "FAILED"]
    assert failed == trials or (case == "a curve that starts late" and failed)  # its later trials start with "f"
    for run in failed:
        assert line in run.data.tags[FAIL_REASON_TAG] and "a" * 60 not in run.data.tags[FAIL_REASON_TAG]
    # The curves so far are kept (a stack stops at the first member that fails: those after it have none yet).
    kept = [bool(client.get_metric_history(run.info.run_id, "train_loss")) for run in failed]
    assert all(kept) or (command.endswith("--batch") and any(kept)), kept


def test_a_metric_named_loss_never_replaces_the_runs_own_loss_outside_the_pre_flight_either():
    """A plain Optuna script's trials skip the CLI's pre-flight: the loop and a stack refuse the name
    themselves (the trial fails with the reason) instead of logging the metric as the loss."""
    import torch

    from harness import config, training
    from harness.fast import batched
    from harness.errors import ExperimentCodeError
    from harness.experiment import Experiment, load

    reference = load("linear_regression")
    named = Experiment("named_loss", reference.make_data, reference.make_model,
                       metrics=lambda p, y: {"loss": (p - y).abs().mean()})
    data = named.load_data()
    cfgs = [config.resolve({"experiment": "named_loss", "seed": 42, "device": "cpu", "epochs": 3, "loss": "mse",
                            "lr": lr}, experiment=named, n_train=data.n_train)[0] for lr in (0.01, 0.02)]
    with pytest.raises((TypeError, ExperimentCodeError), match="named 'loss', the name of the run's own loss"):
        training.train(cfgs[0], named, data)
    with pytest.raises(TypeError, match="named 'loss', the name of the run's own loss"):
        batched.train_stack(cfgs, named, data)
    assert torch.is_tensor(training.train(cfgs[0], reference, data).model.weights)  # the reference still trains
