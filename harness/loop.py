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
        return len(self.values.get("train_loss", []))

    def last(self, key: str) -> float:
        return self.values[key][-1]


def train_step(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """One full-batch step. Returns the loss and predictions from *before* the update."""
    model.train()
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


def fit(model: nn.Module, data, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, epochs: int,
        *, metrics_fn: MetricsFn | None = None, observers: Iterable[Observer] = (),
        sync_every: int | None = None, history: History | None = None) -> History:
    """Train for ``epochs`` epochs and return the history.

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
        train_loss, train_pred = train_step(model, data.X_train, data.y_train, loss_fn, optimizer)
        test_loss, test_pred = evaluate(model, data.X_test, data.y_test, loss_fn)
        record("train_loss", train_loss, epoch)
        record("test_loss", test_loss, epoch)
        if metrics_fn is not None:
            for name, value in metrics_fn(train_pred, data.y_train).items():
                record(f"train_{name}", value, epoch)
            for name, value in metrics_fn(test_pred, data.y_test).items():
                record(f"test_{name}", value, epoch)
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
        if not (math.isfinite(logs["train_loss"]) and math.isfinite(logs["test_loss"])):
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
