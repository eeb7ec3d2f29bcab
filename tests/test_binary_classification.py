"""The second experiment: only a file in experiments/, and every command works with it."""
import pytest

from harness import config, training
from harness.experiment import load, names
from conftest import all_runs, client_for, run_cli
from search_helpers import check_contract, journal_study

pytestmark = pytest.mark.slow  # the CLI as a subprocess: `pytest -m 'not slow'` skips it


def test_it_is_found_by_name_and_trains_well_above_chance():
    assert {"linear_regression", "binary_classification"} <= set(names())
    cfg, experiment = config.resolve({"experiment": "binary_classification", "device": "cpu"})
    assert (cfg.optimizer, cfg.loss) == ("adam", "bce_with_logits")
    result = training.train(cfg, experiment)
    values = result.history.values
    assert set(values) == {"train_loss", "test_loss", "train_accuracy", "test_accuracy"}
    assert values["test_accuracy"][0] < 0.75 and values["test_accuracy"][-1] > 0.95  # chance is 0.5
    assert result.scalars == {}


def test_the_data_do_not_depend_on_the_model_seed():
    experiment = load("binary_classification")
    first, second = experiment.make_data(), experiment.make_data()
    assert first.X_train.shape == (800, 2) and first.X_test.shape == (200, 2)
    assert (first.y_train == second.y_train).all() and (first.X_test == second.X_test).all()
    assert 0.4 < first.y_train.mean().item() < 0.6


def test_train_search_and_predict_end_to_end(workdir, cli_in_process):
    out = run_cli("train", "--experiment", "binary_classification", "--epochs", 40, cwd=workdir)
    assert out.returncode == 0, out.stderr
    [run] = all_runs(workdir)
    client = client_for(workdir)
    for key in ("train_accuracy", "test_accuracy", "train_loss", "test_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(40))
    assert "final_test_accuracy" in run.data.metrics and "weight" not in run.data.metrics
    assert {"predictions.png", "loss_curves.png", "state_dict.pt"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}

    # In-process from here (were real processes): train above is the experiment's process.
    out = cli_in_process("predict", run.info.run_id, "--x", 0.0, 0.0, 1.0, 0.0, cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert [line.split(" -> ")[0] for line in out.stdout.splitlines()] == ["0 0", "1 0"]
    out = cli_in_process("predict", run.info.run_id, "--x", 0.0, 0.0, 1.0, cwd=workdir)
    assert out.returncode == 2 and "multiple of 2" in out.stderr

    out = cli_in_process("search", "--experiment", "binary_classification", "--n-trials", 3, "--seed", 0,
                  "--epochs-range", "20", "60", "--no-progress", cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir, "binary_classification-search")
    assert {t.params["optimizer_loss"] for t in study.trials} <= {
        "sgd+bce_with_logits", "adam+bce_with_logits", "adamw+bce_with_logits"}
    _, runs = check_contract(workdir, study, figures_for={study.best_trial.number})
    assert all("final_test_accuracy" in r.data.metrics for n, r in runs.items()
               if study.trials[n].state.name == "COMPLETE")
