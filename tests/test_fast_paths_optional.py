"""The acceleration wing (harness/fast/) is optional: a search with its fast paths not handed in, the
wing as if deleted, leaves the same trials in the Optuna storage and the same params, metrics and
tags in the MLflow store as one with them (the one-transaction SQL writer and stacked training)."""
import sys

import optuna
import pytest
from mlflow import MlflowClient

from conftest import new_store
from harness.experiment import load
from harness.search import loop, space as space_module
from harness.search.objective import Objective
from harness.search.study import create_study, make_pruner, open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# Eight configurations that stack (one pair, the same shapes, batch size and seed): two stacks of four.
CONFIGS = [{"optimizer_loss": "sgd+mse", "lr": lr, "epochs": epochs}
           for lr, epochs in [(0.01, 6), (0.05, 9), (0.002, 7), (0.1, 5), (0.03, 8), (0.007, 6), (0.02, 10),
                              (0.004, 5)]]


def search(folder, monkeypatch, migrated_db):
    """CONFIGS searched in batches of 4 into a fresh MLflow store and journal in ``folder``."""
    folder.mkdir()
    new_store(folder, migrated_db)
    monkeypatch.chdir(folder)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"lr": [1e-4, 1.0], "epochs": [5, 10]})
    storage = open_storage(f"journal:{folder / 'j.log'}")
    study = create_study("wing", storage, direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0),
                         pruner=make_pruner("none"), space=space, experiment="linear_regression")
    for params in CONFIGS:
        study.enqueue_trial(params)
    with Objective(experiment, space, track=True, device="cpu", seed=0, batch=4) as objective:
        loop.optimize(study, objective, len(CONFIGS), batch=4)
    return study, MlflowClient(uri)


def contents(study, client) -> dict:
    """Per trial: its state, params and value in Optuna; its run's params, tags and every metric's
    history in MLflow."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    by_number = {r.data.tags["optuna.trial_number"]: r for r in runs if "optuna.trial_number" in r.data.tags}
    found = {}
    for trial in study.trials:
        run = by_number[str(trial.number)]
        metrics = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                   for key in run.data.metrics}
        tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.parentRunId"}  # an id MLflow gives
        found[trial.number] = (trial.state.name, trial.params, trial.value, trial.intermediate_values,
                               run.info.status, run.data.params, tags, metrics)
    return found


def test_a_search_without_the_fast_paths_stores_what_one_with_them_does(tmp_path, monkeypatch, migrated_db):
    from harness.fast import batched
    from harness.fast.mlflow_sql import DirectWriter

    used = {"stacks": 0, "transactions": 0}
    train_stack, write_many = batched.train_stack, DirectWriter.write_many
    monkeypatch.setattr(batched, "train_stack",
                        lambda *a, **k: used.__setitem__("stacks", used["stacks"] + 1) or train_stack(*a, **k))
    monkeypatch.setattr(DirectWriter, "write_many",
                        lambda self, rows: used.__setitem__("transactions", used["transactions"] + 1)
                        or write_many(self, rows))
    fast = contents(*search(tmp_path / "fast", monkeypatch, migrated_db))
    assert used["stacks"] == 2 and used["transactions"] > 0  # the fast paths did the work there

    # The wing as if deleted: importing it fails, as it would without its files.
    for name in [n for n in sys.modules if n == "harness.fast" or n.startswith("harness.fast.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        from harness.fast import batched  # noqa: F401, F811
    plain = contents(*search(tmp_path / "plain", monkeypatch, migrated_db))

    assert used["stacks"] == 2  # nothing stacked without the wing
    assert len(plain) == len(CONFIGS)
    assert {s for s, *_ in plain.values()} == {"COMPLETE"}
    assert plain == fast
