"""A researcher's own training recipe: any torch optimizer and loss with their settings, an
experiment's own factories, learning-rate schedules, clipping, early stopping and a validation
split, each held to what a plain PyTorch loop doing the same gives."""
import math

import pytest
import torch
from torch import nn

from harness import config, registry, training
from harness.errors import UsageError
from harness.experiment import Data, Experiment, load
from harness.search import space as space_module

REFERENCE = load("linear_regression")


def resolve(**overrides):
    return config.resolve(overrides, experiment=REFERENCE)[0]


def test_every_optimizer_and_loss_of_torch_is_there_by_its_lower_case_name():
    for name in ("sgd", "adam", "adamw", "rmsprop", "adadelta", "adagrad", "adamax", "nadam", "radam", "asgd", "rprop"):
        assert registry.OPTIMIZERS[name].__name__.lower() == name
    assert "lbfgs" not in registry.OPTIMIZERS  # it steps with a closure
    expected = {"l1": nn.L1Loss, "mse": nn.MSELoss, "nll": nn.NLLLoss, "kl_div": nn.KLDivLoss, "bce": nn.BCELoss,
                "bce_with_logits": nn.BCEWithLogitsLoss, "cross_entropy": nn.CrossEntropyLoss,
                "smooth_l1": nn.SmoothL1Loss, "poisson_nll": nn.PoissonNLLLoss}
    assert all(registry.LOSSES[name] is cls for name, cls in expected.items())
    assert not {"ctc", "triplet_margin", "cosine_embedding", "margin_ranking"} & set(registry.LOSSES)  # not (input, target)


@pytest.mark.parametrize("name", sorted(set(registry.OPTIMIZERS) - {"muon", "sparseadam"}))
def test_every_optimizer_trains_the_reference_and_reruns_bit_for_bit(name):
    cfg = resolve(optimizer=name, epochs=5)
    first, second = training.train(cfg, REFERENCE), training.train(cfg, REFERENCE)
    assert type(first.model) is type(second.model) and first.history.values == second.history.values
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert all(math.isfinite(v) for v in first.history.values["train_loss"])


