"""The training loop: plain functions, no tracking, no search.

Nothing here imports mlflow or optuna. Whoever wants to watch a run (tracking, pruning, a progress
bar) passes observers; an observer may end training early by raising ``StopTraining``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from .errors import shown
from .schema import LEARNING_RATE, TEST_LOSS, TRAIN_LOSS, VALID_LOSS

MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class StopTraining(Exception):
    """Raised by an observer to end training after the epoch it was told about."""


class EarlyStop(StopTraining):
    """StopTraining by the run's own recipe (early stopping), not from outside (a pruner)."""


class Preempted(Exception):
    """Raised by ``fit`` where its ``stop_requested`` said so, at a batch boundary: ``partial`` says
    where (nothing of the batch after it has run)."""

    def __init__(self, partial: "Partial"):
        super().__init__(f"stopped at epoch {partial.epoch}, batch {partial.batches_done}")
        self.partial = partial


class NotKept(Exception):
    """A continued epoch's kept values (a checkpoint's, of the batches done) are not of the kind its
    batches give: they could not be averaged with them."""


@dataclass
class Partial:
    """An epoch cut at a batch boundary: the batches of it trained, each one's values (the loss, the
    metrics) and size, and the learning rate of its first step (None unscheduled). ``batches_done``
    0 is the boundary before the epoch: the end of the one before."""

    epoch: int
    batches_done: int = 0
    values: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    lr: float | None = None


class Observer(Protocol):
    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None: ...


@dataclass
class History:
    """Per-epoch values, index = epoch. ``stopped`` says why training ended early, if it did."""

    values: dict[str, list[float]] = field(default_factory=dict)
    stopped: str | None = None  # stopped from outside (a pruner)
    diverged_at: int | None = None
    early_stop: str | None = None  # ended by early stopping: why
    best_epoch: int | None = None  # with early stopping: the epoch whose weights the model keeps

    @property
    def epochs_run(self) -> int:
        return len(self.values.get(TRAIN_LOSS, []))

    def last(self, key: str) -> float:
        """The run's final value of ``key``: its last epoch's, or with early stopping its best epoch's."""
        return self.values[key][-1 if self.best_epoch is None else self.best_epoch]


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

# An experiment's own step: ``step(model, batch, loss_fn) -> loss`` or ``(loss, {name: value})``,
# where the batch is whatever the batches yield (a tuple or a dict of inputs and targets) and each
# value is the batch's mean of something (a one-element tensor or a number). The step computes the
# loss; the loop does everything after it (``update``), so clipping and schedules apply as usual.
StepFn = Callable[[nn.Module, Any, nn.Module], Any]


@dataclass(frozen=True)
class Recipe:
    """What a step does besides forward, backward and the optimizer's update, in this order:
    gradient clipping (by total norm, then by value), then the update, then a per-batch schedule."""

    clip_norm: float | None = None
    clip_value: float | None = None
    batch_scheduler: Any = None  # stepped after every update (OneCycleLR)

    @property
    def plain(self) -> bool:
        return self.clip_norm is None and self.clip_value is None and self.batch_scheduler is None


PLAIN = Recipe()


