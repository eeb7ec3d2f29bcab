"""Optimizers and losses by name, built from torch.optim and torch.nn."""
from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}

LOSSES: dict[str, type[nn.Module]] = {
    "l1": nn.L1Loss,
    "mse": nn.MSELoss,
    "smooth_l1": nn.SmoothL1Loss,
    "huber": nn.HuberLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "cross_entropy": nn.CrossEntropyLoss,
}

# Optimizers that take a momentum argument (harness.experiment.HARNESS_HYPERPARAMETERS says so too).
WITH_MOMENTUM = ("sgd", "rmsprop")


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.0) -> torch.optim.Optimizer:
    # Only arguments that differ from torch's defaults are passed: a config without them builds
    # exactly the optimizer the reference builds.
    kwargs = {}
    if weight_decay:
        kwargs["weight_decay"] = weight_decay
    if momentum:
        kwargs["momentum"] = momentum
    return OPTIMIZERS[name](params, lr=lr, **kwargs)


def build_loss(name: str) -> nn.Module:
    return LOSSES[name]()