@pytest.mark.parametrize("name", ["muon", "sparseadam"])
def test_an_optimizer_the_model_cannot_use_is_refused_before_training_in_one_line(name):
    cfg = resolve(optimizer=name)
    with pytest.raises(UsageError) as err:
        training.preflight(cfg, REFERENCE, REFERENCE.load_data())
    assert f"cannot train with {name}+l1" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer": "sgd", "rho": 0.8}, "rho applies to optimizers adadelta only, got rho=0.8 with optimizer 'sgd'"),
    ({"optimizer": "adam", "beta1": 1.5}, "beta1 must be in [0.0, 0.999], got 1.5"),
    ({"nesterov": True}, "sgd+l1, scheduler none refuses these settings: Nesterov momentum requires a momentum"),
    ({"label_smoothing": 0.1}, "label_smoothing applies to losses cross_entropy only, got label_smoothing=0.1 with loss 'l1'"),
    ({"gamma": 0.5}, "gamma applies to schedulers step, multistep, exponential, plateau only, got gamma=0.5 with scheduler 'none'"),
    ({"scheduler": "cosin"}, "unknown scheduler 'cosin'; allowed: none, step, multistep, exponential, cosine"),
    ({"scheduler": "multistep", "milestones": "60,30"}, "milestones must be increasing epochs"),
    ({"optimizer": "rprop", "weight_decay": 0.1}, "weight_decay applies to optimizers"),
    ({"grad_clip_norm": 0}, "grad_clip_norm must be a positive number, got 0"),
    ({"patience": "soon"}, "patience must be a positive integer, got 'soon'"),
    ({"valid_fraction": 0.95}, "valid_fraction must be in [0.0, 0.9], got 0.95"),
    ({"objective": "test_loss"}, "objective 'test_loss' is a test metric"),
    ({"objective": "final_valid_loss"}, "objective 'final_valid_loss': name the metric, 'valid_loss'"),
    ({"objective": "valid loss"}, "objective must name a metric the runs log"),
    ({"objective": "weight_error", "patience": 3}, "patience 3 with objective 'weight_error', a final value: it "
                                                   "watches the selection metric every epoch"),
    ({"objective": "weight_error", "scheduler": "plateau"}, "scheduler plateau with objective 'weight_error'"),
    ({"direction": "up"}, "unknown direction 'up'; allowed: minimize, maximize"),
])
def test_settings_that_do_not_apply_or_torch_refuses_are_one_line_naming_what_applies(overrides, message):
    with pytest.raises(UsageError) as err:
        resolve(**overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_settings_reach_torch_and_only_set_ones_are_logged():
    cfg = resolve(optimizer="adam", beta2=0.95, eps=1e-6, amsgrad="true", loss="huber", delta=0.5)
    optimizer = training.make_optimizer(cfg, REFERENCE, [torch.zeros(1, requires_grad=True)])
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-6
    assert optimizer.defaults["amsgrad"] is True
    assert training.make_loss(cfg, REFERENCE).delta == 0.5
    flat = cfg.to_dict()
    assert {k: flat[k] for k in ("beta2", "eps", "amsgrad", "delta")} == {"beta2": 0.95, "eps": 1e-6, "amsgrad": True,
                                                                           "delta": 0.5}
    assert "rho" not in flat and "beta1" not in flat  # torch's defaults: not set, not logged


def test_a_default_that_suits_one_optimizer_is_applied_only_where_it_applies():
    experiment = Experiment("momentum_default", REFERENCE.make_data, REFERENCE.make_model,
                            defaults={"optimizer": "sgd", "momentum": 0.9, "nesterov": True})
    assert config.resolve({}, experiment=experiment)[0].momentum == 0.9
    adam, _ = config.resolve({"optimizer": "adam"}, experiment=experiment)
    assert adam.momentum == 0.0 and "nesterov" not in adam.to_dict()
    with pytest.raises(UsageError, match="momentum applies to optimizers muon, rmsprop, sgd only"):
        config.resolve({"optimizer": "adam", "momentum": 0.5}, experiment=experiment)  # given: checked
    # A search's trials: an adam trial does not inherit the base's momentum, an sgd trial keeps it.
    base, _ = config.resolve({}, experiment=experiment)
    space = space_module.resolve(experiment, overrides={"pairs": ["sgd+l1", "adam+l1"]})
    for pair, momentum in (("adam+l1", 0.0), ("sgd+l1", 0.9)):
        trial = __import__("optuna").trial.FixedTrial({"lr": 0.01, "epochs": 100, "optimizer_loss": pair})
        cfg = config.validate(config.with_values(base, space_module.sample(trial, space, base.chosen()), experiment),
                              experiment)
        assert cfg.momentum == momentum


def test_an_experiment_brings_its_own_optimizer_loss_and_schedule_as_factories():
    calls = []

    def my_optimizer(params, cfg):
        calls.append(("optimizer", cfg.lr))
        return torch.optim.SGD(params, lr=cfg.lr * 2)

    def my_loss(cfg):
        calls.append(("loss", cfg.loss))
        return nn.L1Loss()

    def my_schedule(optimizer, cfg, steps_per_epoch):
        calls.append(("scheduler", steps_per_epoch))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)

    experiment = Experiment("own", REFERENCE.make_data, REFERENCE.make_model, optimizers={"double_sgd": my_optimizer},
                            losses={"my_l1": my_loss}, schedulers={"halving": my_schedule},
                            defaults={"optimizer": "double_sgd", "loss": "my_l1", "scheduler": "halving", "epochs": 3})
    cfg, _ = config.resolve({}, experiment=experiment)
    result = training.train(cfg, experiment)
    assert ("optimizer", 0.01) in calls and ("loss", "my_l1") in calls and ("scheduler", 1) in calls
    assert result.history.values["learning_rate"] == [0.02, 0.01, 0.005]
    assert space_module.resolve(experiment).pairs == ("double_sgd+my_l1",)
    with pytest.raises(UsageError, match="did you mean 'double_sgd'"):
        config.resolve({"optimizer": "double_sdg"}, experiment=experiment)


