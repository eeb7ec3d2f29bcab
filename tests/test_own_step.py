"""An experiment's own training step: batches that are dicts or tuples of inputs, mixup, an
auxiliary loss. The loop keeps the order of operations after the loss, observers see every epoch,
and what the step returns is checked before any store is touched."""
from dataclasses import replace

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from conftest import readme_blocks
from harness import config, training
from harness.fast import batched
from harness.errors import ExperimentCodeError, UsageError
from harness.experiment import Datasets, Experiment, load
from harness.search import Objective
from harness.search import space as space_module

REFERENCE = load("linear_regression")
# The example's 800 training samples in batches of 200, not its 32: still several dict batches an
# epoch (collated, mixed up), at a sixth of the steps, each of which the example builds sample by sample.
FEWER_BATCHES = 200


@pytest.fixture
def two_inputs(tmp_path):
    """docs/experiments.md's own-step example (two inputs as a dict, mixup, an auxiliary loss), as printed."""
    code, _ = readme_blocks("**Your own step.**", doc="docs/experiments.md")
    (tmp_path / "two_inputs.py").write_text(code)
    return load(str(tmp_path / "two_inputs.py"))


def resolve(experiment, **overrides):
    return config.resolve(overrides, experiment=experiment)[0]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class Seen:
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, epoch, logs):
        self.epochs.append((epoch, dict(logs)))


@pytest.mark.slow  # whole trainings and searches
def test_dict_batches_with_mixup_and_an_aux_loss_train_rerun_bit_for_bit_and_observers_see_every_epoch(two_inputs):
    cfg = resolve(two_inputs, epochs=6, mixup=0.4, width=8, batch_size=FEWER_BATCHES)
    seen = Seen()
    result = training.train(cfg, two_inputs, observers=[seen])
    values = result.history.values
    assert list(values) == [f"{split}_{name}" for split in ("train", "valid", "test")
                            for name in ("loss", "aux_loss", "accuracy")]
    assert [epoch for epoch, _ in seen.epochs] == [0, 1, 2, 3, 4, 5]
    assert all(logs[k] == values[k][epoch] for epoch, logs in seen.epochs for k in values)
    assert result.model.a.out_features == 8  # make_model got width; the step read mixup from cfg.hparams
    assert result.predictions is None and result.final_metrics()["final_valid_accuracy"] == values["valid_accuracy"][-1]
    again = training.train(cfg, two_inputs)
    assert again.history.values == values and same_weights(again.model, result.model)
    plain = training.train(replace(cfg, hparams={**cfg.hparams, "mixup": 0.0}), two_inputs)
    assert plain.history.values["train_loss"] != values["train_loss"]  # mixup changed the training batches
    # Evaluation is the same step without mixup: on the untrained model, train mode or not decides.
    assert values["valid_accuracy"][-1] > 0.8


def plain_step(model, batch, loss_fn, cfg):
    X, y = batch
    return loss_fn(model(X), y)


@pytest.mark.parametrize("overrides", [
    {},  # full batch: the reference's one step an epoch
    {"batch_size": 8, "scheduler": "onecycle", "grad_clip_norm": 0.05, "epochs": 12},
    pytest.param({"batch_size": 4, "scheduler": "step", "step_size": 5, "gamma": 0.5, "grad_clip_value": 0.02,
                  "patience": 4, "valid_fraction": 0.2, "lr": 0.05, "epochs": 200},
                 marks=pytest.mark.slow),  # two trainings of up to 200 epochs of 4 samples (~2 s)
])
def test_a_step_doing_the_plain_thing_is_the_plain_path_bit_for_bit_with_the_recipe_on(overrides):
    own = replace(REFERENCE, step=plain_step)
    mine, theirs = training.train(resolve(own, **overrides), own), training.train(resolve(REFERENCE, **overrides), REFERENCE)
    assert mine.history.values == theirs.history.values
    assert mine.history.best_epoch == theirs.history.best_epoch and mine.history.early_stop == theirs.history.early_stop
    assert same_weights(mine.model, theirs.model)
    if "patience" in overrides:
        assert mine.history.early_stop and mine.history.epochs_run < 200


