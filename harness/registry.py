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
}


def build_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](params, lr=lr)


def build_loss(name: str) -> nn.Module:
    return LOSSES[name]()
