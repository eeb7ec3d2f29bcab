"""The fast tier: the stores' guarantees checked in-process (no CLI subprocess), by opening the real
Optuna storage and MLflow store afterwards and reading what is in them.

Covers the trial cap (journal and SQLite, threads racing), the study lock, the repair of a torn
journal, an in-process tracked search, the audit on hand-built stores and the run sink's partial
writes. `pytest -m 'not slow'` runs this file on journals, the whole suite on SQLite storages too.
"""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import InMemoryStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from conftest import slow_cases
from harness import tracking
from harness.errors import UsageError
from harness.experiment import load
from harness.filelock import LOCK_SUFFIX
from harness.search import space as space_module
from harness.search.durable.audit import audit
from harness.search.objective import Objective
from harness.search.durable.optuna_private import storage_of
from harness.search.loop import StudyFull, ask
from harness.search.durable.storages import describe, lock_file, study_lock
from harness.search.study import create_study, existing_study, make_pruner, open_storage, repair_journal
from harness.fast.mlflow_sql import sink_for
from harness.sink import close_incomplete
from harness.tracking import RunRecord
from search_helpers import check_contract

pytestmark = [
    # Optuna warns when an RDB storage with heartbeats (open_storage's) is driven by ask/tell.
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- helpers ------------------------------------------------------------------------------------

# An Optuna SQLite storage builds its schema (~0.5 s a test): the fast tier runs each test on a journal.
@pytest.fixture(params=slow_cases(["journal", "sqlite"]))
def storage_url(request, tmp_path, monkeypatch) -> str:
    """A file-based Optuna storage URL in a fresh folder (the working directory during the test)."""
    monkeypatch.chdir(tmp_path)
    return f"journal:{tmp_path / 'j.log'}" if request.param == "journal" else f"sqlite:///{tmp_path / 'o.db'}"


@pytest.fixture
def mlflow_uri(workdir, monkeypatch) -> str:
    """``workdir`` (an empty, migrated MLflow SQLite store) as the working directory and the tracking URI."""
    monkeypatch.chdir(workdir)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def stored_trials(url: str, name: str) -> list:
    """The study's trials as plain Optuna reads them back from the store (no harness code)."""
    storage = JournalStorage(JournalFileBackend(url.split(":", 1)[1])) if url.startswith("journal:") else url
    return optuna.load_study(study_name=name, storage=storage).trials


def states(trials) -> list[str]:
    return [t.state.name for t in trials]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def own_tags(run) -> dict[str, str]:
    """A run's tags without MLflow's system tags (mlflow.user, mlflow.runName, ...)."""
    return {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}


# ---- 1. the trial cap ---------------------------------------------------------------------------

def test_the_cap_counts_running_and_finished_trials_but_not_failed_or_enqueued_ones(storage_url):
    """The cap as the search loop asks (loop.ask); on a plain study.ask() there is none."""
    study = optuna.create_study(study_name="capped", storage=open_storage(storage_url))
    first, second, third = (ask(study, 3) for _ in range(3))  # RUNNING trials count (a worker has them)
    with pytest.raises(StudyFull):
        ask(study, 3)
    assert states(stored_trials(storage_url, "capped")) == ["RUNNING"] * 3  # the refused ask created nothing

    study.tell(first, state=TrialState.FAIL)  # a failed trial is not a result: its place is free again
    fourth = ask(study, 3)
    with pytest.raises(StudyFull):
        ask(study, 3)
    for trial in (second, third, fourth):
        study.tell(trial, trial.suggest_float("x", 0, 1))

    # Another worker, with its own storage object, sees the same full study.
    other = optuna.load_study(study_name="capped", storage=open_storage(storage_url))
    with pytest.raises(StudyFull):
        ask(other, 3)

    # A trial that arrives with a template (enqueued by the user, or a heartbeat retry) gets through.
    other.enqueue_trial({"x": 0.5})
    queued = ask(other, 3)
    assert queued.suggest_float("x", 0, 1) == 0.5
    other.tell(queued, 0.5)
    with pytest.raises(StudyFull):
        ask(other, 3)

    trials = stored_trials(storage_url, "capped")
    assert states(trials) == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert trials[-1].params == {"x": 0.5} and trials[-1].value == 0.5


def test_workers_racing_for_the_last_places_never_exceed_the_cap(storage_url):
    cap, workers = 6, 4
    optuna.create_study(study_name="race", storage=open_storage(storage_url))
    start = threading.Barrier(workers)

    def worker(_) -> int:
        # Each thread is a worker of its own: its own storage object, its own study.
        study = optuna.load_study(study_name="race", storage=open_storage(storage_url))
        start.wait(timeout=30)
        made = 0
        while True:
            try:
                ask(study, cap)  # left RUNNING: counted, as a worker's trial in training is
            except StudyFull:
                return made
            made += 1

    with ThreadPoolExecutor(workers) as pool:
        made = list(pool.map(worker, range(workers)))
    assert sum(made) == cap, made
    trials = stored_trials(storage_url, "race")
    assert len(trials) == cap and sorted(t.number for t in trials) == list(range(cap))


# ---- 2. the study lock --------------------------------------------------------------------------

def test_the_study_lock_of_a_file_storage_lets_one_holder_in_at_a_time(storage_url):
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name="locked", storage=storage)
    wrapped = storage_of(study)  # what the tracker passes: Optuna's cache wrapper around an RDB storage
    stored_file = storage_url.split(":", 1)[1].removeprefix("///")
    assert lock_file(wrapped) == lock_file(storage) == Path(stored_file + LOCK_SUFFIX)  # beside the store
    assert describe(wrapped) == (storage_url if storage_url.startswith("sqlite") else f"journal:{stored_file}")

    guard, inside, most, entries = threading.Lock(), [0], [0], []
    start = threading.Barrier(2)

    def holder(i: int) -> None:
        start.wait(timeout=30)
        for _ in range(4):
            with study_lock(wrapped if i else storage, "parent-locked"):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    entries.append(i)
                time.sleep(0.02)
                with guard:
                    inside[0] -= 1

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(holder, range(2)))
    assert sorted(entries) == [0] * 4 + [1] * 4  # both got in, every time ...
    assert most[0] == 1  # ... and never together


