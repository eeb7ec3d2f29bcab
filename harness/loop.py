"""The training loop: plain functions, no tracking, no search.

Nothing here imports mlflow or optuna. Whoever wants to watch a run (tracking, pruning, a progress
bar) passes observers; an observer may end training early by raising ``StopTraining``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from .schema import TEST_LOSS, TRAIN_LOSS

MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class StopTraining(Exception):
    """Raised by an observer to end training after the epoch it was told about."""


class Observer(Protocol):
    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None: ...


@dataclass
class History:
    """Per-epoch values, index = epoch. ``stopped`` says why training ended early, if it did."""

    values: dict[str, list[float]] = field(default_factory=dict)
    stopped: str | None = None
    diverged_at: int | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.values.get(TRAIN_LOSS, []))

    def last(self, key: str) -> float:
        return self.values[key][-1]


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def train_step(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch (the model in training mode). Returns the loss and predictions
    from *before* the update."""
    pred = model(X)
    loss = loss_fn(pred, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach(), pred.detach()


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
             loss_fn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.inference_mode():
        pred = model(X)
        return loss_fn(pred, y), pred


def train_epoch(model: nn.Module, batches: Batches, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device, metrics_fn: MetricsFn | None = None) -> dict[str, torch.Tensor]:
    """One pass over the training batches: the loss (and metrics) of each batch before its step,
    averaged over the epoch's samples, on the device."""
    model.train()
    means, _ = _over_batches(batches, device, lambda X, y: train_step(model, X, y, loss_fn, optimizer), metrics_fn)
    return means


def evaluate_batches(model: nn.Module, batches: Batches, loss_fn: nn.Module, device: torch.device,
                     metrics_fn: MetricsFn | None = None, keep_predictions: bool = False):
    """The loss (and metrics) over every test batch, averaged over samples; and the predictions,
    concatenated, when asked for."""
    return _over_batches(batches, device, lambda X, y: evaluate(model, X, y, loss_fn), metrics_fn, keep_predictions)


def _over_batches(batches: Batches, device: torch.device, step, metrics_fn: MetricsFn | None,
                  keep_predictions: bool = False):
    """``step(X, y) -> (loss, predictions)`` on every batch; sample-weighted means of the loss and
    metrics, and the predictions concatenated when asked for."""
    values: dict[str, list[torch.Tensor]] = {"loss": []}
    sizes: list[int] = []
    predictions = []
    move = device.type != "cpu"  # batches on the CPU already are where a CPU model wants them
    for X, y in batches:
        if move:
            X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, pred = step(X, y)
        values["loss"].append(loss)
        sizes.append(len(X))
        if metrics_fn is not None:
            for name, value in metrics_fn(pred, y).items():
                values.setdefault(name, []).append(value)
        if keep_predictions:
            predictions.append(pred)
    means = {name: sample_mean(v, sizes) for name, v in values.items()}
    if not keep_predictions:
        return means, None
    return means, predictions[0] if len(predictions) == 1 else torch.cat(predictions)


def sample_mean(values: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Per-batch means weighted by batch size: sum(value_b * n_b) / sum(n_b). One batch: its value
    untouched, so full-batch training gives exactly the reference's numbers."""
    if len(values) == 1:
        return values[0]
    stacked = torch.stack(values).float()
    weights = torch.tensor(sizes, dtype=stacked.dtype, device=stacked.device)
    return (stacked * weights).sum() / weights.sum()


def fit(model: nn.Module, train_batches: Batches, test_batches: Batches, loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer, epochs: int, *, metrics_fn: MetricsFn | None = None,
        observers: Iterable[Observer] = (), sync_every: int | None = None,
        history: History | None = None) -> History:
    """Train for ``epochs`` epochs and return the history.

    ``train_batches`` and ``test_batches`` are iterated once per epoch: a list holding one
    (inputs, targets) pair is full-batch training, a DataLoader is mini-batch training.
    Per-epoch values stay on the model's device and are copied to the host every ``sync_every``
    epochs (default: every epoch on the CPU, where the copy is free; once at the end elsewhere,
    so an accelerator is never made to wait). Observers and the divergence check run at each copy.
    A non-finite loss ends training: the history keeps the epochs before it and ``diverged_at``
    names the epoch. Pass ``history`` to keep what was recorded when training is interrupted.
    """
    device = next(model.parameters()).device
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else epochs
    observers = list(observers)
    buffers: dict[str, torch.Tensor] = {}
    history = history if history is not None else History()

    def record(name: str, value: torch.Tensor, epoch: int) -> None:
        buf = buffers.get(name)
        if buf is None:
            buf = buffers[name] = torch.empty(epochs, device=device, dtype=torch.float32)
        buf[epoch] = value

    start = 0
    for epoch in range(epochs):
        train = train_epoch(model, train_batches, loss_fn, optimizer, device, metrics_fn)
        test, _ = evaluate_batches(model, test_batches, loss_fn, device, metrics_fn)
        for prefix, values in (("train", train), ("test", test)):
            for name, value in values.items():
                record(f"{prefix}_{name}", value, epoch)
        if epoch + 1 - start >= sync_every or epoch + 1 == epochs:
            if not _sync(buffers, start, epoch + 1, history, observers):
                break
            start = epoch + 1
    return history


def _sync(buffers: dict[str, torch.Tensor], start: int, stop: int, history: History,
          observers: list[Observer]) -> bool:
    """Copy epochs [start, stop) to the host and notify observers. False means stop training."""
    chunk = {name: buf[start:stop].tolist() for name, buf in buffers.items()}
    for offset in range(stop - start):
        epoch = start + offset
        logs = {name: values[offset] for name, values in chunk.items()}
        if not (math.isfinite(logs[TRAIN_LOSS]) and math.isfinite(logs[TEST_LOSS])):
            history.diverged_at = epoch
            history.stopped = f"diverged at epoch {epoch}"
            return False
        for name, value in logs.items():
            history.values.setdefault(name, []).append(value)
        try:
            for observer in observers:
                observer.on_epoch_end(epoch, logs)
        except StopTraining as stop_signal:
            history.stopped = str(stop_signal) or f"stopped at epoch {epoch}"
            return False
    return True
