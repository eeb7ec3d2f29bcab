"""Several configurations trained as one stacked model: one forward and one backward per step for all
members, each member with its own initial weights, optimizer and history.

A member's numbers are the ones it gets trained alone (``training.train``), bit for bit:
- its initial weights are drawn from its own seed, as ``training.build_model`` draws them;
- the forward is ``torch.func.functional_call`` under ``vmap`` over the stacked parameters, and the
  loss is the sum of the members' losses, whose gradient with respect to each member's own loss is
  exactly 1: each member's gradients are its own (element-wise ops and per-member reductions);
- each member keeps its own torch optimizer, stepped as training alone steps it: the update is
  torch's own code, with the member's learning rate, weight decay and momentum.
tests/test_batched.py holds every optimizer/loss pair of the experiments to this, member by member.

Members stop on their own: when their epochs are done, when their loss stops being finite, or when
an observer raises StopTraining (a pruner). The others go on; a stopped member no longer changes.

What can be stacked (``stack_key``, ``refusal``): members of one experiment with the same batch size,
seed (their batches come in the same order), device and model hyperparameters (the parameters'
shapes), whose model has no buffers and draws no random numbers while it trains (dropout would draw
them in another order than training alone does). Optimizers and losses may differ within a stack:
one forward serves every member, each member's loss is selected from the stack's losses with
``torch.where`` (an unselected loss passes back an exact zero, never its NaNs), and each
optimizer's members are a contiguous slice of the stacked parameters, updated by their own kernels.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from . import stacked_optim
from ..config import TrainConfig
from ..experiment import Data, Experiment
from ..errors import shown
from ..loop import History, Observer, own_values, record_epochs, same_names, sample_mean
from ..registry import build_loss, build_optimizer
from ..training import RNG_LOCK, TrainResult, batches, build_model, evaluate_batches, with_validation

# What changes a model's parameters' shapes is a hyperparameter the model is built with; the rest
# of a config (lr, epochs, weight_decay, momentum) is the member's own.
OWN = ("lr", "epochs", "weight_decay", "momentum")
MIN_STACK = 4  # members below which a search trains them one at a time (see Objective._stacks)


def stack_key(cfg: TrainConfig) -> tuple:
    """Configurations with equal keys can be trained as one stack."""
    return (cfg.experiment, cfg.batch_size, cfg.seed, cfg.device, cfg.valid_fraction,
            tuple(sorted((k, repr(v)) for k, v in cfg.hparams.items() if k not in OWN)))


def recipe_refusal(cfg: TrainConfig, experiment: Experiment) -> str | None:
    """Why ``cfg``'s training recipe cannot be stacked (one line), or None: a stack steps torch's
    plain optimizers with their default settings, and nothing else."""
    if cfg.optimizer in experiment.own_optimizers or cfg.loss in experiment.own_losses:
        return "an experiment's own optimizer or loss is not stacked"
    if experiment.step is not None:
        return "an experiment's own step is not stacked"
    if cfg.settings:
        return f"settings {', '.join(sorted(cfg.settings))} are not stacked"
    if cfg.scheduler != "none" or cfg.grad_clip_norm is not None or cfg.grad_clip_value is not None \
            or cfg.patience is not None:
        return "a learning-rate schedule, gradient clipping or early stopping is not stacked"
    return None


def _update_key(cfg: TrainConfig) -> tuple:
    """Members with equal keys are updated by one set of stacked optimizer kernels."""
    return (cfg.optimizer, cfg.weight_decay, cfg.momentum)


def refusal(cfg: TrainConfig, experiment: Experiment, data: Data) -> str | None:
    """Why ``cfg``'s model cannot be stacked (one line), or None."""
    recipe = recipe_refusal(cfg, experiment)
    if recipe:
        return recipe
    if not isinstance(data, Data):
        return f"experiment {experiment.name!r} gives datasets, not tensors: its batches cannot be shared"
    model = build_model(cfg, experiment)
    if any(True for _ in model.buffers()):
        return f"the model of experiment {experiment.name!r} has buffers (batch norm, say), which a stack does not carry"
    X, y = data.X_train[:64].to(cfg.device), data.y_train[:64].to(cfg.device)
    state = torch.random.get_rng_state()
    model.train()
    with torch.no_grad():
        model(X)
    if not torch.equal(state, torch.random.get_rng_state()):
        return (f"the model of experiment {experiment.name!r} draws random numbers while it trains (dropout, say): "
                "stacked, it would draw them in another order than trained alone")
    # Matrix products over a stack sum in another order than one model's (measured: 3e-8 apart at
    # the first forward, and Adam makes that grow to whole percents in 100 epochs): the stack is
    # used only where one step gives every member exactly what it gives alone.
    loss_fn = build_loss(cfg.loss)
    params = [torch.stack([p.detach(), p.detach()]).requires_grad_() for p in model.parameters()]
    losses, preds = _StackedLoss(model, [loss_fn])(params, _select([cfg, cfg], [cfg.loss], X.device), X, y)
    losses.sum().backward()
    pred = model(X)
    loss = loss_fn(pred, y)
    loss.backward()
    if not (torch.equal(preds[0], pred) and torch.equal(losses[0], loss)
            and all(torch.equal(stacked.grad[0], p.grad) for stacked, p in zip(params, model.parameters()))):
        return (f"stacked, the model of experiment {experiment.name!r} would not give the last bits it gives alone "
                "(a stack sums its matrix products in another order)")
    return None