def test_an_in_memory_storage_gets_a_lock_that_excludes_nobody():
    storage = InMemoryStorage()
    assert lock_file(storage) is None and describe(storage) == "InMemoryStorage"
    both_inside = threading.Barrier(2, timeout=10)  # broken (an error) if one holder waited on the other

    def holder(_) -> None:
        with study_lock(storage, "parent-x"):
            both_inside.wait()

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(holder, range(2)))


# ---- 3. a torn journal ----------------------------------------------------------------------------

def test_a_torn_journal_is_repaired_once_checks_passed_and_every_complete_trial_survives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "j.log"
    url = f"journal:{path}"
    study = optuna.create_study(study_name="torn", storage=open_storage(url))
    for _ in range(4):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1))
    before = study.trials  # read now: the process that wrote them is the one the crash stops
    intact = path.read_bytes()
    assert intact.endswith(b"\n")
    last_line = intact[:-1].rfind(b"\n") + 1  # the last operation: trial 3's end
    path.write_bytes(intact[:-7])  # a crash part way through writing it

    said = []
    storage = open_storage(url, notify=said.append)
    assert path.read_bytes() == intact[:-7] and not said  # opening writes nothing: a command may yet refuse
    repair_journal(storage)  # what a command does once its checks passed
    assert path.read_bytes() == intact[:last_line]  # cut back to the last complete line
    [copy] = tmp_path.glob("j.log.torn-*")
    assert copy.read_bytes() == intact[last_line:-7]  # what was cut is kept
    assert len(said) == 1 and str(copy) in said[0]

    # The study goes on: appending after the repair leaves a journal plain Optuna reads whole.
    resumed = optuna.load_study(study_name="torn", storage=storage)
    trial = resumed.ask()
    resumed.tell(trial, trial.suggest_float("x", 0, 1))
    trials = stored_trials(url, "torn")
    assert states(trials) == ["COMPLETE"] * 3 + ["RUNNING", "COMPLETE"]  # trial 3's end was what the crash lost
    assert [t.value for t in trials[:3]] == [t.value for t in before[:3]]
    assert [t.params for t in trials[:4]] == [t.params for t in before]  # trial 3's params were whole lines: kept
    assert trials[4].value == trial.params["x"]
    assert len(list(tmp_path.glob("j.log.torn-*"))) == 1  # nothing more to repair


