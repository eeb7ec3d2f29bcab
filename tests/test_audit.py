"""The audit on a real study and its runs, tampered with the way a user, a crash or a stray edit does:
every finding is said in one line, and what --fix says it does is what is then in the stores."""
import os

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState, create_trial

from conftest import AUDITED, copy_store
from harness.fast.mlflow_sql import sink_for
from harness.search.durable.audit import audit
from harness.search.study import open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
optuna.logging.set_verbosity(optuna.logging.WARNING)
STUDY = AUDITED  # the study of conftest's searched_once


@pytest.fixture
def mlflow_uri(workdir, monkeypatch) -> str:
    monkeypatch.chdir(workdir)
    for name in [n for n in os.environ if n.startswith(("MLFLOW_", "OPTUNA_"))]:
        monkeypatch.delenv(name)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def searched(searched_once, tmp_path, monkeypatch):
    """A copy of the module's search to tamper with (was a search of its own per test): (journal URL,
    MLflow client)."""
    workdir = copy_store(searched_once, tmp_path / "copy")
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return f"journal:{workdir / 'j.log'}", MlflowClient(uri)


def _reopened(url: str):
    storage = open_storage(url)
    return optuna.load_study(study_name=STUDY, storage=storage), storage


def _run_of(url: str, number: int) -> str:
    return _reopened(url)[0].trials[number].user_attrs["mlflow_run_id"]


def test_a_trial_whose_value_its_run_does_not_log_is_reported(searched):
    url, client = searched
    run_id = _run_of(url, 0)
    client.log_metric(run_id, "final_valid_loss", 42.0, step=0)  # a later write over the run's final value

    report = audit(*_reopened(url), client, fix=True)
    [line] = report.violations
    assert f"trial 0: run {run_id} logs final_valid_loss=42.0, but the trial's values are [" in line
    assert "--fix cannot tell which is right and changes neither" in line and not report.fixed


def test_epochs_far_beyond_the_steps_cost_no_memory(searched):
    url, client = searched
    journal = url.split(":", 1)[1]
    study, _ = _reopened(url)
    epochs = study.trials[1].params["epochs"]
    text = open(journal).read()
    at = text.index('"param_name":"epochs"', text.index('"trial_id":1,'))
    edited = text[:at] + text[at:].replace(f'"param_value_internal":{epochs}', '"param_value_internal":1000000000000',
                                           1)
    open(journal, "w").write(edited)
    assert _reopened(url)[0].trials[1].params["epochs"] == 10 ** 12

    run_id = _run_of(url, 1)
    report = audit(*_reopened(url), client)  # a list of 10**12 steps would end it in a MemoryError
    assert f"trial 1: run {run_id} has {epochs} train_loss points, not steps 0..999999999999 once each" \
        in report.violations


def test_a_deleted_run_of_a_trial_is_reported_and_restored(searched):
    url, client = searched
    run_id = _run_of(url, 1)
    client.delete_run(run_id)

    assert audit(*_reopened(url), client).violations == [
        f"trial 1 (COMPLETE): its run {run_id} is deleted (in MLflow's trash); --fix restores it"]
    report = audit(*_reopened(url), client, fix=True)
    assert report.fixed == [f"run {run_id} of trial 1: deleted -> restored"] and report.clean
    assert client.get_run(run_id).info.lifecycle_stage == "active"
    assert audit(*_reopened(url), client).clean