def train_step(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, recipe: Recipe = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch (the model in training mode). Returns the loss and predictions
    from *before* the update."""
    pred = model(X)
    loss = loss_fn(pred, y)
    update(model, loss, optimizer, recipe)
    return loss.detach(), pred.detach()


def update(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer, recipe: Recipe = PLAIN) -> None:
    """What follows the forward pass, in this order whoever computed the loss: zero the gradients,
    backward, clipping, the optimizer's update, a per-batch schedule."""
    optimizer.zero_grad()
    loss.backward()
    if recipe is not PLAIN:
        if recipe.clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
        if recipe.clip_value is not None:
            nn.utils.clip_grad_value_(model.parameters(), recipe.clip_value)
    optimizer.step()
    if recipe.batch_scheduler is not None:
        recipe.batch_scheduler.step()


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
             loss_fn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.inference_mode():
        pred = model(X)
        return loss_fn(pred, y), pred


def train_epoch(model: nn.Module, batches: Batches, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device, metrics_fn: MetricsFn | None = None,
                recipe: Recipe = PLAIN, step: StepFn | None = None, stop_requested: Callable[[], bool] | None = None,
                partial: Partial | None = None) -> dict[str, torch.Tensor]:
    """One pass over the training batches: the loss (and metrics, or the values of the experiment's
    own ``step``) of each batch before its update, averaged over the epoch's samples, on the device.
    ``stop_requested`` is asked before each batch after the first: True raises Preempted there.
    ``partial``: the batches of this epoch trained already (``batches`` then yields the rest)."""
    model.train()
    if step is None:
        run = _plain(lambda X, y: train_step(model, X, y, loss_fn, optimizer, recipe), metrics_fn)
    else:
        def run(batch):
            loss, values = step_output(step(model, batch, loss_fn))
            update(model, loss, optimizer, recipe)
            return loss.detach(), {name: value.detach() for name, value in values.items()}, None
    means, _ = _over_batches(batches, device, run, stop_requested=stop_requested, partial=partial)
    return means


def evaluate_batches(model: nn.Module, batches: Batches, loss_fn: nn.Module, device: torch.device,
                     metrics_fn: MetricsFn | None = None, keep_predictions: bool = False, step: StepFn | None = None):
    """The loss (and metrics, or an own ``step``'s values, called in eval mode without gradients)
    over every test batch, averaged over samples; and the predictions, concatenated, when asked for
    (an own step gives none)."""
    if step is None:
        run = _plain(lambda X, y: evaluate(model, X, y, loss_fn), metrics_fn)
    else:
        model.eval()

        def run(batch):
            with torch.inference_mode():
                return (*step_output(step(model, batch, loss_fn)), None)
    return _over_batches(batches, device, run, keep_predictions)


def own_values(values: dict) -> dict:
    """The experiment's own values of a batch (its metrics), refused if one is named 'loss': the
    run's own loss has that name, and one would silently replace the other."""
    if "loss" in values:
        raise TypeError("the experiment's metrics gave a value named 'loss', the name of the run's own loss; "
                        "name it otherwise")
    return values


def _plain(step, metrics_fn: MetricsFn | None):
    """``run(batch)`` for batches of (inputs, targets): ``step(X, y) -> (loss, predictions)``, and
    the metrics of the predictions."""
    def run(batch):
        X, y = batch
        loss, pred = step(X, y)
        return loss, ({} if metrics_fn is None else metrics_fn(pred, y)), pred
    return run


def _over_batches(batches: Batches, device: torch.device, run, keep_predictions: bool = False,
                  stop_requested: Callable[[], bool] | None = None, partial: Partial | None = None):
    """``run(batch) -> (loss, {name: value}, predictions)`` on every batch; sample-weighted means of
    the loss and the values (the same names every batch), and the predictions concatenated when
    asked for. ``stop_requested`` and ``partial``: see ``train_epoch``."""
    values: dict[str, list[torch.Tensor]] = {"loss": []}
    names = None  # the first batch's: every batch gives the same
    sizes: list[int] = []
    first_kept = None  # the first kept batch's values, until the first new batch is compared with them
    if partial is not None:
        count = len(batches) if hasattr(batches, "__len__") else None
        for name, kept in partial.values.items():
            if overflowing(torch.stack(kept), partial.sizes, count):
                raise NotKept(f"its per-batch values {name[:40]!r} are too large for an epoch of {count or 'its'} "
                              "batches: their mean could overflow float32")
        values = {name: [v.to(device) for v in kept] for name, kept in partial.values.items()}
        names, sizes = set(values) - {"loss"}, list(partial.sizes)
        first_kept = {name: v[0] for name, v in values.items() if v}
    predictions = []
    move = device.type != "cpu"  # batches on the CPU already are where a CPU model wants them
    iterator = iter(batches)
    total = len(batches) if stop_requested is not None and hasattr(batches, "__len__") else None
    while True:
        # Asked before the next batch is drawn (a checkpoint here holds every generator as the batch
        # after it will find them), between two batches: after the last one the epoch's end comes.
        if stop_requested is not None and sizes and (total is None or len(sizes) < total) and stop_requested():
            raise Preempted(Partial(-1, len(sizes), values, sizes))
        batch = next(iterator, _END)
        if batch is _END:
            break
        if move:
            batch = to_device(batch, device)
        loss, extra, pred = run(batch)
        if names is None:
            names = set(own_values(extra))
        elif extra.keys() != names:
            raise TypeError(f"the step must return the same values for every batch; it returned "
                            f"{shown(sorted(extra))} after {shown(sorted(names))}")
        if first_kept is not None:
            _like_kept(first_kept, {"loss": loss, **extra})
            first_kept = None
        values["loss"].append(loss)
        for name, value in extra.items():
            values.setdefault(name, []).append(value)
        sizes.append(batch_length(batch))
        if keep_predictions:
            predictions.append(pred)
    means = {name: sample_mean(v, sizes) for name, v in values.items()}
    if not keep_predictions:
        return means, None
    return means, predictions[0] if len(predictions) == 1 else torch.cat(predictions)


_END = object()


def _like_kept(kept: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> None:
    """NotKept where a kept value is not what this run's batches give (its shape, dtype, device): the
    epoch's mean stacks them together."""
    for name, value in fresh.items():
        old = kept.get(name)
        if old is not None and (old.shape, old.dtype, old.device) != (value.shape, value.dtype, value.device):
            raise NotKept(f"its per-batch values {name[:40]!r} are {old.dtype} of shape {list(old.shape)}, this run's "
                          f"batches give {value.dtype} of shape {list(value.shape)}")


def overflowing(kept: torch.Tensor, sizes, batches: int | None = None) -> bool:
    """Whether a continued epoch's kept per-batch values (with their batch sizes) could make its mean
    (``sample_mean``) overflow float32, in whatever order the sum adds its terms, with the epoch's
    other batches no larger. Exactly: true where some |value * size|, times the epoch's batch count,
    is past half float32's max (the half covers float32's rounding over up to 10^7 additions), or is
    not finite. ``batches`` unknown: the fewest an epoch continued after the kept ones has."""
    terms = kept.detach().reshape(-1).double().abs() * torch.as_tensor(sizes, dtype=torch.float64)
    count = batches if batches is not None else len(terms) + 1
    return not bool(terms.max() * (2 * count) <= _FLOAT32_MAX)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def sample_mean(values: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Per-batch means weighted by batch size: sum(value_b * n_b) / sum(n_b). One batch: its value
    untouched, so full-batch training gives exactly the reference's numbers."""
    if len(values) == 1:
        return values[0]
    stacked = torch.stack(values).float()
    weights = torch.tensor(sizes, dtype=stacked.dtype, device=stacked.device)
    return (stacked * weights).sum() / weights.sum()




def step_output(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A step's return value, checked: (one-element loss, {identifier: one-element tensor})."""
    loss, values = (out, {}) if isinstance(out, torch.Tensor) else out if isinstance(out, tuple) and len(out) == 2 \
        else (None, None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not isinstance(values, dict):
        raise TypeError("the experiment's step must return a one-element loss tensor or (loss, {name: value}); it "
                        f"returned {_described(out)}")
    checked = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name.isidentifier() or name == "loss":
            raise TypeError(f"the experiment's step returned a value named {name!r}; names must be identifiers "
                            "other than 'loss'")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value), device=loss.device)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"the experiment's step returned {name!r} as {_described(value)}; each value must be a "
                            "number or a one-element tensor")
        checked[name] = value.reshape(())
    return loss.reshape(()), checked


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value[:4])})"
    return f"a {type(value).__name__}"


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch with every tensor in it moved to ``device``."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A batch of the same structure (tuples, namedtuples, lists, dicts, at any depth) with ``fn``
    applied to every tensor in it."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {key: map_tensors(value, fn) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(value, fn) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(value, fn) for value in batch)
    return batch