# ---- 4. an in-process tracked search --------------------------------------------------------------

@pytest.mark.parametrize("path", slow_cases(["direct", "public"]))  # public: test_fast_paths_optional
def test_an_in_process_search_records_every_trial_in_mlflow(mlflow_uri, workdir, path, monkeypatch, capsys):
    """``public``: an MLflow release the direct SQL path was not checked on (harness.compat) writes
    the same records through MLflow's client, and says so once."""
    from harness import compat

    monkeypatch.setattr(compat, "_said", set())
    if path == "public":
        monkeypatch.setattr(compat, "MLFLOW_TESTED", ("0.0.0",))
    assert (sink_for(MlflowClient(mlflow_uri)).direct) == (path == "direct")
    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"epochs": [5, 20]})
    journal = workdir / "j.log"
    storage = open_storage(f"journal:{journal}")
    options = dict(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0), pruner=make_pruner("none"),
                   space=space, experiment="linear_regression")
    study = create_study("fast-search", storage, **options)
    with Objective("linear_regression", space, track=True, device="cpu", seed=0) as objective:
        study.optimize(objective, n_trials=4)

    study = optuna.load_study(study_name="fast-search", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert states(study.trials) == ["COMPLETE"] * 4
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.storage"] == f"journal:{journal}"
    assert parent.data.tags["harness.experiment"] == "linear_regression"
    children = [r for r in runs if r is not parent and r.info.run_id != parent.info.run_id]
    assert len(children) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)

    for trial in study.trials:
        [run] = [r for r in children if r.data.tags["optuna.trial_number"] == str(trial.number)]
        run_id = run.info.run_id
        assert trial.user_attrs["mlflow_run_id"] == run_id
        assert run.info.status == "FINISHED"
        epochs = trial.params["epochs"]
        assert [step for step, _ in history(client, run_id, "train_loss")] == list(range(epochs))
        assert run.data.metrics["final_valid_loss"] == trial.value
        assert {"state_dict.pt", "config.json"} <= {a.path for a in client.list_artifacts(run_id)}
        with open(client.download_artifacts(run_id, "config.json", str(workdir / "dl"))) as handle:
            logged = json.load(handle)
        assert (logged["lr"], logged["epochs"]) == (trial.params["lr"], epochs)
        assert f"{logged['optimizer']}+{logged['loss']}" == trial.params["optimizer_loss"]

    # The params' importances only when asked (they import scikit-learn: ~1.8 s of a search).
    assert "param_importances.png" not in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "parallel_coordinate.png"} <= {a.path for a in
                                                                      client.list_artifacts(parent.info.run_id)}
    # The whole tracking contract, as the end-to-end tests check it; and the audit agrees.
    check_contract(workdir, study, figures_for={study.best_trial.number})
    report = audit(study, open_storage(f"journal:{journal}"), client)
    assert report.clean, report.violations
    assert (report.checked_trials, report.checked_runs) == (4, 4)

    # Resuming checks the study against what it was created with.
    again = existing_study("fast-search", open_storage(f"journal:{journal}"), **options)
    assert again is not None and len(again.trials) == 4
    other = space_module.resolve(experiment, overrides={"epochs": [5, 30]})
    with pytest.raises(UsageError, match="search space"):
        existing_study("fast-search", open_storage(f"journal:{journal}"), **{**options, "space": other})
    notices = [line for line in capsys.readouterr().err.splitlines() if "direct SQLite paths" in line]
    assert notices == ([] if path == "direct" else [
        f"harness: MLflow {compat.installed('mlflow')} is not a release the harness's direct SQLite paths were "
        f"checked on ({compat.MLFLOW_TESTED[0]}): runs are written and read through MLflow's public API instead "
        "(the same records, slower for large studies)"])