def test_an_interrupted_retry_of_a_retry_is_queued_once(mlflow_uri, workdir):
    """Optuna's retry of a retry keeps the first trial's number: the trials between are retried too."""
    from harness.search.session import recover_stale_trials

    url = f"journal:{workdir / 'j.log'}"
    study, storage = optuna.create_study(study_name=STUDY, storage=open_storage(url)), None
    sink = sink_for(MlflowClient(mlflow_uri))
    parent = sink.create_run("0", STUDY, {"harness.role": "study", "optuna.study_name": STUDY}, {})
    sink.close(parent, "FINISHED")
    study.set_user_attr("mlflow_parent_run_id", parent)
    x = optuna.distributions.FloatDistribution(0, 1)
    interrupted = {"fail_reason": "interrupted"}
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions={"x": x},
                                 user_attrs=interrupted))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions={"x": x},
                                 user_attrs=interrupted, system_attrs={"failed_trial": 0, "retry_history": [0]}))
    study.add_trial(create_trial(state=TrialState.WAITING, params={"x": 0.5}, distributions={"x": x},
                                 system_attrs={"failed_trial": 0, "retry_history": [0, 1]}))

    study, storage = _reopened(url)
    for _ in range(2):
        report = audit(study, storage, MlflowClient(mlflow_uri), fix=True)
        assert not [line for line in report.fixed if "retried" in line] and report.clean, report
    recover_stale_trials(*_reopened(url))  # what a search does first
    trials = _reopened(url)[0].trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]


def test_what_the_audit_says_fix_queues_fix_queues_once(searched):
    """A COMPLETE trial whose run was closed incomplete (its last writes failed) and whose retry was
    never queued (the journal write for it failed too)."""
    from harness.sink import close_incomplete

    url, client = searched
    run_id = _run_of(url, 0)
    close_incomplete(sink_for(client), run_id, "state_dict.pt missing")

    [line] = audit(*_reopened(url), client).violations
    assert line.startswith(f"trial 0: run {run_id} is incomplete") and line.endswith("--fix queues it")
    report = audit(*_reopened(url), client, fix=True)
    assert report.clean and report.fixed == [
        f"trial 0: run {run_id} is incomplete (state_dict.pt missing) -> configuration retried"]
    assert audit(*_reopened(url), client, fix=True).fixed == []
    trials = _reopened(url)[0].trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.WAITING]
    assert trials[2].params == trials[0].params and trials[2].system_attrs["failed_trial"] == 0


def test_a_trial_that_lost_a_param_its_run_has_is_reported(searched):
    """A journal line cut by a repair can take a finished trial's param with it: the trial then
    looks whole, and comparing only the params it still has would call it clean."""
    import json

    url, client = searched
    path = url.removeprefix("journal:")
    lines = open(path).read().splitlines(keepends=True)
    lost = [i for i, line in enumerate(lines)
            if json.loads(line).get("param_name") == "epochs" and json.loads(line).get("trial_id") == 0]
    assert len(lost) == 1
    with open(path, "w") as journal:
        journal.writelines(line for i, line in enumerate(lines) if i != lost[0])
    report = audit(*_reopened(url), client)
    assert not report.clean and any("trial 0 (COMPLETE) has no epochs" in v for v in report.violations), \
        report.violations
    assert audit(*_reopened(url), client, fix=True).violations  # nothing --fix can do: still said


def test_a_logged_model_a_gone_process_left_pending_is_reported_and_failed(searched):
    """Was: a process killed while it logged a trial's MLflow Model left it PENDING for good, and the
    audit said clean. One whose process lives (being logged now), or without a record and younger
    than workers.OWNERLESS_S, is left alone."""
    import json
    import subprocess
    import sys

    from harness.schema import PROCESS_TAG
    from harness.search.durable.workers import identity

    url, client = searched
    run = client.get_run(_run_of(url, 0))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    made = {who: client.create_logged_model(run.info.experiment_id, name="m", source_run_id=run.info.run_id,
                                            tags=None if record is None else {PROCESS_TAG: json.dumps(record)}).model_id
            for who, record in (("gone", {**identity(), "pid": dead.pid}), ("alive", identity()), ("none", None))}

    report = audit(*_reopened(url), client)
    assert report.violations == [f"logged model {made['gone']} of run {run.info.run_id} is PENDING but the process "
                                 "logging it is gone; --fix fails it"]
    report = audit(*_reopened(url), client, fix=True)
    assert report.fixed == [f"logged model {made['gone']} of run {run.info.run_id}: PENDING with the process logging "
                            "it gone -> FAILED"] and report.clean
    assert {who: client.get_logged_model(m).status.name for who, m in made.items()} == \
        {"gone": "FAILED", "alive": "PENDING", "none": "PENDING"}
    assert audit(*_reopened(url), client).clean