class _StackedLoss:
    """``(params, select, X, y) -> (losses, predictions)`` for a stack: ``params`` are a model's
    parameters (in ``parameters()`` order), each stacked along a first dimension, one row per member;
    ``select[i, k]`` says whether member i's loss is ``loss_fns[k]``."""

    def __init__(self, model: nn.Module, loss_fns: list):
        from torch.func import functional_call, vmap

        self.module = copy.deepcopy(model).to("meta")  # the module code, without weights; its mode is the stack's
        self.names = [name for name, _ in self.module.named_parameters()]

        def member_loss(X, y, select, *params):
            pred = functional_call(self.module, dict(zip(self.names, params)), (X,))
            if len(loss_fns) == 1:
                return loss_fns[0](pred, y), pred
            loss = None
            for k, fn in enumerate(loss_fns):
                # Every loss sees the prediction, but only the member's own passes a gradient back:
                # the others get a detached copy, so their backward (0 x inf is NaN) never reaches it.
                value = fn(torch.where(select[k], pred, pred.detach()), y)
                loss = value if loss is None else torch.where(select[k], value, loss)
            return loss, pred

        # Parameters as positional tensors, not a dict: a quarter less of vmap's own per-call cost.
        self._vmapped = vmap(member_loss, in_dims=(None, None, 0) + (0,) * len(self.names))

    def __call__(self, params, select, X, y):
        return self._vmapped(X, y, select, *params)


def _select(cfgs: Sequence[TrainConfig], losses: list[str], device) -> torch.Tensor:
    return torch.tensor([[cfg.loss == name for name in losses] for cfg in cfgs], device=device)


@dataclass
class _Member:
    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    observers: list[Observer]
    history: History
    active: bool = True

    def __post_init__(self):
        self.params = list(self.model.parameters())  # in named_parameters' order, as the stack takes them
        self.unrecorded: list[dict[str, float]] = []  # epochs read from the device, not yet recorded


