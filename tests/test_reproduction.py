"""The harness reproduces the reference notebook's printed numbers under seed 42."""
import subprocess
import sys

import pytest
import torch

from harness import config, training
from harness.loop import StopTraining

# (epoch, train loss, test loss) as printed by the reference (pytorch_workflow_train_model.md).
REFERENCE_PRINTS = [
    (0, 0.31288138031959534, 0.48106518387794495),
    (10, 0.1976713240146637, 0.3463551998138428),
    (50, 0.04167863354086876, 0.09919948130846024),
    (100, 0.024458957836031914, 0.05646304413676262),
    (160, 0.0038517764769494534, 0.008201557211577892),
    (190, 0.008932482451200485, 0.005023092031478882),
]


def reference_config(**overrides):
    cfg, experiment = config.resolve({"device": "cpu", **overrides})
    return cfg, experiment


def test_initial_weights_follow_seed_42():
    cfg, experiment = reference_config()
    state = training.build_model(cfg, experiment).state_dict()
    assert list(state) == ["weights", "bias"]
    assert round(state["weights"].item(), 4) == 0.3367
    assert round(state["bias"].item(), 4) == 0.1288


def test_losses_match_reference_prints_exactly():
    cfg, experiment = reference_config()
    assert (cfg.optimizer, cfg.loss, cfg.lr, cfg.epochs, cfg.seed) == ("sgd", "l1", 0.01, 200, 42)
    history = training.train(cfg, experiment).history
    assert history.epochs_run == 200
    for epoch, train_loss, test_loss in REFERENCE_PRINTS:
        assert history.values["train_loss"][epoch] == train_loss, epoch
        assert history.values["test_loss"][epoch] == test_loss, epoch


@pytest.mark.parametrize("epochs, weight, bias", [(100, 0.5784, 0.3513), (200, 0.6990, 0.3093)])
def test_final_parameters_match_reference(epochs, weight, bias):
    cfg, experiment = reference_config(epochs=epochs)
    result = training.train(cfg, experiment)
    assert round(result.scalars["weight"], 4) == weight
    assert round(result.scalars["bias"], 4) == bias
    assert result.model.state_dict()["weights"].item() == result.scalars["weight"]


def test_syncing_in_chunks_changes_nothing():
    cfg, experiment = reference_config(epochs=37)
    every_epoch = training.train(cfg, experiment, sync_every=1).history.values
    chunked = training.train(cfg, experiment, sync_every=10).history.values
    at_end = training.train(cfg, experiment, sync_every=37).history.values
    assert every_epoch == chunked == at_end
    assert len(every_epoch["train_loss"]) == 37


def test_observers_see_every_epoch_and_can_stop_training():
    seen = []

    class StopAtFive:
        def on_epoch_end(self, epoch, logs):
            seen.append((epoch, logs["test_loss"]))
            if epoch == 5:
                raise StopTraining("enough at 5")

    cfg, experiment = reference_config()
    history = training.train(cfg, experiment, observers=[StopAtFive()]).history
    assert [e for e, _ in seen] == list(range(6))
    assert history.epochs_run == 6 and history.stopped == "enough at 5"
    assert [v for _, v in seen] == history.values["test_loss"]


def test_divergence_stops_at_first_non_finite_epoch():
    cfg, experiment = reference_config(optimizer="sgd", loss="mse", lr=5, epochs=100)
    result = training.train(cfg, experiment)
    n = result.history.diverged_at
    assert n is not None and 0 < n < 100
    assert result.history.stopped == f"diverged at epoch {n}"
    assert result.history.epochs_run == n
    assert all(torch.isfinite(torch.tensor(result.history.values["train_loss"])))
    assert result.final_metrics() == {}


@pytest.mark.slow
def test_loop_runs_without_importing_mlflow_or_optuna():
    code = (
        "import sys\n"
        "from harness import config, training\n"
        "cfg, exp = config.resolve({'epochs': 200, 'device': 'cpu'})\n"
        "r = training.train(cfg, exp)\n"
        "assert round(r.scalars['weight'], 4) == 0.699, r.scalars\n"
        "leaked = [m for m in ('mlflow', 'optuna') if m in sys.modules]\n"
        "assert not leaked, leaked\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
