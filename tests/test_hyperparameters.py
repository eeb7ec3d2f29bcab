"""Hyperparameters, mini-batches and the search space over them: in-process, seconds."""
import json

import optuna
import pytest
import torch
from torch import nn

from harness import config, training
from harness.errors import UsageError
from harness.experiment import HARNESS_HYPERPARAMETERS, Data, Experiment, Hyperparameter, load
from harness.search import space as space_module
from harness.search import study as study_module
from harness.schema import PAIR_TRIAL_PARAM as PAIR_PARAM
from harness.search.space import sample


def toy_data() -> Data:
    g = torch.Generator().manual_seed(0)
    X = torch.rand(103, 3, generator=g)  # 103: the last mini-batch is a short one
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1
    return Data(X[:83], y[:83], X[83:], y[83:])


class Width(nn.Module):
    def __init__(self, hidden: int = 8, act: str = "relu", bias: bool = True):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, hidden, bias=bias), nn.ReLU() if act == "relu" else nn.Tanh(),
                                    nn.Dropout(0.2), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.layers(x)


TOY = Experiment(
    name="toy", make_data=toy_data, make_model=Width, losses=("mse", "l1"),
    hyperparameters=(Hyperparameter("hidden", "int", 8, low=2, high=64, log=True),
                     Hyperparameter("act", "categorical", "relu", choices=("relu", "tanh")),
                     Hyperparameter("bias", "bool", True)),
    defaults={"optimizer": "adam", "loss": "mse", "lr": 0.01, "epochs": 5},
)


def resolve(**values):
    return config.resolve({"device": "cpu", **values}, experiment=TOY, n_train=83)[0]