def train_stack(cfgs: Sequence[TrainConfig], experiment: Experiment, data: Data,
                observers: Sequence[Iterable[Observer]] | None = None,
                histories: Sequence[History] | None = None, sync_every: int | None = None) -> list[TrainResult]:
    """Train ``cfgs`` (equal ``stack_key``) as one stack; one TrainResult per config, in order.
    ``observers[i]`` watch member i, ``histories[i]`` keeps what member i recorded if training is
    interrupted. ``sync_every``: as ``loop.fit`` takes it (default: every epoch on the CPU, else
    each member's last epoch); per-epoch values stay on the device between syncs, and a member is
    recorded, checked and stopped at the epochs training it alone would, so it stays its own."""
    if len({stack_key(c) for c in cfgs}) != 1:
        raise ValueError(f"configs that cannot share a stack: {sorted({stack_key(c) for c in cfgs})}")
    cfg0 = cfgs[0]
    refused = next((r for r in map(lambda c: recipe_refusal(c, experiment), cfgs) if r), None)
    if refused:
        raise ValueError(refused)
    data = with_validation(data, cfg0).to(cfg0.device)
    device = torch.device(cfg0.device)
    epochs = max(c.epochs for c in cfgs)
    sync_every = sync_every or (1 if device.type == "cpu" else epochs)
    metrics_fn = experiment.metrics
    with RNG_LOCK:
        members = []
        for i, cfg in enumerate(cfgs):
            model = build_model(cfg, experiment)  # its own seed, as alone
            members.append(_Member(cfg, model, build_optimizer(cfg.optimizer, model.parameters(), cfg.lr,
                                                               cfg.weight_decay, cfg.momentum),
                                   list(observers[i]) if observers else [],
                                   histories[i] if histories else History()))
        # One optimizer's members side by side: each optimizer updates a contiguous slice.
        active = sorted(members, key=lambda m: _update_key(m.cfg))
        losses = sorted({c.loss for c in cfgs})
        select = _select([m.cfg for m in active], losses, device)
        stacked_loss = _StackedLoss(members[0].model, [build_loss(name) for name in losses])
        train_batches, test_batches, valid_batches = batches(data, cfg0)  # the same for every member: one seed
        stepper = _stepper(active)
        pending: list[tuple[list[_Member], dict[str, torch.Tensor]]] = []  # per epoch: its members, their values
        names = None
        for epoch in range(epochs):
            stacked_loss.module.train()
            train = _epoch(stepper, active, select, stacked_loss, train_batches, metrics_fn, step=True)
            stacked_loss.module.eval()
            values = {f"train_{k}": v for k, v in train.items()}
            with torch.inference_mode():
                for split, batches_ in (("valid", valid_batches), ("test", test_batches)):
                    if batches_ is not None:
                        evaluated = _epoch(stepper, active, select, stacked_loss, batches_, metrics_fn, step=False)
                        values.update({f"{split}_{k}": v for k, v in evaluated.items()})
            names = same_names(names, values, epoch)
            pending.append((list(active), values))
            # A member syncs where fit alone would: every sync_every epochs from 0, and at its last.
            due = [m for m in active if (epoch + 1) % sync_every == 0 or epoch + 1 >= m.cfg.epochs]
            if not due:
                continue
            _read(pending)
            pending = []
            for m in due:
                _record(m)
            if any(not m.active for m in active):
                rows = [i for i, m in enumerate(active) if m.active]
                stepper.keep(rows, active)
                select = select[rows]
                active = [m for m in active if m.active]
            if not active:
                break
        stepper.keep([], active)  # every member's weights back in its own model
        results = []
        for m in members:
            _, predictions = evaluate_batches(m.model, test_batches, build_loss(m.cfg.loss), device,
                                              keep_predictions=True)
            results.append(TrainResult(m.cfg, m.model, data, m.history, predictions.cpu(),
                                       experiment.final_values(m.model)))
    return results


def _read(pending: list[tuple[list[_Member], dict[str, torch.Tensor]]]) -> None:
    """Every pending epoch's values to the host in one copy, each row to its member."""
    names = list(pending[0][1])
    host = torch.cat([torch.stack([values[name] for name in names]) for _, values in pending], dim=1).tolist()
    offset = 0
    for epoch_members, _ in pending:
        for j, m in enumerate(epoch_members):
            m.unrecorded.append({name: host[k][offset + j] for k, name in enumerate(names)})
        offset += len(epoch_members)


class _EachOptimizer:
    """Each member's own torch optimizer, stepped one after the other: exact anywhere."""

    def __init__(self, members: list[_Member]):
        self.members = members

    def params(self) -> list[torch.Tensor]:
        return [torch.stack(rows) for rows in zip(*(m.params for m in self.members))]

    def zero_grad(self) -> None:
        for m in self.members:
            m.optimizer.zero_grad()

    def step(self) -> None:
        for m in self.members:
            m.optimizer.step()

    def keep(self, rows: list[int], members: list[_Member]) -> None:
        self.members = [members[r] for r in rows]


def _slices(members: list[_Member]) -> list[tuple[int, int]]:
    """(start, end) of each run of members with one update key (members sorted by it)."""
    bounds = [0] + [i for i in range(1, len(members))
                    if _update_key(members[i].cfg) != _update_key(members[i - 1].cfg)] + [len(members)]
    return list(zip(bounds[:-1], bounds[1:]))


