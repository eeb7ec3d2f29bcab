"""`harness search` and `harness.Objective`, checked by opening the Optuna storage and the MLflow store."""
import csv
import io
import json
import math
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from harness import Objective
from harness.experiment import load
from harness.search import space as space_module
from conftest import ROOT, all_runs, cli_env, client_for, run_cli
from search_helpers import check_contract, journal_study


SMALL = ["--epochs-range", "5", "30", "--no-progress"]


@pytest.mark.slow
def test_search_tracks_every_trial_and_resume_continues_the_study(workdir, cli_in_process):
    out = run_cli("search", "--n-trials", 6, "--seed", 0, "--pruner", "none", "--importance", *SMALL, cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    assert len(study.trials) == 6 and all(t.state == TrialState.COMPLETE for t in study.trials)
    parent, runs = check_contract(workdir, study, figures_for={study.best_trial.number})
    assert parent.info.run_name == "linear_regression-search"
    assert parent.data.tags["optuna.storage"] == "journal:optuna_journal.log"
    assert parent.data.tags["optuna.sampler"] == "tpe" and parent.data.tags["optuna.pruner"] == "none"
    assert parent.data.metrics["best_value"] == study.best_value
    assert parent.data.metrics["best_trial_number"] == study.best_trial.number
    assert parent.data.tags["best_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    assert json.loads(parent.data.tags["best_params"]) == study.best_params
    assert "**Trials:** 6 (6 complete)" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["space.epochs"] == "[5, 30]" and parent.data.params["study.sampler"] == "TPESampler"

    # The summary the user sees: the top trials (best first) and how to look at them.
    assert "top trials:" in out.stdout and study.best_trial.user_attrs["mlflow_run_id"] in out.stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out.stdout
    assert "load_model(" in out.stdout

    client = client_for(workdir)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_params.json", "optimization_history.png", "parallel_coordinate.png",
            "param_importances.png"} <= names
    rows = list(csv.DictReader(io.StringIO(open(client.download_artifacts(
        parent.info.run_id, "trials.csv", str(workdir))).read())))
    assert [int(r["number"]) for r in rows] == list(range(6))
    assert [r["mlflow_run_id"] for r in rows] == [runs[n].info.run_id for n in range(6)]
    assert "user_attrs_mlflow_run_id" not in rows[0]  # one run-id column

    # Resume: the same study, the same parent run, trials added (in-process; was a process).
    out = cli_in_process("search", "--n-trials", 3, "--pruner", "none", *SMALL, cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    assert len(study.trials) == 9
    again, _ = check_contract(workdir, study)
    assert again.info.run_id == parent.info.run_id
    assert client.get_metric_history(parent.info.run_id, "best_value")[-1].step == 9
    assert len(all_runs(workdir)) == 1 + 9


@pytest.mark.slow
def test_pruned_and_diverging_trials_are_recorded_as_such(workdir, monkeypatch):
    """A plain Optuna script: the objective maps PRUNED -> KILLED and FAIL -> FAILED, and goes on."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")

    class PruneTrialTwoAtStepFour(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 2 and trial.last_step is not None and trial.last_step >= 4

    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"lr": [1e-4, 10.0], "epochs": [5, 60]})
    study = optuna.create_study(study_name="edge-cases", pruner=PruneTrialTwoAtStepFour(),
                                storage=f"sqlite:///{workdir / 'optuna.db'}")
    for params in ({"lr": 0.01, "epochs": 20, "optimizer_loss": "sgd+l1"},
                   {"lr": 8.0, "epochs": 60, "optimizer_loss": "sgd+mse"},
                   {"lr": 0.01, "epochs": 30, "optimizer_loss": "adam+l1"},
                   {"lr": 0.05, "epochs": 25, "optimizer_loss": "adam+mse"}):
        study.enqueue_trial(params)
    with Objective(experiment, space, report_every=1) as objective:  # the pruner above counts steps
        study.optimize(objective, n_trials=4)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    assert not math.isnan(study.best_value) and study.best_trial.number in (0, 3)
    _, runs = check_contract(workdir, study, figures_for={study.best_trial.number})
    client = client_for(workdir)

    failed = study.trials[1]
    reason = failed.user_attrs["fail_reason"]
    assert reason.startswith("diverged at epoch ")
    assert runs[1].data.tags["harness.fail_reason"] == reason
    diverged_at = int(reason.rsplit(" ", 1)[1])
    assert len(client.get_metric_history(runs[1].info.run_id, "train_loss")) == diverged_at

    pruned_run = runs[2]
    assert [m.step for m in client.get_metric_history(pruned_run.info.run_id, "test_loss")] == [0, 1, 2, 3, 4]
    assert pruned_run.data.tags["harness.fail_reason"] == "pruned at epoch 4"
    assert list(study.trials[2].intermediate_values) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_parallel_trials_never_share_a_run(workdir, cli_in_process):
    """In-process (was a process): the threads are this process's either way."""
    out = cli_in_process("search", "--n-trials", 8, "--n-jobs", 2, "--sampler", "random", "--seed", 3,
                         "--pruner", "none", *SMALL, cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    assert len(study.trials) == 8
    _, runs = check_contract(workdir, study)  # params, curve lengths and steps per run match its trial
    assert len({r.info.run_id for r in runs.values()}) == 8


@pytest.mark.slow
def test_max_trials_caps_the_study_across_invocations(workdir, cli_in_process):
    """Both invocations in-process (were processes): test_scale_out's workers hit the cap as processes."""
    assert cli_in_process("search", "--n-trials", 5, "--max-trials", 3, "--pruner", "none", *SMALL,
                          cwd=workdir).returncode == 0
    out = cli_in_process("search", "--n-trials", 5, "--max-trials", 3, *SMALL, cwd=workdir)
    assert out.returncode == 0 and "already has 3 trials" in out.stdout
    study = journal_study(workdir)
    assert len(study.trials) == 3
    check_contract(workdir, study)


@pytest.mark.parametrize("args, bad", [
    (["--n-trials", "0"], "'0'"), (["--n-trials", "-2"], "'-2'"),
    (["--sampler", "anneal"], "'anneal'"), (["--pruner", "patient"], "'patient'"),
    (["--storage", "redis://localhost"], "redis://localhost"),
    (["--lr-range", "0.1", "0.01"], "low < high"), (["--pairs", "sgd+hinge"], "'hinge'"),
    (["--pairs", "lbfgs+l1"], "'lbfgs'"), (["--experiment", "nope"], "'nope'"),
    (["--space", "missing.yaml"], "missing.yaml"), (["--n-jobs", "0"], "'0'"),
])
def test_bad_search_input_is_refused_before_any_trial(tmp_path, args, bad, cli_in_process):
    """In-process (was a real process per case): test_bad_input's real-process test shows a refusal as
    a user's process does."""
    out = cli_in_process("search", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: ") and bad in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_existing_study_with_another_direction_or_space_is_refused(workdir, cli_in_process):
    assert cli_in_process("search", "--n-trials", 1, *SMALL, cwd=workdir).returncode == 0  # was a process
    for args, message in ((["--direction", "maximize"], "exists with direction minimize, not maximize"),
                          (["--epochs-range", "5", "31"], "incompatible with")):
        out = cli_in_process("search", "--n-trials", 1, "--no-progress", *args, cwd=workdir)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert len(journal_study(workdir).trials) == 1
    assert len(all_runs(workdir)) == 2


@pytest.mark.slow
def test_mlflow_run_main_entry_makes_mlflow_s_run_the_study_parent(workdir):
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    out = run_cli("mlflow", "run", str(ROOT), "--env-manager", "local", "-P", "n_trials=3", "-P", "seed=1",
                  "-P", f"storage=journal:{workdir / 'optuna_journal.log'}", cwd=workdir, env=env, module=False)
    assert out.returncode == 0, out.stderr[-3000:]
    study = journal_study(workdir)
    parent, _ = check_contract(workdir, study)
    assert parent.data.params["n_trials"] == "3"  # logged by `mlflow run` itself: it created this run
    assert parent.info.run_name == "linear_regression-search"  # not MLflow's random name
    assert "**Trials:** 3 (" in parent.data.tags["mlflow.note.content"]
    assert len(all_runs(workdir)) == 1 + 3

    # Resumed under `mlflow run`: MLflow's new run points at the study's parent instead of standing empty.
    out = run_cli("mlflow", "run", str(ROOT), "--env-manager", "local", "-P", "n_trials=2", "-P", "seed=2",
                  "-P", f"storage=journal:{workdir / 'optuna_journal.log'}", cwd=workdir, env=env, module=False)
    assert out.returncode == 0, out.stderr[-3000:]
    study = journal_study(workdir)
    again, _ = check_contract(workdir, study)
    assert again.info.run_id == parent.info.run_id and "**Trials:** 5 (" in again.data.tags["mlflow.note.content"]
    runs = all_runs(workdir)
    assert len(runs) == 2 + 5
    pointer, = [r for r in runs if r.info.run_id != parent.info.run_id and "mlflow.parentRunId" not in r.data.tags]
    assert pointer.info.run_name == "linear_regression-search (resumed)" and pointer.info.status == "FINISHED"
    assert pointer.data.tags["harness.study_run"] == parent.info.run_id
    assert f"/runs/{parent.info.run_id})" in pointer.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_study_script_in_experiments_runs_as_documented(workdir):
    script = ROOT / "experiments" / "search_linear_regression.py"
    assert len(script.read_text().splitlines()) < 30
    out = subprocess.run([sys.executable, str(script), "3"], cwd=workdir, env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="linear-regression-script", storage=f"sqlite:///{workdir / 'optuna.db'}")
    assert len(study.trials) == 3
    parent, _ = check_contract(workdir, study)
    assert parent.data.tags["optuna.storage"] == "sqlite:///optuna.db"
    assert study.best_trial.user_attrs["mlflow_run_id"] in out.stdout


@pytest.mark.slow
def test_a_batched_search_keeps_the_whole_contract_and_its_trials_reproduce_alone(workdir, cli_in_process):
    """The search as a real process; audit and reproduce in-process (were real processes)."""
    out = run_cli("search", "--n-trials", 10, "--batch", 4, "--seed", 5, "--pairs", "sgd+l1", *SMALL,
                  cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    assert len(study.trials) == 10  # batches of 4, 4 (stacked) and 2 (one at a time)
    parent, runs = check_contract(workdir, study, figures_for={study.best_trial.number})
    assert parent.data.params["study.batch"] == "4"
    audit = cli_in_process("audit", "--study", study.study_name, cwd=workdir)
    assert audit.returncode == 0 and "clean" in audit.stdout, audit.stdout
    # A member's numbers are those of training it alone: reproduce re-runs it alone, bit for bit.
    for trial in [study.best_trial, *(t for t in study.trials if t.state == TrialState.COMPLETE)][:2]:
        again = cli_in_process("reproduce", trial.user_attrs["mlflow_run_id"], cwd=workdir)
        assert again.returncode == 0 and "exactly" in again.stdout, again.stdout + again.stderr


def test_resuming_on_sqlite_looks_for_optuna_s_tables_once(workdir, cli_in_process, monkeypatch):
    """A search on an SQLite storage that holds its study made an engine and inspected the database
    twice at its start (is there a study? then: are the tables there, to skip the schema lock): once
    now, and the resumed study still goes on."""
    from harness.search import study as study_module

    storage = f"sqlite:///{workdir / 'optuna.db'}"
    args = ("search", "--n-trials", 1, "--storage", storage, "--models", "none", "--pruner", "none", *SMALL)
    assert cli_in_process(*args, cwd=workdir).returncode == 0
    looked, tables = [], study_module._optuna_tables
    monkeypatch.setattr(study_module, "_optuna_tables", lambda url: looked.append(url) or tables(url))
    out = cli_in_process(*args, cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert looked == [storage]
    assert len(optuna.load_study(study_name="linear_regression-search", storage=storage).trials) == 2
