"""One training run of an experiment from a resolved config: model, optimizer, loss, loop."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .config import TrainConfig
from .experiment import Data, Experiment
from .loop import History, Observer, evaluate, fit
from .registry import build_loss, build_optimizer

# torch's default generator is process-wide: seeding and drawing the initial weights must happen
# as one step, or two trials on two threads could interleave and get each other's weights.
_SEED_LOCK = threading.Lock()


@dataclass
class TrainResult:
    config: TrainConfig
    model: nn.Module
    data: Data
    history: History
    predictions: torch.Tensor  # test-set predictions of the final model, on the host
    scalars: dict[str, float]

    @property
    def diverged(self) -> bool:
        return self.history.diverged_at is not None

    def final_metrics(self) -> dict[str, float]:
        """The values a finished run reports; empty for a diverged one (its last loss is not finite)."""
        if self.diverged or not self.history.epochs_run:
            return {}
        finals = {f"final_{name}": values[-1] for name, values in self.history.values.items()}
        return {**finals, **self.scalars}


def build_model(cfg: TrainConfig, experiment: Experiment) -> nn.Module:
    with _SEED_LOCK:
        torch.manual_seed(cfg.seed)
        model = experiment.make_model()
    return model.to(cfg.device)


def train(cfg: TrainConfig, experiment: Experiment, data: Data | None = None,
          observers: Iterable[Observer] = (), sync_every: int | None = None,
          history: History | None = None) -> TrainResult:
    data = (data if data is not None else experiment.make_data()).to(cfg.device)
    model = build_model(cfg, experiment)
    loss_fn = build_loss(cfg.loss)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    history = fit(model, data, loss_fn, optimizer, cfg.epochs, metrics_fn=experiment.metrics,
                  observers=observers, sync_every=sync_every, history=history)
    _, predictions = evaluate(model, data.X_test, data.y_test, loss_fn)
    return TrainResult(cfg, model, data, history, predictions.cpu(), experiment.scalars(model))