# ---- 5. the audit on hand-built stores ------------------------------------------------------------

DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "epochs": IntDistribution(5, 20),
                 "optimizer_loss": CategoricalDistribution(["sgd+mse"])}
PARAMS = {"lr": 0.01, "epochs": 5, "optimizer_loss": "sgd+mse"}
RUN_PARAMS = {"lr": "0.01", "epochs": "5", "optimizer": "sgd", "loss": "mse"}


def test_the_audit_names_a_missing_run_and_a_run_left_open_and_fixes_the_open_one(mlflow_uri, workdir):
    client = MlflowClient(mlflow_uri)
    sink = sink_for(client)
    storage = open_storage(f"journal:{workdir / 'j.log'}")
    study = optuna.create_study(study_name="hand-made", storage=storage)
    parent = sink.create_run("0", "hand-made", {"harness.role": "study", "optuna.study_name": "hand-made"}, {})
    sink.close(parent, "FINISHED")
    study.set_user_attr("mlflow_parent_run_id", parent)
    # (a) trial 0: COMPLETE, but its run was never created.
    study.add_trial(create_trial(params=PARAMS, distributions=DISTRIBUTIONS, value=0.5))
    # (b) trial 1: FAIL (its configuration diverged), its run left RUNNING.
    open_run = sink.create_run("0", "trial-1", {"mlflow.parentRunId": parent, "optuna.trial_number": "1",
                                                "optuna.study_name": "hand-made"}, RUN_PARAMS)
    reason = "diverged at epoch 2"
    study.add_trial(create_trial(state=TrialState.FAIL, params=PARAMS, distributions=DISTRIBUTIONS,
                                 user_attrs={"mlflow_run_id": open_run, "fail_reason": reason}))

    missing_run = "trial 0 (COMPLETE) has 0 runs, not 1"
    report = audit(study, storage, client)
    assert not report.clean and not report.fixed
    assert sorted(report.violations) == [missing_run, f"trial 1 is FAIL but run {open_run} is RUNNING"]
    assert client.get_run(open_run).info.status == "RUNNING"  # an audit without fix writes nothing

    report = audit(study, storage, client, fix=True)
    assert report.fixed == [f"run {open_run} of trial 1: RUNNING with its trial FAIL -> FAILED"]
    assert report.violations == [missing_run]  # a COMPLETE trial's lost record cannot be made up
    run = client.get_run(open_run)
    assert run.info.status == "FAILED"
    assert run.data.tags["harness.fail_reason"] == reason
    assert run.data.tags["optuna.trial_state"] == "FAIL"
    assert states(stored_trials(f"journal:{workdir / 'j.log'}", "hand-made")) == ["COMPLETE", "FAIL"]  # nothing queued

    assert audit(study, storage, client).violations == [missing_run]


# ---- 6. the run sink ------------------------------------------------------------------------------