def plain_loop(epochs, batch_size, scheduler, clip, seed=42):
    """What a researcher writes by hand (pytorch/examples' mnist main.py, on the reference's data):
    a DataLoader with a seeded generator, zero_grad/backward/clip/step, a schedule per epoch or per batch."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    data = REFERENCE.make_data()
    torch.manual_seed(seed)
    model = REFERENCE.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dataset = TensorDataset(data.X_train, data.y_train)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, sampler=BatchSampler(RandomSampler(dataset, generator=generator), batch_size, False),
                        batch_size=None, generator=generator)
    per_batch = scheduler == "onecycle"
    schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.01, total_steps=epochs * len(loader)) if per_batch
                else torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5))
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        model.train()
        for X, y in loader:
            loss = nn.L1Loss()(model(X), y)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if per_batch:
                schedule.step()
        if not per_batch:
            schedule.step()
    return model, rates


@pytest.mark.parametrize("scheduler, settings", [("step", {"step_size": 3, "gamma": 0.5}), ("onecycle", {})])
def test_a_schedule_and_clipping_give_what_a_plain_pytorch_loop_gives_bit_for_bit(scheduler, settings):
    cfg = resolve(epochs=8, batch_size=8, scheduler=scheduler, grad_clip_norm=0.05, **settings)
    result = training.train(cfg, REFERENCE)
    model, rates = plain_loop(8, 8, scheduler, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), model.state_dict().values()))
    assert result.history.values["learning_rate"] == rates
    assert len(set(rates)) > 2  # the schedule did change the rate


@pytest.mark.slow  # eight trainings
def test_every_named_schedule_trains_and_logs_its_rate():
    for name in registry.SCHEDULERS:
        result = training.train(resolve(epochs=12, scheduler=name, valid_fraction=0.2), REFERENCE)
        assert result.history.epochs_run == 12
        assert ("learning_rate" in result.history.values) == (name != "none")
    warm = training.train(resolve(epochs=10, scheduler="warmup_cosine", warmup_epochs=4), REFERENCE)
    rates = warm.history.values["learning_rate"]
    assert rates[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01]) and rates[-1] < rates[5] < 0.01


def test_early_stopping_keeps_its_best_epoch_which_a_run_of_that_many_epochs_equals():
    cfg = resolve(epochs=300, lr=0.05, patience=5, valid_fraction=0.2, batch_size=4)
    result = training.train(cfg, REFERENCE)
    history = result.history
    assert history.early_stop and history.stopped is None  # not a pruned trial
    best = history.best_epoch
    assert history.epochs_run == best + 6 < 300
    assert history.values["valid_loss"][best] == min(history.values["valid_loss"])
    assert result.final_metrics()["final_valid_loss"] == history.values["valid_loss"][best]
    assert result.final_metrics()["best_epoch"] == best
    # The weights kept are those after epoch `best`: a run of best+1 epochs without early stopping.
    shorter = training.train(resolve(epochs=best + 1, lr=0.05, valid_fraction=0.2, batch_size=4), REFERENCE)
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), shorter.model.state_dict().values()))
    again = training.train(cfg, REFERENCE)
    assert again.history.values == history.values


def test_the_validation_part_is_held_out_of_training_the_same_whatever_the_seed():
    data = REFERENCE.load_data()
    held = [training.with_validation(data, resolve(valid_fraction=0.25, seed=seed)) for seed in (1, 2)]
    assert torch.equal(held[0].X_valid, held[1].X_valid) and len(held[0].X_valid) == 10
    together = torch.cat([held[0].X_train, held[0].X_valid]).sort(dim=0).values
    assert torch.equal(together, data.X_train.sort(dim=0).values)  # a partition of the training part
    result = training.train(resolve(valid_fraction=0.25, epochs=3), REFERENCE)
    assert list(result.history.values) == ["train_loss", "valid_loss", "test_loss"]
    own = Experiment("own_valid", lambda: Data(*[t for t in (data.X_train, data.y_train, data.X_test, data.y_test)],
                                               X_valid=data.X_test, y_valid=data.y_test), REFERENCE.make_model)
    with pytest.raises(UsageError, match="gives its own validation part"):
        training.train(config.resolve({"valid_fraction": 0.2}, experiment=own)[0], own)


def test_the_reference_is_unchanged_with_every_new_option_off():
    result = training.train(resolve(), REFERENCE)
    assert result.history.values["test_loss"][-1] == 0.008447891101241112  # the notebook's last printed figure
    assert list(result.history.values) == ["train_loss", "test_loss"]


@pytest.mark.slow
def test_digits_cnn_is_the_mnist_recipe_and_a_search_selects_it_on_validation_accuracy():
    import optuna

    from harness.search import Objective

    experiment = load("digits_cnn")
    cfg, _ = config.resolve({"epochs": 2}, experiment=experiment)
    assert (cfg.optimizer, cfg.loss, cfg.scheduler, dict(cfg.settings)) == ("adadelta", "nll", "step",
                                                                            {"step_size": 1, "gamma": 0.7})
    assert training.train(cfg, experiment).history.values["learning_rate"] == [1.0, 0.7]
    space = space_module.resolve(experiment, overrides={"epochs": [2, 3]})
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    with Objective(experiment, space, track=False, objectives=("valid_accuracy",)) as objective:
        study.optimize(objective, n_trials=1)  # one trial re-trained shows it (two cost a CNN's training twice more)
    assert objective.base.valid_fraction is None  # the experiment's own validation part
    for trial in study.trials:
        values = {"lr": trial.params["lr"], "epochs": trial.params["epochs"], "gamma": trial.params["gamma"],
                  "dropout1": trial.params["dropout1"], "dropout2": trial.params["dropout2"], "direction": "maximize"}
        again = training.train(config.validate(config.with_values(objective.base, values), experiment), experiment)
        assert trial.value == again.history.last("valid_accuracy")



def test_an_exception_in_the_experiment_s_code_fails_that_trial_with_its_reason_and_the_search_goes_on(tmp_path):
    import optuna

    from search_helpers import BREAKS

    from harness.search import Objective

    (tmp_path / "breaks.py").write_text(BREAKS)
    experiment = load(str(tmp_path / "breaks.py"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    with Objective(experiment, track=False) as objective:
        study.optimize(objective, n_trials=3)  # does not raise
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3
    assert {t.user_attrs["fail_reason"] for t in study.trials} == {
        "the experiment's code raised at epoch 10: RuntimeError: user code broke at call 31"}
    with pytest.raises(__import__("harness.errors").errors.ExperimentCodeError, match="at epoch 15"):  # no validation pass in train
        training.train(config.resolve({}, experiment=experiment)[0], experiment)


def test_a_search_refuses_a_schedule_setting_no_trial_would_use(capsys, tmp_path, monkeypatch):
    from search_helpers import check_refused_in_process

    check_refused_in_process(["search", "--tune", "gamma=[0.5,0.9]"],
                             "search-space gamma applies to schedulers step, multistep, exponential, plateau, and "
                             "every trial's scheduler is 'none'", capsys, tmp_path, monkeypatch)


@pytest.mark.slow  # a whole search in-process
def test_a_final_value_the_experiment_logs_can_be_the_objective_and_prunes_nothing(capsys):
    import optuna

    from harness.search import Objective

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0), pruner=optuna.pruners.MedianPruner(0, 0))
    with Objective(REFERENCE, track=False, objectives=("weight_error",)) as objective:
        study.optimize(objective, n_trials=3)
    assert "objective weight_error is a final value, not a per-epoch one: the pruner prunes no trial" in capsys.readouterr().err
    for trial in study.trials:
        assert trial.state.name == "COMPLETE" and trial.intermediate_values == {}
        values = {**trial.params, "direction": "minimize"}
        optimizer, loss = values.pop("optimizer_loss").split("+")
        again = training.train(config.validate(config.with_values(
            objective.base, {**values, "optimizer": optimizer, "loss": loss}), REFERENCE), REFERENCE)
        assert trial.value == again.scalars["weight_error"]
        assert list(trial.user_attrs["harness.metrics"]) == ["weight_error", "valid_loss"]
    with pytest.raises(UsageError, match="it records train_loss, valid_loss, and the final values weight, bias, "
                                         "weight_error, bias_error"):
        cfg = resolve(objective="weight_errr", valid_fraction=0.2)
        training.preflight(cfg, REFERENCE, REFERENCE.load_data())


@pytest.mark.parametrize("size", [2, 4])
def test_an_exception_in_the_experiment_s_code_fails_those_trials_of_a_batch_and_the_search_goes_on(tmp_path, size,
                                                                                                    capsys):
    import optuna

    from search_helpers import BREAKS

    from harness.search import Objective, loop

    (tmp_path / "breaks.py").write_text(BREAKS)
    experiment = load(str(tmp_path / "breaks.py"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    with Objective(experiment, track=False, batch=size) as objective:
        loop.optimize(study, objective, 2 * size, size)  # does not raise
    assert [t.state.name for t in study.trials] == ["FAIL"] * 2 * size
    assert {t.user_attrs["fail_reason"] for t in study.trials} == {
        "the experiment's code raised at epoch 10: RuntimeError: user code broke at call 31"}
    assert capsys.readouterr().err.count("a trial failed, the search goes on") == 1  # said once
