"""Compare, reload and reproduce: from the command line and from Python, against real stores."""
import csv
import json
import os

import pytest
import torch
from PIL import Image

from harness import config, training
from harness.runs import load_model, predict
from conftest import all_runs, client_for, main_in, new_store, run_cli
from search_helpers import journal_study

pytestmark = pytest.mark.slow  # the CLI as a subprocess: `pytest -m 'not slow'` skips it

SMALL = ["--epochs-range", "5", "40", "--no-progress", "--pruner", "none"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, migrated_db):
    """One small study, shared by the read-only tests below: searched in-process (was a process; the
    tests read it with processes of their own)."""
    workdir = tmp_path_factory.mktemp("study")
    new_store(workdir, migrated_db)
    assert main_in(workdir, "search", "--n-trials", 7, "--seed", 2, *SMALL) == 0
    return workdir


@pytest.fixture
def in_study(study_dir, monkeypatch):
    monkeypatch.chdir(study_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{study_dir / 'mlflow.db'}")
    return study_dir


def test_compare_ranks_the_top_k_and_writes_the_overlay(study_dir):
    out = run_cli("compare", "--study", "linear_regression-search", "--top", 3, "--csv", "top.csv",
                  "--out", "overlay.png", "--log", cwd=study_dir)
    assert out.returncode == 0, out.stderr
    study = journal_study(study_dir)
    expected = sorted((t for t in study.trials if t.value is not None), key=lambda t: t.value)[:3]
    rows = list(csv.DictReader(open(study_dir / "top.csv")))
    assert [int(r["trial"]) for r in rows] == [t.number for t in expected]
    assert [r["run_id"] for r in rows] == [t.user_attrs["mlflow_run_id"] for t in expected]
    assert [float(r["final_valid_loss"]) for r in rows] == [t.value for t in expected]
    assert {"optimizer", "loss", "lr", "epochs", "weight", "bias"} <= set(rows[0])
    with Image.open(study_dir / "overlay.png") as image:
        assert image.size[0] > 500
    client = client_for(study_dir)
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert "compare_top3_final_valid_loss.png" in {a.path for a in client.list_artifacts(parent)}
    for trial in expected:
        assert trial.user_attrs["mlflow_run_id"] in out.stdout


def test_compare_refuses_what_it_cannot_answer(study_dir, cli_in_process):
    for args, message in ((["--study", "no-such-study"], "no finished run in study 'no-such-study'"),
                          (["--study", "linear_regression-search", "--top", "0"], "--top must be"),
                          (["--mlflow-experiment", "nope"], "unknown MLflow experiment 'nope'"),
                          (["--mlflow-experiment", "Default", "--log"], "--log needs --study")):
        out = cli_in_process("compare", *args, cwd=study_dir)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


def test_reloaded_model_predicts_what_the_run_predicted_at_training_time(in_study):
    client = client_for(in_study)
    study = journal_study(in_study)
    trial = study.best_trial
    run_id = trial.user_attrs["mlflow_run_id"]
    cfg, experiment = config.resolve({"lr": trial.params["lr"], "epochs": trial.params["epochs"],
                                      "optimizer": trial.params["optimizer_loss"].split("+")[0],
                                      "loss": trial.params["optimizer_loss"].split("+")[1], "device": "cpu",
                                      "valid_fraction": 0.2})  # what the search held out for validation
    trained = training.train(cfg, experiment)  # the same trial, retrained in-process
    model = load_model(run_id, client)
    data = experiment.make_data()
    with torch.inference_mode():
        assert torch.equal(model(data.X_test), trained.predictions)
    inputs, outputs = predict(run_id, [0.1, 0.5], client)
    assert inputs.shape == (2, 1) and torch.equal(outputs, trained.model.eval()(inputs).detach())
    out = run_cli("predict", run_id, "--x", 0.1, 0.5, cwd=in_study)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{x:.6g} -> {y:.6g}" for x, y in
                                       zip([0.1, 0.5], outputs.squeeze(1).tolist())]
    assert out.stderr == ""


def test_predict_refuses_bad_input(in_study, cli_in_process):
    run_id = journal_study(in_study).best_trial.user_attrs["mlflow_run_id"]
    for args, message in (([run_id, "--x", "a"], "--x values must be numbers, got 'a'"),
                          (["0" * 32, "--x", "1"], "does not exist")):
        out = cli_in_process("predict", *args, cwd=in_study)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_reproduce_matches_an_untouched_run_and_catches_an_altered_config(workdir, cli_in_process):
    """In-process (the search and the re-runs were real processes): what is read is the stores."""
    assert cli_in_process("search", "--n-trials", 4, "--n-jobs", 2, "--sampler", "random", "--seed", 5, *SMALL,
                          cwd=workdir).returncode == 0
    study = journal_study(workdir)
    trial_run = study.trials[1].user_attrs["mlflow_run_id"]
    out = cli_in_process("reproduce", trial_run, cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "bitwise identical" in out.stdout
    client = client_for(workdir)
    [rerun] = [r for r in all_runs(workdir) if r.data.tags.get("harness.reproduces") == trial_run]
    assert rerun.info.status == "FINISHED" and rerun.info.run_id in out.stdout

    # Alter the logged config in place (a different lr): the re-run no longer matches.
    source = client.get_run(trial_run)
    config_path = os.path.join(source.info.artifact_uri.removeprefix("file://"), "config.json")
    logged = json.loads(open(config_path).read())
    logged["lr"] = logged["lr"] * 1.5
    open(config_path, "w").write(json.dumps(logged))
    out = cli_in_process("reproduce", trial_run, cwd=workdir)
    assert out.returncode == 1
    assert "NOT reproduced" in out.stderr and "state_dict['weights']" in out.stderr
    assert "train_loss:" in out.stderr


def test_reproduce_a_single_training_run(workdir, cli_in_process):
    """In-process (was two real processes): test_own_experiment's README example reproduces from one."""
    assert cli_in_process("train", "--epochs", 30, cwd=workdir).returncode == 0
    [run] = all_runs(workdir)
    out = cli_in_process("reproduce", run.info.run_id, cwd=workdir)
    assert out.returncode == 0 and "curves equal over 30 epochs" in out.stdout, out.stderr
