"""Runs go to an MLflow experiment named after the harness experiment (issue 29, item 5), so that
`mlflow ui` lists each experiment's runs on their own; --mlflow-experiment, $MLFLOW_EXPERIMENT_NAME
and $MLFLOW_EXPERIMENT_ID still say otherwise, and a study keeps its trials with its parent run
wherever that is."""
import pytest

from conftest import all_runs, client_for
from harness import schema
from harness.cli import main

pytestmark = pytest.mark.slow  # whole trainings and searches in-process

SEARCH = ["search", "--n-trials", "2", "--no-progress", "--epochs-range", "5", "10"]


def experiment_of(workdir, run) -> str:
    return client_for(workdir).get_experiment(run.info.experiment_id).name


def test_train_and_search_go_to_the_mlflow_experiment_named_after_the_harness_experiment(in_workdir):
    assert main(["train", "--epochs", "3"]) == 0
    assert main(["train", "--epochs", "3", "--experiment", "digits", "--device", "cpu"]) == 0
    assert main(SEARCH) == 0
    runs = all_runs(in_workdir)
    assert len(runs) == 2 + 1 + 2
    where = sorted((experiment_of(in_workdir, run), run.info.run_name.split("-")[0]) for run in runs)
    assert where == [("digits", "digits"), ("linear_regression", "linear_regression"),
                     ("linear_regression", "linear_regression"), ("linear_regression", "trial"),
                     ("linear_regression", "trial")]
    assert client_for(in_workdir).search_runs(["0"]) == []  # nothing left in Default


def test_the_flag_and_mlflow_s_variables_still_choose_and_a_study_begun_in_default_stays_there(in_workdir,
                                                                                             monkeypatch):
    """A study made before runs had an experiment of their own: its parent run is in Default. (Was two
    tests, test_the_flag_and_mlflow_s_variables_still_choose and
    test_a_study_begun_in_default_keeps_its_trials_there_when_resumed, each with a search in Default.)"""
    assert main(["train", "--epochs", "3", "--mlflow-experiment", "flagged"]) == 0
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "named")
    assert main(["train", "--epochs", "3"]) == 0
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    assert main(SEARCH) == 0
    found = sorted(experiment_of(in_workdir, run) for run in all_runs(in_workdir))
    assert found == ["Default", "Default", "Default", "flagged", "named"]

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    assert main(SEARCH) == 0  # resumed, without the variable
    runs = all_runs(in_workdir)
    [parent] = [r for r in runs if r.data.tags.get(schema.ROLE_TAG) == schema.ROLE_STUDY]
    trials = [r for r in runs if r.data.tags.get(schema.PARENT_TAG) == parent.info.run_id]
    assert len(trials) == 4 and len(runs) == 5 + 2  # and the two train runs above
    assert {r.info.experiment_id for r in [parent, *trials]} == {"0"}
    found = sorted(experiment_of(in_workdir, run) for run in runs)
    assert found == ["Default"] * 5 + ["flagged", "named"]


def test_under_mlflow_run_the_trials_stay_with_the_run_mlflow_made(in_workdir, monkeypatch):
    """`mlflow run` makes its run first, in --experiment-name's experiment (else Default)."""
    client = client_for(in_workdir)
    made = client.create_run(client.create_experiment("project"), tags={schema.SOURCE_TYPE_TAG: "PROJECT"}).info
    monkeypatch.setenv("MLFLOW_RUN_ID", made.run_id)
    assert main(SEARCH) == 0
    runs = all_runs(in_workdir)
    assert len(runs) == 3
    assert {r.info.experiment_id for r in runs} == {made.experiment_id}
    assert {r.data.tags.get(schema.PARENT_TAG) for r in runs if r.info.run_id != made.run_id} == {made.run_id}
