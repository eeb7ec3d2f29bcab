"""Configurations trained as one stack (harness.fast.batched) give each member exactly what training it
alone gives: curves, final state_dict, stop reasons (fast tier: small data, in-process)."""

import pytest
import torch

from harness import config, training
from harness.fast import batched, stacked_optim
from harness.experiment import load
from harness.loop import History, StopTraining

PAIRS = {"linear_regression": ["sgd+l1", "sgd+mse", "adam+l1", "adam+mse", "adamw+smooth_l1", "rmsprop+huber"]}


class StopAt:
    """A pruner's decision at one epoch."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs):
        if epoch == self.epoch:
            raise StopTraining(f"pruned at epoch {epoch}")


def cfg_of(experiment, data, **values):
    return config.resolve({"experiment": experiment.name, "seed": 42, "device": "cpu", **values},
                          experiment=experiment, n_train=data.n_train)[0]


def alone(cfg, experiment, data, observers=()):
    return training.train(cfg, experiment, data, observers=list(observers))


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every value equal, NaN where NaN (a diverged member's weights)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a.nan_to_num(0.0, posinf=float("inf"), neginf=float("-inf")), b.nan_to_num(0.0, posinf=float("inf"), neginf=float("-inf")))


def same(a, b) -> None:
    # float for float, every epoch (NaN where NaN)
    assert a.history.values.keys() == b.history.values.keys()
    assert all(equal(torch.tensor(a.history.values[k], dtype=torch.float64), torch.tensor(b.history.values[k], dtype=torch.float64))
               for k in a.history.values)
    assert a.history.stopped == b.history.stopped and a.history.diverged_at == b.history.diverged_at
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(equal(sa[k], sb[k]) for k in sa)
    assert equal(a.predictions, b.predictions)
    fa, fb = a.final_metrics(), b.final_metrics()
    assert fa.keys() == fb.keys() and equal(torch.tensor(list(fa.values()), dtype=torch.float64),
                                            torch.tensor(list(fb.values()), dtype=torch.float64))


# Every pair trained stacked and alone (~1.5 s idle): in the whole suite. The fast tier keeps a stacked
# search storing what an unstacked one does (test_fast_paths_optional).
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_each_member_equals_its_training_alone_bit_for_bit(name):
    experiment = load(name)
    data = experiment.load_data()
    for pair in PAIRS[name]:
        optimizer, loss = pair.split("+")
        extra = {"momentum": 0.9} if optimizer == "sgd" else {}
        cfgs = [cfg_of(experiment, data, optimizer=optimizer, loss=loss, lr=lr, epochs=epochs, **extra)
                for lr, epochs in ((0.01, 60), (0.003, 45), (0.05, 60), (0.02, 30))]
        cfgs[1] = cfg_of(experiment, data, optimizer=optimizer, loss=loss, lr=0.003, epochs=45,
                         weight_decay=0.01, **extra)
        for member, cfg in zip(batched.train_stack(cfgs, experiment, data), cfgs):
            same(member, alone(cfg, experiment, data))


@pytest.mark.slow  # trains every pair stacked and alone
def test_one_stack_of_every_pair_gives_each_member_its_own_numbers():
    """Optimizers and losses mixed in one stack (sorted by optimizer inside it), with a member of
    each loss diverging: each member is still bit for bit what it is alone."""
    experiment = load("linear_regression")
    data = experiment.load_data()
    cfgs = []
    for i, pair in enumerate(PAIRS["linear_regression"] * 2):
        optimizer, loss = pair.split("+")
        cfgs.append(cfg_of(experiment, data, optimizer=optimizer, loss=loss, lr=(0.003, 0.02)[i % 2] * (1 + i / 10),
                           epochs=20 + 3 * i))
    members = batched.train_stack(cfgs, experiment, data)
    for member, cfg in zip(members, cfgs):
        same(member, alone(cfg, experiment, data))
    # Mini-batches go on stepping after a prediction overflows: the other loss's backward, 0 x inf,
    # must not reach a diverging member (its weights end finite alone).
    cfgs = [cfg_of(experiment, data, optimizer="sgd", loss=loss, lr=lr, epochs=30, batch_size=8)
            for loss in ("mse", "l1") for lr in (0.01, 3e38)]
    members = batched.train_stack(cfgs, experiment, data)
    assert members[1].diverged and members[3].diverged
    assert members[3].model.weights.isfinite().all()
    for member, cfg in zip(members, cfgs):
        same(member, alone(cfg, experiment, data))


def test_the_reference_member_inside_a_stack_prints_the_notebook_s_numbers():
    experiment = load("linear_regression")
    data = experiment.load_data()
    cfgs = [cfg_of(experiment, data, optimizer="sgd", loss="l1", lr=lr, epochs=epochs)
            for lr, epochs in ((0.05, 120), (0.01, 200), (0.001, 300))]
    reference = batched.train_stack(cfgs, experiment, data)[1]
    # The notebook's printed lines (../shared/reference/pytorch_workflow_train_model.md), to the last digit.
    curves = reference.history.values
    for epoch, train, test in ((0, 0.31288138031959534, 0.48106518387794495),
                               (100, 0.024458957836031914, 0.05646304413676262),
                               (190, 0.008932482451200485, 0.005023092031478882)):
        assert (curves["train_loss"][epoch], curves["test_loss"][epoch]) == (train, test), epoch
    assert round(reference.scalars["weight"], 4) == 0.6990 and round(reference.scalars["bias"], 4) == 0.3093
    same(reference, alone(cfgs[1], experiment, data))


def test_members_stop_alone_a_diverging_or_pruned_one_does_not_touch_the_others():
    experiment = load("linear_regression")
    data = experiment.load_data()
    cfgs = [cfg_of(experiment, data, optimizer="sgd", loss="mse", lr=lr, epochs=40) for lr in (0.01, 50.0, 0.02)]

    members = batched.train_stack(cfgs, experiment, data, observers=[[], [], [StopAt(7)]])
    assert members[1].diverged and members[1].history.stopped.startswith("diverged at epoch")
    assert members[2].history.stopped == "pruned at epoch 7" and members[2].history.epochs_run == 8
    same(members[0], alone(cfgs[0], experiment, data))
    same(members[1], alone(cfgs[1], experiment, data))
    same(members[2], alone(cfgs[2], experiment, data, [StopAt(7)]))


def test_values_read_every_few_epochs_stop_each_member_where_alone_stops():
    """As on a GPU: per-epoch values stay where they are made and are read every ``sync_every``
    epochs (and at a member's last), so a pruner or a divergence is seen at a sync, as alone."""
    experiment = load("linear_regression")
    data = experiment.load_data()
    cfgs = [cfg_of(experiment, data, optimizer=opt, loss=loss, lr=lr, epochs=epochs)
            for opt, loss, lr, epochs in (("sgd", "l1", 0.01, 23), ("sgd", "mse", 50.0, 40), ("adam", "mse", 0.02, 40),
                                          ("adam", "l1", 0.01, 17))]

    observers = [[], [], [StopAt(7)], []]
    members = batched.train_stack(cfgs, experiment, data, observers=observers, sync_every=5)
    assert members[1].diverged
    assert members[2].history.stopped == "pruned at epoch 7" and members[2].history.epochs_run == 8
    for member, cfg, watch in zip(members, cfgs, ([], [], [StopAt(7)], [])):
        lone = training.train(cfg, experiment, data, observers=watch, sync_every=5)
        same(member, lone)  # the pruned one trained on to epoch 9, its sync, as alone
    assert not torch.equal(members[2].model.weights, batched.train_stack(
        cfgs[2:3] * 2, experiment, data, observers=[[StopAt(7)], []], sync_every=1)[0].model.weights)


def test_mini_batches_come_in_the_same_order_as_alone():
    experiment = load("linear_regression")
    data = experiment.load_data()
    cfgs = [cfg_of(experiment, data, optimizer="adam", loss="mse", lr=lr, epochs=25, batch_size=8)
            for lr in (0.01, 0.003, 0.03)]
    for member, cfg in zip(batched.train_stack(cfgs, experiment, data), cfgs):
        same(member, alone(cfg, experiment, data))


@pytest.mark.slow  # refusals checked on three experiments' data, digits' too (~1.3 s idle)
def test_what_cannot_be_stacked_is_said_in_one_line():
    reference = load("linear_regression")
    data = reference.load_data()
    assert batched.refusal(cfg_of(reference, data, optimizer="sgd", loss="l1", lr=0.01, epochs=1), reference, data) is None
    # Matrix products: a stack's last bits are not those of one model trained alone.
    circles = load("binary_classification")
    data = circles.load_data()
    reason = batched.refusal(cfg_of(circles, data, optimizer="adam", loss="bce_with_logits", lr=0.01, epochs=1),
                             circles, data)
    assert reason is not None and "matrix products" in reason and "\n" not in reason

    experiment = load("digits")
    data = experiment.load_data()
    cfg = cfg_of(experiment, data, optimizer="adam", loss="cross_entropy", lr=0.01, epochs=1, dropout=0.3)
    reason = batched.refusal(cfg, experiment, data)
    assert reason is not None and "random numbers" in reason and "\n" not in reason
    plain = cfg_of(experiment, data, optimizer="adam", loss="cross_entropy", lr=0.01, epochs=1, dropout=0.0)
    other = cfg_of(experiment, data, optimizer="adam", loss="cross_entropy", lr=0.01, epochs=1, dropout=0.0,
                   hidden=32)  # other shapes
    assert batched.stack_key(plain) != batched.stack_key(other)
    with pytest.raises(ValueError, match="cannot share a stack"):
        batched.train_stack([plain, other], experiment, data)


def test_where_stacked_updates_are_not_known_exact_each_member_s_optimizer_steps(monkeypatch):
    """Both ways of stepping a stack give the members' own numbers: stacked updates (when
    stacked_optim.agrees on this machine) and each member's torch optimizer (otherwise)."""
    experiment = load("linear_regression")
    data = experiment.load_data()
    cfgs = [cfg_of(experiment, data, optimizer="adamw", loss="mse", lr=lr, epochs=30) for lr in (0.01, 0.04)]
    assert batched._stepper([batched._Member(c, m, o, [], History()) for c, (m, o) in zip(cfgs, [
        (lambda m: (m, torch.optim.AdamW(m.parameters(), lr=0.01)))(training.build_model(c, experiment))
        for c in cfgs])]).__class__ is batched._StackedParams
    fast = batched.train_stack(cfgs, experiment, data)
    monkeypatch.setattr(batched, "_AGREES", {k: False for k in batched._AGREES})
    slow = batched.train_stack(cfgs, experiment, data)
    for a, b, cfg in zip(fast, slow, cfgs):
        same(a, b)
        same(a, alone(cfg, experiment, data))


def test_every_learning_rate_a_stack_steps_with_is_checked_and_one_that_disagrees_unstacks_it(monkeypatch):
    """The check that stacked updates are exact is cached by what it checked: a later stack with
    other learning rates is checked for them, and a rate found to disagree keeps any stack that
    holds it on each member's own optimizer."""
    experiment = load("linear_regression")
    data = experiment.load_data()
    asked = []
    real = stacked_optim.agrees
    monkeypatch.setattr(batched, "_AGREES", {})
    monkeypatch.setattr(stacked_optim, "agrees", lambda kind, shapes, lrs, *rest: asked.append(list(lrs))
                        or (real(kind, shapes, lrs, *rest) and 0.03 not in lrs))

    def stepper(lrs):
        cfgs = [cfg_of(experiment, data, optimizer="adam", loss="l1", lr=lr, epochs=5) for lr in lrs]
        members = []
        for c in cfgs:
            model = training.build_model(c, experiment)
            members.append(batched._Member(c, model, torch.optim.Adam(model.parameters(), lr=c.lr), [], History()))
        return type(batched._stepper(members))

    assert stepper([0.01, 0.02]) is batched._StackedParams and asked == [[0.01, 0.02]]
    assert stepper([0.02, 0.01]) is batched._StackedParams and asked == [[0.01, 0.02]]  # known: not checked again
    assert stepper([0.01, 0.03]) is batched._EachOptimizer and asked[1:] == [[0.03], [0.03]]
    assert stepper([0.01, 0.02, 0.04]) is batched._StackedParams and asked[3:] == [[0.04]]
    assert stepper([0.03, 0.04]) is batched._EachOptimizer and len(asked) == 4
