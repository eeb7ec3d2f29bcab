"""The search space: one function, driven here with optuna.trial.FixedTrial."""
import json

import optuna
import pytest

from harness.errors import UsageError
from harness.experiment import load
from harness.search import space as space_module
from harness.schema import PAIR_TRIAL_PARAM as PAIR_PARAM
from harness.search.space import sample

EXPERIMENT = load("linear_regression")
DEFAULT_PAIRS = ("sgd+l1", "sgd+mse", "adam+l1", "adam+mse", "adamw+smooth_l1", "rmsprop+huber")


def test_default_space_is_the_issue_s():
    space = space_module.resolve(EXPERIMENT)
    assert space.lr == (1e-4, 1e-1) and space.epochs == (50, 400) and space.pairs == DEFAULT_PAIRS


def test_one_pruning_cadence_per_study_from_the_space_s_largest_epochs():
    experiment = load("linear_regression")
    assert space_module.report_cadence(space_module.resolve(experiment)) == 20  # epochs 50..400
    assert space_module.report_cadence(space_module.resolve(experiment, overrides={"epochs": [5, 30]})) == 1
    assert space_module.report_cadence(space_module.resolve(experiment, overrides={"epochs": [1, 1000]})) == 50


def test_fixed_trial_samples_separate_optimizer_and_loss():
    space = space_module.resolve(EXPERIMENT)
    trial = optuna.trial.FixedTrial({"lr": 0.01, "epochs": 200, PAIR_PARAM: "adamw+smooth_l1"})
    assert sample(trial, space) == {"lr": 0.01, "epochs": 200, "optimizer": "adamw", "loss": "smooth_l1"}


def test_only_listed_pairs_are_ever_sampled():
    space = space_module.resolve(EXPERIMENT, overrides={"pairs": ["sgd+l1", "adam+mse"]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        params = sample(trial, space)
        seen.add(f"{params['optimizer']}+{params['loss']}")
        assert 1e-4 <= params["lr"] <= 1e-1 and 50 <= params["epochs"] <= 400
        study.tell(trial, 0.0)
    assert seen == {"sgd+l1", "adam+mse"}
    assert isinstance(study.trials[0].distributions["lr"], optuna.distributions.FloatDistribution)
    assert study.trials[0].distributions["lr"].log


def test_file_then_command_line_override_the_experiment_space(tmp_path):
    file = tmp_path / "space.yaml"
    file.write_text("lr: [0.001, 0.5]\npairs: [adam+l1, sgd+mse]\n")
    space = space_module.resolve(EXPERIMENT, str(file), {"epochs": ["10", "20"]})
    assert space.lr == (0.001, 0.5) and space.epochs == (10, 20) and space.pairs == ("adam+l1", "sgd+mse")
    json_file = tmp_path / "space.json"
    json_file.write_text(json.dumps(space.to_dict()))
    assert space_module.resolve(EXPERIMENT, str(json_file)) == space


def test_grid_covers_both_ends_and_every_pair():
    space = space_module.resolve(EXPERIMENT, overrides={"epochs": [10, 40], "grid_points": 3})
    grid = space.grid()
    assert grid["lr"][0] == pytest.approx(1e-4) and grid["lr"][-1] == pytest.approx(1e-1)
    assert grid["epochs"] == [10, 25, 40] and grid[PAIR_PARAM] == list(DEFAULT_PAIRS)


@pytest.mark.parametrize("overrides, message", [
    ({"lr": [0.1, 0.01]}, "search-space lr needs low < high, got low=0.1 high=0.01"),
    ({"lr": [0.1, 0.1]}, "needs low < high"),
    ({"lr": [0, 0.1]}, "lr bound must be a positive number, got 0"),
    ({"epochs": [50, 10]}, "search-space epochs needs low < high"),
    ({"epochs": [1.5, 10]}, "epochs bound must be a positive integer, got 1.5"),
    ({"lr": [0.1]}, "search-space lr must be a [low, high] pair"),
    ({"pairs": []}, "non-empty list of optimizer+loss pairs"),
    ({"pairs": ["lbfgs+l1"]}, "unknown optimizer 'lbfgs' in pair 'lbfgs+l1'; allowed: adadelta, adafactor, adagrad, adam,"),
    ({"pairs": ["sgd+hinge"]}, "unknown loss 'hinge' in pair 'sgd+hinge'; allowed: bce, bce_with_logits, cross_entropy,"),
    ({"pairs": ["sgd"]}, "pair 'sgd' must be written optimizer+loss"),
    ({"pairs": ["sgd+l1", "sgd+l1"]}, "pairs must be listed once each"),
])
def test_invalid_spaces_are_refused_with_the_bad_value(overrides, message):
    with pytest.raises(UsageError) as err:
        space_module.resolve(EXPERIMENT, overrides=overrides)
    assert message in str(err.value)


def test_bad_space_files_are_refused(tmp_path):
    file = tmp_path / "s.yaml"
    file.write_text("lr: [0.001, 0.1]\nmomentun: [0.1, 0.9]\n")
    with pytest.raises(UsageError, match="unknown search-space key .momentun..*allowed: lr, epochs, pairs"):
        space_module.resolve(EXPERIMENT, str(file))
    file.write_text("lr: [0.001, 0.1\n")
    with pytest.raises(UsageError, match="not valid YAML/JSON"):
        space_module.resolve(EXPERIMENT, str(file))
    file.write_text("- just\n- a list\n")
    with pytest.raises(UsageError, match="must hold a mapping"):
        space_module.resolve(EXPERIMENT, str(file))


def test_the_parent_run_shows_each_axis_of_the_space_as_a_param_within_mlflow_s_limits():
    from harness.search.parent import MAX_SHOWN, study_params

    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"batch_size": list(range(1, 3001)),
                                                        "weight_decay": [1e-6, 1e-2]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(), pruner=optuna.pruners.NopPruner())
    params = study_params(study, space, 20)
    assert params["space.lr"] == "[0.0001, 0.1] log" and params["space.epochs"] == "[50, 400]"
    assert params["space.optimizer_loss"].startswith("sgd+l1, sgd+mse")
    assert params["space.weight_decay"] == "[1e-06, 0.01] log"
    assert params["space.batch_size"].startswith("{1, 2, 3") and len(params["space.batch_size"]) == MAX_SHOWN
    assert params["study.sampler"] == "RandomSampler" and params["study.pruner"] == "NopPruner"
    assert params["study.report_every"] == "20" and params["study.direction"] == "minimize"
    assert "space.grid_points" not in params  # only a grid search has one