class Triples(Dataset):
    """(x1, x2, y) samples: a batch is a tuple of three tensors."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x1, self.x2 = torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)
        self.y = self.x1.sum(1, keepdim=True) - self.x2

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x1[i], self.x2[i], self.y[i]


class Sum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 1), nn.Linear(1, 1)

    def forward(self, x1, x2):
        return self.a(x1) + self.b(x2)


def triple_step(model, batch, loss_fn, cfg):
    x1, x2, y = batch
    pred = model(x1, x2)
    return loss_fn(pred, y), {"max_error": (pred - y).abs().max().item()}  # a number is a value too


TRIPLES = Experiment("triples", lambda: Datasets(Triples(96, 0), Triples(30, 1), Triples(30, 2)), Sum,
                     step=triple_step, defaults={"optimizer": "adam", "loss": "mse", "lr": 0.05, "epochs": 30,
                                                 "batch_size": 16})


@pytest.mark.slow  # whole trainings and searches
def test_a_tuple_of_inputs_trains_and_its_values_are_sample_weighted_means_of_the_batches():
    result = training.train(resolve(TRIPLES), TRIPLES)
    values = result.history.values
    assert set(values) == {f"{s}_{n}" for s in ("train", "valid", "test") for n in ("loss", "max_error")}
    assert values["valid_loss"][-1] < values["valid_loss"][0] / 10
    # 96 training samples in batches of 16, 16, ..., and an epoch's value is their sample-weighted mean:
    # the last epoch's test value over one batch of 30 is the batch's own.
    model = result.model.eval()
    data = TRIPLES.load_data().test
    with torch.inference_mode():
        pred = model(data.x1, data.x2)
    assert values["test_max_error"][-1] == pytest.approx((pred - data.y).abs().max().item(), abs=1e-6)


@pytest.mark.parametrize("returned, message", [
    ("1.5", "must return a one-element loss tensor or (loss, {name: value}); it returned a float"),
    ("loss_fn(model(X), y).expand(3)", "it returned a tensor of shape [3]"),
    ("(loss_fn(model(X), y), [1.0])", "it returned a tuple of 2 (Tensor, list)"),
    ("(loss_fn(model(X), y), {'loss': 1.0})", "a value named 'loss'; names must be identifiers other than 'loss'"),
    ("(loss_fn(model(X), y), {'spread': model(X)})", "returned 'spread' as a tensor of shape [8, 1]"),
    ("(loss_fn(model(X), y), {'note': 'ok'})", "returned 'note' as a str"),
    ("loss_fn(model(X), y) if not model.training else undefined_name", "NameError: name 'undefined_name'"),
])
def test_a_step_that_returns_the_wrong_thing_is_refused_before_any_store_in_one_line(returned, message):
    def step(model, batch, loss_fn, cfg):
        X, y = batch
        return eval(returned)

    own = replace(REFERENCE, step=step)
    with pytest.raises(UsageError) as err:
        training.preflight(resolve(own), own, own.load_data())
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("experiment 'linear_regression' cannot train with sgd+l1")


@pytest.mark.parametrize("changed", [lambda n: n == 7, lambda n: n >= 20], ids=["mid-epoch", "from-an-epoch-on"])
def test_a_step_that_breaks_mid_training_fails_that_trial_with_its_reason_and_the_search_goes_on(changed):
    def flaky(model, batch, loss_fn, cfg):  # other names on one batch, or from one epoch on, of each run
        model.calls = getattr(model, "calls", 0) + 1
        X, y = batch
        loss = loss_fn(model(X), y)
        return (loss, {"b": loss}) if changed(model.calls) else (loss, {"a": loss})

    own = replace(REFERENCE, step=flaky, search_space={"pairs": ["sgd+l1"], "epochs": [30, 40]})
    with pytest.raises(ExperimentCodeError, match="the step must return the same values for every batch|"
                                                  "the experiment's values must have the same names every epoch"):
        training.train(resolve(own, batch_size=10), own)  # 4 training batches and 1 test batch an epoch
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    with Objective(own, track=False) as objective:  # full batch: one training, validation and test batch
        study.optimize(objective, n_trials=2)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["fail_reason"].startswith("the experiment's code raised at epoch")
               for t in study.trials)


@pytest.mark.slow  # whole trainings and searches
def test_a_search_selects_on_the_step_s_validation_values_and_stacks_refuse_it(two_inputs):
    space = space_module.resolve(two_inputs, overrides={"epochs": [2, 3]})
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    with Objective(two_inputs, space, track=False, objectives=("valid_accuracy",),
                   base={"batch_size": FEWER_BATCHES}) as objective:
        study.optimize(objective, n_trials=1)  # one trial re-trained shows it; each more is two trainings
    for trial in study.trials:
        values = {**trial.params, "direction": "maximize"}
        optimizer, loss = values.pop("optimizer_loss").split("+")
        cfg = config.validate(config.with_values(objective.base, {**values, "optimizer": optimizer, "loss": loss}),
                              two_inputs)
        retrained = training.train(cfg, two_inputs).history
        assert trial.value == retrained.last("valid_accuracy")
        # The trial keeps its final validation values, the selection metric first, never a test value.
        assert trial.user_attrs["harness.metrics"] == {
            name: retrained.last(name) for name in ("valid_accuracy", "valid_loss", "valid_aux_loss")}
        assert list(trial.user_attrs["harness.metrics"])[0] == "valid_accuracy"
    assert batched.recipe_refusal(resolve(two_inputs), two_inputs) == "an experiment's own step is not stacked"

    # The tables of the best trials show them beside the selection metric: the CLI's and the parent run's.
    from harness.search.report import report
    from harness.search.summary import describe

    best = study.best_trial
    printed = report(study, None, 1.0, "memory", two_inputs).splitlines()
    header = printed[printed.index("top trials:") + 1].split()
    assert header[:4] == ["trial", "valid_accuracy", "valid_loss", "valid_aux_loss"] and "optimizer+loss" in header
    row = printed[printed.index("top trials:") + 2].split()
    assert row[0] == str(best.number) and float(row[1]) == pytest.approx(best.value, abs=1e-6)
    note = describe(study, two_inputs, "0", {}, objectives=("valid_accuracy",)).splitlines()
    assert "| rank | trial | valid_accuracy | valid_loss | valid_aux_loss | lr |" in "\n".join(note)
    # The attr is a storage's, so untrusted: anything but numbers by identifiers is left out, and few are shown.
    study.add_trial(optuna.trial.create_trial(
        params=best.params, distributions=best.distributions, value=2.0,
        user_attrs={"harness.metrics": {"valid_loss": "0.1", "x" * 5: float("nan"), "bad name": 1.0,
                                        **{f"m{i}": float(i) for i in range(50)}}}))
    table = report(study, None, 1.0, "memory", two_inputs).splitlines()
    header = table[table.index("top trials:") + 1].split()
    assert header[:2] == ["trial", "valid_accuracy"] and "m6" in header and "m7" not in header  # 8 shown
    assert "bad" not in header and "valid_loss" in header  # the other trials' valid_loss; the bad one's is "-"


@pytest.mark.parametrize("fields, message", [
    ({"step": plain_step, "metrics": lambda p, y: {}}, "with its own step, return per-batch values from the step"),
    ({"eval_step": plain_step}, "eval_step without step"),
    ({"step": "plain"}, "step must be a function"),
])
def test_an_experiment_that_mixes_its_step_up_is_refused_where_it_is_defined(fields, message):
    with pytest.raises(ValueError, match=message):
        replace(REFERENCE, **fields)


def test_an_own_eval_step_evaluates_validation_and_test_batches():
    def scaled(model, batch, loss_fn, cfg):
        X, y = batch
        return loss_fn(model(X), y) * 2

    own = replace(REFERENCE, step=plain_step, eval_step=scaled)
    mine = training.train(resolve(own, epochs=5, valid_fraction=0.2), own).history.values
    theirs = training.train(resolve(REFERENCE, epochs=5, valid_fraction=0.2), REFERENCE).history.values
    assert mine["train_loss"] == theirs["train_loss"]
    assert mine["test_loss"] == [2 * v for v in theirs["test_loss"]]
    assert mine["valid_loss"] == [2 * v for v in theirs["valid_loss"]]


@pytest.mark.slow  # whole trainings and searches
def test_an_experiment_s_own_value_can_be_the_first_of_two_objectives(two_inputs):
    space = space_module.resolve(two_inputs, overrides={"epochs": [2, 4]})
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(1))
    with Objective(two_inputs, space, track=False, objectives=("valid_accuracy", "epochs"),
                   base={"batch_size": FEWER_BATCHES}) as objective:
        study.optimize(objective, n_trials=3)
    assert study.metric_names == ["valid_accuracy", "epochs"]
    for trial in study.trials:
        assert trial.values[1] == trial.params["epochs"]
        assert trial.values[0] == trial.user_attrs["harness.metrics"]["valid_accuracy"]
        assert list(trial.user_attrs["harness.metrics"])[0] == "valid_accuracy"


def test_predict_prints_image_shaped_inputs_by_their_shape_and_flat_ones_by_their_values():
    from harness.commands.predict import lines

    images, scores = torch.zeros(2, 1, 8, 8), torch.tensor([[0.25, -1.0, 3.0]] * 2)
    assert lines(images, scores) == ["input 0 (1x8x8) -> 0.25 -1 3", "input 1 (1x8x8) -> 0.25 -1 3"]
    assert lines(torch.tensor([[0.5], [1.0]]), torch.tensor([[0.75], [1.5]])) == ["0.5 -> 0.75", "1 -> 1.5"]
    assert lines(torch.tensor([0.5]), torch.tensor([2.0])) == ["0.5 -> 2"]  # 0-d rows
