"""Binary classification: two noisy concentric circles, a small MLP, BCE-with-logits loss.

The reference's own advice: a classification problem wants a binary cross-entropy loss.
"""
import math

import torch
from torch import nn

from harness.experiment import Data, Experiment

N_POINTS, NOISE, DATA_SEED = 1000, 0.08, 1234


def make_data() -> Data:
    # A generator of its own: the data stay the same whatever seed the model is built with.
    g = torch.Generator().manual_seed(DATA_SEED)
    labels = torch.arange(N_POINTS) % 2  # alternate: inner circle (1), outer circle (0)
    radius = torch.where(labels == 1, 0.5, 1.0) + NOISE * torch.randn(N_POINTS, generator=g)
    angle = 2 * math.pi * torch.rand(N_POINTS, generator=g)
    X = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    y = labels.float().unsqueeze(1)
    order = torch.randperm(N_POINTS, generator=g)
    X, y = X[order], y[order]
    split = int(0.8 * N_POINTS)
    return Data(X[:split], y[:split], X[split:], y[split:])


class CircleModel(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # logits


def metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": ((logits > 0).float() == y).float().mean()}


def plot_predictions(ax, data: Data, logits: torch.Tensor) -> None:
    X, predicted = data.X_test.cpu(), (logits.cpu() > 0).squeeze(1)
    for label, colour in ((0, "tab:blue"), (1, "tab:orange")):
        ax.scatter(*data.X_train.cpu()[data.y_train.cpu().squeeze(1) == label].T, c=colour, s=3, alpha=0.2)
        ax.scatter(*X[predicted == bool(label)].T, c=colour, s=14, edgecolors="k", label=f"predicted {label}")
    ax.set_aspect("equal")
    ax.legend()


EXPERIMENT = Experiment(
    name="binary_classification",
    description=__doc__,
    make_data=make_data,
    make_model=CircleModel,
    defaults={"optimizer": "adam", "loss": "bce_with_logits", "lr": 0.01, "epochs": 300},
    optimizers=("sgd", "adam", "adamw"),
    losses=("bce_with_logits",),
    metrics=metrics,
    plot_predictions=plot_predictions,
    search_space={
        "lr": [1e-3, 0.3],
        "epochs": [50, 500],
        "pairs": ["sgd+bce_with_logits", "adam+bce_with_logits", "adamw+bce_with_logits"],
    },
)
