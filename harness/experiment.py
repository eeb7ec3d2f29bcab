"""What an experiment is, and how the harness finds one by name.

An experiment is data, not a branch in the harness: a module in the ``experiments`` package that
defines ``EXPERIMENT = Experiment(...)``. Adding one is adding that file.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import UsageError
from .loop import MetricsFn
from .registry import LOSSES, OPTIMIZERS


@dataclass(frozen=True)
class Data:
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: str) -> "Data":
        return Data(*(t.to(device) for t in (self.X_train, self.y_train, self.X_test, self.y_test)))


def _no_scalars(model: nn.Module) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class Experiment:
    name: str
    make_data: Callable[[], Data]
    # Called right after torch.manual_seed(seed), so initial weights follow from the seed.
    make_model: Callable[[], nn.Module]
    # Values for any TrainConfig field (optimizer, loss, lr, epochs); the harness fills the rest.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    losses: tuple[str, ...] = tuple(LOSSES)
    # Scalars read off the trained model and logged as final metrics (the reference: weight, bias).
    scalars: Callable[[nn.Module], dict[str, float]] = _no_scalars
    # Extra per-epoch metrics from (predictions, targets), logged as train_<name> and test_<name>.
    metrics: MetricsFn | None = None
    # Draws the data and the model's test predictions on a matplotlib Axes.
    plot_predictions: Callable[[Any, Data, torch.Tensor], None] | None = None
    # The default search space: see harness.search.space.
    search_space: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


PACKAGE = "experiments"


def names() -> list[str]:
    package = importlib.import_module(PACKAGE)
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and hasattr(importlib.import_module(f"{PACKAGE}.{info.name}"), "EXPERIMENT"):
            found.append(info.name)
    return sorted(found)


def load(name: str) -> Experiment:
    """An experiment by its name in ``experiments/``, or by a dotted module path of your own."""
    module_name = name if "." in name else f"{PACKAGE}.{name}"
    try:
        module = importlib.import_module(module_name)
        experiment = module.EXPERIMENT
    except (ImportError, AttributeError):
        raise UsageError(f"unknown experiment {name!r}; allowed: {', '.join(names())} "
                         "(or a module path defining EXPERIMENT)") from None
    if not isinstance(experiment, Experiment):
        raise UsageError(f"{module_name}.EXPERIMENT is a {type(experiment).__name__}, not a harness Experiment")
    return experiment