def batch_length(batch: Any) -> int:
    """How many samples a batch holds: the length of its first tensor (1 when it holds none), which
    weighs the batch's means in its epoch's."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        if isinstance(item, (torch.Tensor, dict, list, tuple)):
            return batch_length(item)
    return 1


def fit(model: nn.Module, train_batches: Batches, test_batches: Batches, loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer, epochs: int, *, metrics_fn: MetricsFn | None = None,
        observers: Iterable[Observer] = (), sync_every: int | None = None,
        history: History | None = None, valid_batches: Batches | None = None, recipe: Recipe = PLAIN,
        scheduler=None, monitor: str | None = None, step: StepFn | None = None,
        eval_step: StepFn | None = None, start_epoch: int = 0,
        stop_requested: Callable[[], bool] | None = None, partial: Partial | None = None) -> History:
    """Train for ``epochs`` epochs and return the history (from ``start_epoch`` on, where a run is
    continued: ``history`` holds the epochs before it).

    ``train_batches``, ``valid_batches`` and ``test_batches`` are iterated once per epoch: a list
    holding one (inputs, targets) pair is full-batch training, a DataLoader is mini-batch training.
    Each epoch records train_*, then valid_* (when there are validation batches), then test_*.
    ``recipe``: clipping and a per-batch schedule; ``scheduler``: stepped after each epoch (a
    ReduceLROnPlateau with the epoch's ``monitor`` value); with either schedule, each epoch also
    records ``learning_rate``, the rate of its first step. ``step`` (and ``eval_step``, which defaults
    to it) replaces the forward pass and loss of every batch: see ``StepFn``.
    Observers and the divergence check see the epochs every ``sync_every`` epochs (default: every
    epoch on the CPU, where reading a value is free; once at the end elsewhere, where per-epoch
    values stay on the device until then, so an accelerator is never made to wait).
    A non-finite loss ends training: the history keeps the epochs before it and ``diverged_at``
    names the epoch. Pass ``history`` to keep what was recorded when training is interrupted.
    ``stop_requested`` is asked at every batch boundary (before each epoch, between its training
    batches); True raises Preempted with the state of the epoch there (every epoch before it
    recorded: give it with ``sync_every`` 1). ``partial``: the epoch ``start_epoch`` is continued
    from that boundary (``train_batches`` then yields that epoch's remaining batches first).
    """
    device = next(model.parameters()).device
    on_host = device.type == "cpu"
    if sync_every is None:
        sync_every = 1 if on_host else epochs
    observers = list(observers)
    history = history if history is not None else History()
    run_epoch = _epoch_runner(model, train_batches, test_batches, loss_fn, optimizer, device, metrics_fn,
                              valid_batches, recipe, step, eval_step, stop_requested)
    pending = _HostValues() if on_host else _DeviceValues(epochs, device)
    scheduled = scheduler is not None or recipe.batch_scheduler is not None
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    start = start_epoch
    names = list(history.values) or None  # a continued history's curves go on under the same names
    for epoch in range(start_epoch, epochs):
        if stop_requested is not None and partial is None and start == epoch and stop_requested():
            raise Preempted(Partial(epoch))
        lr = optimizer.param_groups[0]["lr"] if scheduled else None
        if partial is not None:
            lr = partial.lr
        try:
            values = run_epoch(partial)
        except Preempted as cut:
            cut.partial.epoch, cut.partial.lr = epoch, lr
            raise
        partial = None
        if scheduler is not None:
            scheduler.step(values[monitor]) if plateau else scheduler.step()
        if lr is not None:
            values[LEARNING_RATE] = lr
        names = same_names(names, values, epoch)
        pending.add(epoch, values)
        if epoch + 1 - start >= sync_every or epoch + 1 == epochs:
            if not record_epochs(pending.take(start, epoch + 1), start, history, observers):
                break
            start = epoch + 1
    return history


def same_names(names: list[str] | None, values: dict, epoch: int) -> list[str]:
    """The names of a run's curves, fixed by its first epoch: a curve that starts late has no value
    for the epochs before it, one that stops has none after, and either would be recorded as garbage
    or lost."""
    if names is not None and values.keys() != set(names):
        raise TypeError(f"the experiment's values must have the same names every epoch; epoch {epoch} gave "
                        f"{shown(values)} after {shown(names)}")
    return names if names is not None else list(values)


def _epoch_runner(model: nn.Module, train_batches: Batches, test_batches: Batches, loss_fn: nn.Module,
                  optimizer: torch.optim.Optimizer, device: torch.device,
                  metrics_fn: MetricsFn | None, valid_batches: Batches | None = None,
                  recipe: Recipe = PLAIN, step: StepFn | None = None,
                  eval_step: StepFn | None = None,
                  stop_requested: Callable[[], bool] | None = None) -> Callable[[Partial | None], dict[str, Any]]:
    """``run(partial) -> {name: value}`` for one epoch (continued from ``partial``, when given):
    train_loss, train_<metric>..., valid_..., test_loss, test_<metric>..."""
    train_only, test_only = _only_batch(train_batches), _only_batch(test_batches)
    if step is not None or train_only is None or test_only is None or valid_batches is not None:
        def run(partial: Partial | None = None) -> dict[str, torch.Tensor]:
            train = train_epoch(model, train_batches, loss_fn, optimizer, device, metrics_fn, recipe, step,
                                stop_requested, partial)
            out = {f"train_{k}": v for k, v in train.items()}
            for split, batches in (("valid", valid_batches), ("test", test_batches)):
                if batches is not None:
                    evaluated, _ = evaluate_batches(model, batches, loss_fn, device, metrics_fn,
                                                    step=eval_step or step)
                    out.update({f"{split}_{k}": v for k, v in evaluated.items()})
            return out
        return run

    # Full batch: the same steps as train_epoch and evaluate_batches on one batch, without their
    # per-batch bookkeeping (about a tenth of a tiny model's epoch).
    X, y = (t.to(device) for t in train_only)
    X_test, y_test = (t.to(device) for t in test_only)
    set_mode = _mode_setter(model)

    def run(partial: Partial | None = None) -> dict[str, torch.Tensor]:  # one batch: no boundary inside
        set_mode(True)
        loss, pred = train_step(model, X, y, loss_fn, optimizer, recipe)
        set_mode(False)
        with torch.inference_mode():
            test_pred = model(X_test)
            test_loss = loss_fn(test_pred, y_test)
        if metrics_fn is None:
            return {TRAIN_LOSS: loss, TEST_LOSS: test_loss}
        return {TRAIN_LOSS: loss, **{f"train_{k}": v for k, v in own_values(metrics_fn(pred, y)).items()},
                TEST_LOSS: test_loss, **{f"test_{k}": v for k, v in own_values(metrics_fn(test_pred, y_test)).items()}}
    return run


def _only_batch(batches: Batches) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The one (inputs, targets) pair of a full batch given as a list; None for anything else."""
    if isinstance(batches, (list, tuple)) and len(batches) == 1:
        return batches[0]
    return None


def _mode_setter(model: nn.Module) -> Callable[[bool], None]:
    """``set_mode(training)``, the same as ``model.train(training)``. When no module overrides
    train, eval or __setattr__, setting the flags directly is all those calls do, at a fraction of
    the cost (which on a small model is a few percent of an epoch)."""
    modules = list(model.modules())
    if any(type(m).train is not nn.Module.train or type(m).eval is not nn.Module.eval
           or type(m).__setattr__ is not nn.Module.__setattr__ for m in modules):
        return lambda training: model.train() if training else model.eval()

    def set_mode(training: bool) -> None:
        for module in modules:
            object.__setattr__(module, "training", training)
    return set_mode


class _HostValues:
    """On the CPU each value is read as soon as it is made (there is no device to wait for), as the
    float32 the device buffers would hold, so both kinds of history are the same."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def add(self, epoch: int, values: dict[str, Any]) -> None:
        self.rows.append({name: (value if value.dtype is torch.float32 else value.float()).item()
                          if isinstance(value, torch.Tensor) else value for name, value in values.items()})

    def take(self, start: int, stop: int) -> list[dict[str, float]]:
        rows, self.rows = self.rows, []
        return rows


class _DeviceValues:
    """Elsewhere values stay in buffers on the device until a sync copies a chunk of epochs."""

    def __init__(self, epochs: int, device: torch.device):
        self.epochs, self.device = epochs, device
        self.buffers: dict[str, torch.Tensor] = {}
        self.host: dict[str, list[float]] = {}  # values made on the host (the lr): kept exact

    def add(self, epoch: int, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                self.host.setdefault(name, []).append(value)
                continue
            buf = self.buffers.get(name)
            if buf is None:
                buf = self.buffers[name] = torch.empty(self.epochs, device=self.device, dtype=torch.float32)
            buf[epoch] = value

    def take(self, start: int, stop: int) -> list[dict[str, float]]:
        chunk = {name: buf[start:stop].tolist() for name, buf in self.buffers.items()}
        chunk.update({name: values[start:stop] for name, values in self.host.items()})
        return [{name: values[offset] for name, values in chunk.items()} for offset in range(stop - start)]


def record_epochs(rows: list[dict[str, float]], start: int, history: History, observers: list[Observer]) -> bool:
    """Record the epochs from ``start`` on and notify observers. False means stop training."""
    for epoch, logs in enumerate(rows, start):
        if not (math.isfinite(logs[TRAIN_LOSS]) and math.isfinite(logs[TEST_LOSS])
                and math.isfinite(logs.get(VALID_LOSS, 0.0))):
            history.diverged_at = epoch
            history.stopped = f"diverged at epoch {epoch}"
            return False
        for name, value in logs.items():
            history.values.setdefault(name, []).append(value)
        try:
            for observer in observers:
                observer.on_epoch_end(epoch, logs)
        except EarlyStop as stop_signal:
            history.early_stop = str(stop_signal)
            return False
        except StopTraining as stop_signal:
            history.stopped = str(stop_signal) or f"stopped at epoch {epoch}"
            return False
    return True


class EarlyStopping:
    """Loop observer: ends training when ``metric`` has not improved by more than ``min_delta`` for
    ``patience`` epochs, and keeps a copy of the weights of its best epoch, which ``restore`` puts
    back into the model (so a run keeps its best epoch, not its last)."""

    def __init__(self, model: nn.Module, history: History, metric: str, patience: int | None,
                 min_delta: float = 0.0, maximize: bool = False):
        self.model, self.history, self.metric = model, history, metric
        self.patience, self.min_delta, self.sign = patience, min_delta, -1.0 if maximize else 1.0
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        value = logs.get(self.metric)
        if value is None:
            raise KeyError(f"early stopping watches {self.metric!r}, which the run does not record; "
                           f"it records {', '.join(logs)}")
        if self.best is None or self.sign * (self.best - value) > self.min_delta:
            self.best, self.history.best_epoch = value, epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        elif self.patience is not None and epoch - self.history.best_epoch >= self.patience:
            raise EarlyStop(f"early stopping at epoch {epoch}: {self.metric} did not improve by more than "
                            f"{self.min_delta} for {self.patience} epochs; the run keeps epoch "
                            f"{self.history.best_epoch}")

    def restore(self) -> None:
        """The best epoch's weights back into the model (nothing to do when it was the last)."""
        if self.best_state is not None and self.history.best_epoch != self.history.epochs_run - 1:
            self.model.load_state_dict(self.best_state)