def test_a_partial_record_leaves_the_run_open_until_it_is_closed_as_incomplete(mlflow_uri):
    client = tracking.open_client(mlflow_uri)
    sink = sink_for(client)
    params = {"lr": "0.01", "epochs": "3"}
    run_id = sink.create_run("0", "partial", {"optuna.trial_number": "7"}, params)
    curves = {"train_loss": [0.9, 0.5, 0.25], "test_loss": [1.0, 0.75]}
    sink.write(run_id, RunRecord(params={}, history=curves, tags={"optuna.trial_state": "FAIL"}), None)

    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.end_time is None
    assert run.data.params == params
    assert own_tags(run) == {"optuna.trial_number": "7", "optuna.trial_state": "FAIL"}
    assert set(run.data.metrics) == set(curves)  # no final_* metrics: none were given
    for key, values in curves.items():
        assert history(client, run_id, key) == list(enumerate(values))

    close_incomplete(sink, run_id, "the final write failed: disk full")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert own_tags(run) == {"optuna.trial_number": "7", "optuna.trial_state": "FAIL",
                             "harness.record_incomplete": "the final write failed: disk full",
                             "harness.fail_reason": "the final write failed: disk full"}
    for key, values in curves.items():  # closing adds nothing to, and takes nothing from, the record
        assert history(client, run_id, key) == list(enumerate(values))

    # A finished record: the run ends FINISHED with exactly what it was given.
    done = sink.create_run("0", "finished", {}, params)
    sink.write(done, RunRecord(params={"seed": "1"}, history={"train_loss": [0.5, 0.25]},
                               finals={"final_test_loss": 0.125}, tags={"optuna.trial_state": "COMPLETE"},
                               artifacts={"config.json": b"{}"}), "FINISHED")
    run = client.get_run(done)
    assert run.info.status == "FINISHED"
    assert run.data.params == {**params, "seed": "1"}
    assert run.data.metrics == {"train_loss": 0.25, "final_test_loss": 0.125}
    assert history(client, done, "train_loss") == [(0, 0.5), (1, 0.25)]
    assert own_tags(run) == {"optuna.trial_state": "COMPLETE"}
    assert [a.path for a in client.list_artifacts(done)] == ["config.json"]


@pytest.mark.slow  # workers racing on one SQLite store
def test_batch_writers_sharing_one_sqlite_store_outwait_a_lock_held_past_their_busy_timeout(mlflow_uri, monkeypatch):
    """Two `--batch` workers on one embedded store: each waits out the other's write lock (and any
    other holder's) instead of dying with "database is locked" and leaving its runs RUNNING."""
    import sqlite3

    from harness.fast import mlflow_sql

    import mlflow.store.db.utils as mlflow_db
    import sqlalchemy

    # The 20 s busy timeout (MLflow's sessions set it, and mlflow_sql's copy of it) and the size of a
    # transaction, scaled down together with the lock below.
    monkeypatch.setattr(mlflow_db, "sql", SimpleNamespace(
        text=lambda statement: sqlalchemy.text(statement.replace("busy_timeout = 20000", "busy_timeout = 100"))))
    monkeypatch.setattr(mlflow_sql, "BUSY_TIMEOUT_MS", 100, raising=False)
    monkeypatch.setattr(mlflow_sql, "TRANSACTION_ROWS", 100, raising=False)
    client = tracking.open_client(mlflow_uri)
    experiment = client.create_experiment("locks")
    sinks = [sink_for(tracking.open_client(mlflow_uri)) for _ in range(2)]
    runs = [sink.create_runs(experiment, [(f"trial-{w}-{i}", {}, {"lr": "0.1"}) for i in range(6)])
            for w, sink in enumerate(sinks)]
    curve = [1.0 / (e + 1) for e in range(60)]
    record = RunRecord(params={}, history={"train_loss": curve}, finals={"final_train_loss": curve[-1]})
    commits = []  # a record of 61 values is a transaction of its own: the other worker gets in between
    for sink in sinks:
        sqlalchemy.event.listen(sink.client._tracking_client.store.engine, "commit", commits.append)

    holder = sqlite3.connect(mlflow_uri[len("sqlite:///"):], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # SQLite's write lock, as a long transaction of a third writer holds it
    with ThreadPoolExecutor(2) as pool:
        writes = [pool.submit(sink.write_many, [(r, record, "FINISHED") for r in ids]) for sink, ids in zip(sinks, runs)]
        time.sleep(1.0)  # ten times the writers' busy timeout
        holder.execute("COMMIT")
        for write in writes:
            write.result()
    holder.close()
    assert len(commits) >= 12
    for run_id in runs[0] + runs[1]:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics == {"train_loss": curve[-1],
                                                                      "final_train_loss": curve[-1]}
        assert history(client, run_id, "train_loss") == list(enumerate(curve))