def test_hyperparameters_are_typed_logged_flat_and_build_the_model(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("hidden: 16\nbatch_size: 10\n")
    cfg, _ = config.resolve({"device": "cpu", "act": "tanh", "bias": "false", "weight_decay": "0.01"},
                            file=file, experiment=TOY, n_train=83)
    assert cfg.hparams == {"hidden": 16, "act": "tanh", "bias": False}
    assert (cfg.batch_size, cfg.weight_decay, cfg.momentum) == (10, 0.01, 0.0)
    flat = cfg.to_dict()
    assert flat["hidden"] == 16 and flat["batch_size"] == 10 and "hparams" not in flat
    model = training.build_model(cfg, TOY)
    assert model.layers[0].out_features == 16 and model.layers[0].bias is None
    assert isinstance(model.layers[1], nn.Tanh)
    # The flat dict round-trips through a file: config.json is exactly this.
    again = tmp_path / "config.json"
    again.write_text(json.dumps(flat))
    assert config.resolve(file=again, experiment=TOY, n_train=83)[0] == cfg


def test_set_flags_parse_and_named_values_win():
    assert config.parse_sets(["hidden=64", "dropout = 0.1"]) == {"hidden": "64", "dropout": "0.1"}
    with pytest.raises(UsageError, match="--set takes NAME=VALUE, got 'hidden'"):
        config.parse_sets(["hidden"])


@pytest.mark.parametrize("values, message", [
    ({"hiden": "3"}, "unknown config key 'hiden' in overrides; allowed: "),
    ({"hiden": "3"}, "(did you mean 'hidden'?)"),
    ({"hidden": "wide"}, "hidden must be an integer, got 'wide'"),
    ({"hidden": "1"}, "hidden must be in [2, 64], got '1'"),
    ({"hidden": "65"}, "hidden must be in [2, 64], got '65'"),
    ({"hidden": 10 ** 30}, "hidden must be in [2, 64], got 10000000000"),
    ({"hidden": "²"}, "hidden must be an integer, got '²'"),
    ({"batch_size": "５"}, "batch_size must be a positive integer, got '５'"),
    ({"act": "gelu"}, "unknown act 'gelu'; allowed: relu, tanh"),
    ({"bias": "maybe"}, "bias must be true or false, got 'maybe'"),
    ({"batch_size": "0"}, "batch_size must be a positive integer, got '0'"),
    ({"batch_size": "-4"}, "batch_size must be a positive integer, got '-4'"),
    ({"batch_size": "84"}, "batch_size must be at most the training set's size 83, got '84'"),
    ({"batch_size": "1.5"}, "batch_size must be a positive integer, got '1.5'"),
    ({"weight_decay": "-1"}, "weight_decay must be >= 0.0, got '-1'"),
    ({"weight_decay": "inf"}, "weight_decay must be a finite number, got 'inf'"),
    ({"momentum": "0.9"}, "momentum applies to optimizers muon, rmsprop, sgd only, got momentum=0.9 with optimizer 'adam'"),
    ({"momentum": "1.5", "optimizer": "sgd"}, "momentum must be in [0.0, 0.999], got '1.5'"),
    ({"epochs": str(10 ** 40)}, "epochs must be at most 10000000, got '1000"),  # not "a positive integer"
    ({"seed": str(2 ** 64)}, "seed must be at most 9223372036854775807 in size"),
    ({"seed": "9" * 40}, "seed must be at most 9223372036854775807 in size"),  # an integer, if a long one
    ({"seed": "-" + "9" * 40}, "seed must be an integer >= 0, got '-9999"),
    ({"seed": "9" * 5000}, "seed must be at most 9223372036854775807 in size"),  # past int()'s 4300 digits
])
def test_bad_values_name_the_value_and_what_is_allowed(values, message):
    with pytest.raises(UsageError) as err:
        resolve(**values)
    assert message in str(err.value)


def test_experiment_declarations_are_checked_when_defined():
    # A config key, or a param every run logs itself (third probe: optimizer_loss broke the search's
    # space with a traceback; torch_threads was overwritten in the run, silently).
    for name in ("batch_size", "optimizer_loss", "torch_threads", "torch_version", "trial_number",
                 "experiment_sha256"):
        with pytest.raises(ValueError, match=f"hyperparameter '{name}' is declared twice or shadows a name the "
                                             "harness logs"):
            Experiment(name="x", make_data=toy_data, make_model=Width,
                       hyperparameters=(Hyperparameter(name, "int", 1),))
    with pytest.raises(ValueError, match="type 'number' is not one of"):
        Hyperparameter("width", "number", 1)


def test_mini_batch_train_loss_is_the_sample_weighted_mean_of_the_batch_losses():
    """The documented rule, recomputed by hand with the same seeded DataLoader order."""
    cfg = resolve(batch_size=20, epochs=3, optimizer="sgd", lr=0.05)
    data = toy_data()
    result = training.train(cfg, TOY, data)
    model = training.build_model(cfg, TOY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.MSELoss()
    # The plain DataLoader a user writes: the harness must give the same batches in the same order.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.X_train, data.y_train), batch_size=20,
                                         shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    expected_train, expected_test = [], []
    for _ in range(3):
        total, seen = torch.tensor(0.0), 0
        for X, y in loader:
            model.train()
            loss = loss_fn(model(X), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(X)
            seen += len(X)
        expected_train.append((total / seen).item())
        model.eval()
        with torch.no_grad():
            expected_test.append(loss_fn(model(data.X_test), data.y_test).item())
    assert result.history.values["train_loss"] == pytest.approx(expected_train, rel=1e-6)
    assert result.history.values["test_loss"] == pytest.approx(expected_test, rel=1e-6)
    assert torch.allclose(result.model.state_dict()["layers.0.weight"], model.state_dict()["layers.0.weight"])


def test_mini_batches_are_reproducible_from_the_seed_and_differ_across_seeds():
    first = training.train(resolve(batch_size=16, epochs=4), TOY)
    again = training.train(resolve(batch_size=16, epochs=4), TOY)
    other = training.train(resolve(batch_size=16, epochs=4, seed=7), TOY)
    assert first.history.values == again.history.values
    for key, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[key])
    assert first.history.values["train_loss"] != other.history.values["train_loss"]


def test_full_batch_keeps_the_reference_and_harness_optimizer_arguments_reach_torch():
    cfg, experiment = config.resolve({"device": "cpu", "epochs": 200})
    assert cfg.batch_size is None and cfg.weight_decay == 0.0 and cfg.momentum == 0.0
    assert round(training.train(cfg, experiment).scalars["weight"], 4) == 0.6990
    cfg, experiment = config.resolve({"device": "cpu", "optimizer": "sgd", "momentum": "0.9",
                                      "weight_decay": "0.001"})
    model = training.build_model(cfg, experiment)
    from harness.registry import build_optimizer

    group = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum).param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.001


def test_parameter_recovery_errors_against_the_declared_truth():
    cfg, experiment = config.resolve({"device": "cpu"})
    result = training.train(cfg, experiment)
    finals = result.final_metrics()
    assert finals["weight_error"] == abs(finals["weight"] - 0.7)
    assert finals["bias_error"] == abs(finals["bias"] - 0.3)


# ---- the search space ----------------------------------------------------------------------------

def toy_space(**entries):
    return space_module.resolve(TOY, overrides={"pairs": ["adam+mse", "sgd+mse"], **entries}, n_train=83)


def test_fixed_trial_drives_hyperparameters_and_momentum_only_for_its_optimizers():
    space = toy_space(hidden=True, act=True, batch_size=[8, 16, 32], momentum=True, weight_decay=[1e-5, 1e-2])
    sgd = sample(optuna.trial.FixedTrial({"lr": 0.01, "epochs": 100, PAIR_PARAM: "sgd+mse", "hidden": 32,
                                          "act": "tanh", "batch_size": 16, "momentum": 0.5,
                                          "weight_decay": 1e-3}), space)
    assert sgd == {"lr": 0.01, "epochs": 100, "optimizer": "sgd", "loss": "mse", "hidden": 32, "act": "tanh",
                   "batch_size": 16, "momentum": 0.5, "weight_decay": 1e-3}
    # FixedTrial raises on a param it is not given: adam never asks for momentum.
    adam = sample(optuna.trial.FixedTrial({"lr": 0.01, "epochs": 100, PAIR_PARAM: "adam+mse", "hidden": 32,
                                           "act": "relu", "batch_size": 8, "weight_decay": 1e-3}), space)
    assert "momentum" not in adam
    cfg = config.validate(config.with_values(resolve(), adam), TOY, 83)
    assert cfg.hparams["hidden"] == 32 and cfg.batch_size == 8 and cfg.momentum == 0.0


def test_sampled_values_stay_in_range_and_momentum_never_meets_adam():
    space = toy_space(hidden=True, momentum=True, batch_size=[8, 16, 32])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(80):
        trial = study.ask()
        values = sample(trial, space)
        assert 2 <= values["hidden"] <= 64 and values["batch_size"] in (8, 16, 32)
        assert ("momentum" in values) == (values["optimizer"] == "sgd")
        config.validate(config.with_values(resolve(), values), TOY, 83)
        study.tell(trial, 0.0)
    assert study.trials[0].distributions["hidden"].log  # the declared log scale


def test_space_round_trips_through_a_file_and_resume_checks_hyperparameters(tmp_path):
    space = toy_space(hidden=[4, 32], act=True, weight_decay={"low": 1e-5, "high": 1e-2, "log": True})
    file = tmp_path / "space.json"
    file.write_text(json.dumps(space.to_dict()))
    assert space_module.resolve(TOY, str(file), n_train=83) == space
    storage = optuna.storages.InMemoryStorage()
    args = dict(direction="minimize", sampler=None, pruner=None, experiment="toy")
    study_module.create_study("s", storage, space=space, **args)
    assert study_module.existing_study("s", storage, space=space, **args) is not None
    with pytest.raises(UsageError, match="incompatible with"):
        study_module.existing_study("s", storage, space=toy_space(hidden=[4, 33], act=True), **args)
    # A space without hyperparameters is written as before: studies made before them still resume.
    assert set(toy_space().to_dict()) == {"lr", "epochs", "pairs", "grid_points"}


def test_grid_includes_hyperparameter_axes():
    grid = toy_space(hidden=[4, 16], act=True, grid_points=3).grid()
    assert grid["hidden"] == [4, 8, 16] and grid["act"] == ["relu", "tanh"]


@pytest.mark.parametrize("entries, message", [
    ({"hiden": True}, "unknown search-space key 'hiden'"),
    ({"hidden": [1, 32]}, "hidden must be in [2, 64], got 1"),
    ({"hidden": [32, 4]}, "search-space hidden needs low < high"),
    ({"hidden": "wide"}, "search-space hidden must be true, [low, high], a list of choices or a mapping"),
    ({"hidden": {"low": 4, "hgh": 8}}, "search-space hidden: unknown key 'hgh'"),
    ({"act": [1, 2]}, "unknown act 1"),
    ({"act": {"low": 1, "high": 2}}, "search-space act is categorical: give choices"),
    ({"batch_size": True}, "search-space batch_size has no declared default range"),
    ({"batch_size": [0, 8]}, "batch_size must be a positive integer, got 0"),
    ({"batch_size": [8, 16, 500]}, "batch_size must be at most the training set's size 83, got 500"),
    ({"weight_decay": [0, 0.1]}, "search-space weight_decay: a log range needs low > 0"),
    ({"hidden": {"low": 4, "high": 8, "step": 2, "log": True}}, "step and log cannot be combined"),
    ({"momentum": True, "pairs": ["adam+mse"]}, "momentum applies to optimizers muon, rmsprop, sgd"),
    ({"momentum": {"low": 0, "high": 0.9, "optimizers": ["adam"]}}, "unknown optimizer 'adam'; allowed: muon, rmsprop, sgd"),
    ({"batch_size": [8, 8, 16]}, "choices must be listed once each"),
])
def test_bad_hyperparameter_ranges_are_refused(entries, message):
    with pytest.raises(UsageError) as err:
        toy_space(**entries)
    assert message in str(err.value)


def test_every_builtin_experiment_space_resolves_and_digits_searches_its_hyperparameters():
    for name in ("linear_regression", "binary_classification", "digits"):
        experiment = load(name)
        space = space_module.resolve(experiment, n_train=experiment.make_data().n_train)
        assert space.pairs
    names = {p.name for p in space.params}
    assert {"hidden", "dropout", "batch_size", "momentum"} <= names
    assert {h.name for h in HARNESS_HYPERPARAMETERS} == {"batch_size", "weight_decay", "momentum", "scheduler",
                                                         "grad_clip_norm", "grad_clip_value", "patience", "min_delta"}


def test_config_and_space_files_refuse_what_yaml_or_json_cannot_hold_as_names(tmp_path):
    cases = {"keys.yaml": ("1: 2\n", "keys must be names, got 1"),
             "deep.yaml": ("hidden: " + "[" * 3000 + "\n", "is not valid YAML/JSON"),
             "long.json": ('{"hidden": ' + "9" * 5000 + "}", "is not valid YAML/JSON")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=message.replace("[", r"\[")):
            config.read_file(tmp_path / name)
        with pytest.raises(UsageError, match="space file"):
            space_module.resolve(TOY, str(tmp_path / name))


def test_choices_must_be_values_optuna_and_mlflow_take():
    with pytest.raises(ValueError, match="choices must be str, int, float or bool"):
        Hyperparameter("widths", "categorical", (8, 8), choices=((8, 8), (16, 16)))