class _StackedParams:
    """The stack's parameters as one tensor per name; each optimizer's members, a contiguous slice,
    are updated by stacked_optim (one set of kernels for them all); a member that stops gets its
    row back into its own model."""

    def __init__(self, members: list[_Member]):
        self.leaves = [torch.stack([p.detach() for p in rows]).requires_grad_()
                       for rows in zip(*(m.params for m in members))]
        self.groups = []  # [start, end, StackedOptimizer], in row order
        for start, end in _slices(members):
            cfg = members[start].cfg
            optimizer = stacked_optim.StackedOptimizer(cfg.optimizer, self._rows(start, end),
                                                       [m.cfg.lr for m in members[start:end]],
                                                       cfg.weight_decay, cfg.momentum)
            self.groups.append((start, end, optimizer))

    def _rows(self, start: int, end: int) -> list[torch.Tensor]:
        return [leaf.detach()[start:end] for leaf in self.leaves]  # views: updates land in the leaves

    def params(self) -> list[torch.Tensor]:
        return self.leaves

    def zero_grad(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def step(self) -> None:
        for start, end, optimizer in self.groups:
            optimizer.step([leaf.grad[start:end] for leaf in self.leaves])

    @torch.no_grad()
    def keep(self, rows: list[int], members: list[_Member]) -> None:
        kept = set(rows)
        for i, m in enumerate(members):
            if i not in kept:  # it stopped: its weights are final
                for own, leaf in zip(m.params, self.leaves):
                    own.copy_(leaf[i])
        index = torch.tensor(rows, dtype=torch.long, device=self.leaves[0].device)
        self.leaves = [leaf.detach().index_select(0, index).requires_grad_() for leaf in self.leaves]
        groups, position = [], 0
        for start, end, optimizer in self.groups:
            inside = [r - start for r in rows if start <= r < end]
            if inside:
                optimizer.keep(inside, self._rows(position, position + len(inside)))
                groups.append((position, position + len(inside), optimizer))
                position += len(inside)
        self.groups = groups


# (optimizer, shapes, weight decay, momentum, device, lr) -> stacked_optim.agrees: every learning
# rate a stack steps with is checked, once, since the last bits of an update depend on it.
_AGREES: dict[tuple, bool] = {}


def _stepper(members: list[_Member]):
    """Stacked updates where they give each member exactly its own optimizer's step on this
    machine (checked once per kind of update and learning rate), else each member's torch optimizer."""
    shapes = [p.shape for p in members[0].params]
    for start, end in _slices(members):
        cfg = members[start].cfg
        if cfg.optimizer not in stacked_optim.KINDS:
            return _EachOptimizer(members)
        kind = (cfg.optimizer, tuple(shapes), cfg.weight_decay, cfg.momentum, cfg.device)
        lrs = sorted({m.cfg.lr for m in members[start:end]})
        unknown = [lr for lr in lrs if (*kind, lr) not in _AGREES]
        if unknown:
            together = stacked_optim.agrees(cfg.optimizer, shapes, unknown, cfg.weight_decay, cfg.momentum, cfg.device)
            for lr in unknown:  # one that disagrees: found alone, so the others stay usable
                _AGREES[(*kind, lr)] = together or stacked_optim.agrees(cfg.optimizer, shapes, [lr],
                                                                        cfg.weight_decay, cfg.momentum, cfg.device)
        if not all(_AGREES[(*kind, lr)] for lr in lrs):
            return _EachOptimizer(members)
    return _StackedParams(members)


def _epoch(stepper, active: list[_Member], select: torch.Tensor, stacked_loss, batches_, metrics_fn,
           step: bool) -> dict[str, torch.Tensor]:
    """One pass over ``batches_`` for the active members: per name (loss, metrics), each member's
    sample-weighted mean before each step, as a float32 tensor with one value per member, where
    the values were made (the float32 that training alone keeps)."""
    sizes = []
    per_batch = []
    for X, y in batches_:
        losses, preds = stacked_loss(stepper.params(), select, X, y)
        if step:
            stepper.zero_grad()
            losses.sum().backward()
            stepper.step()
        per_batch.append((losses.detach(), preds.detach(), y))
        sizes.append(len(X))
    if len(per_batch) == 1:  # full batch: each value untouched, as training alone reports it
        losses, preds, y = per_batch[0]
        values = {"loss": losses.float()}
        if metrics_fn is not None:
            rows = _alike([own_values(metrics_fn(preds[i], y)) for i in range(len(active))])
            values.update({k: torch.stack([row[k].float() for row in rows]) for k in rows[0]})
        return values
    per_batch = [_alike([{"loss": losses[i], **(own_values(metrics_fn(preds[i], y)) if metrics_fn is not None else {})}
                         for i in range(len(active))]) for losses, preds, y in per_batch]
    _alike([batch[0] for batch in per_batch])
    return {k: torch.stack([sample_mean([batch[i][k] for batch in per_batch], sizes).float()
                            for i in range(len(active))]) for k in per_batch[0][0]}


def _alike(rows: list[dict]) -> list[dict]:
    """Values of members or batches, which one stacked value per name holds: the same names in each."""
    odd = next((row for row in rows if row.keys() != rows[0].keys()), None)
    if odd is not None:
        raise TypeError(f"the experiment's values must have the same names every epoch, for every batch; one gave "
                        f"{shown(odd)} beside {shown(rows[0])}")
    return rows


def _record(m: _Member) -> None:
    """The member's epochs read so far, into its history as training alone records them (a
    non-finite loss or an observer ends the member); its own last epoch ends it too."""
    start = m.history.epochs_run
    rows, m.unrecorded = m.unrecorded, []
    if not record_epochs(rows, start, m.history, m.observers) or start + len(rows) >= m.cfg.epochs:
        m.active = False
