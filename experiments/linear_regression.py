"""The PyTorch workflow reference: learn y = 0.7 x + 0.3 with a two-parameter linear model."""
import torch
from torch import nn

from harness.experiment import Data, Experiment

WEIGHT, BIAS = 0.7, 0.3


class LinearRegressionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1, dtype=torch.float), requires_grad=True)
        self.bias = nn.Parameter(torch.randn(1, dtype=torch.float), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights * x + self.bias


def make_data() -> Data:
    X = torch.arange(0, 1, 0.02).unsqueeze(dim=1)
    y = WEIGHT * X + BIAS
    split = int(0.8 * len(X))
    return Data(X[:split], y[:split], X[split:], y[split:])


def scalars(model: LinearRegressionModel) -> dict[str, float]:
    return {"weight": model.weights.item(), "bias": model.bias.item()}


def plot_predictions(ax, data: Data, predictions: torch.Tensor) -> None:
    """The reference's plot_predictions: training data, test data and the model's test predictions."""
    ax.scatter(data.X_train.cpu(), data.y_train.cpu(), c="b", s=4, label="Training data")
    ax.scatter(data.X_test.cpu(), data.y_test.cpu(), c="g", s=4, label="Testing data")
    ax.scatter(data.X_test.cpu(), predictions.cpu(), c="r", s=4, label="Predictions")
    ax.legend(prop={"size": 14})


EXPERIMENT = Experiment(
    name="linear_regression",
    description=__doc__,
    make_data=make_data,
    make_model=LinearRegressionModel,
    defaults={"optimizer": "sgd", "loss": "l1", "lr": 0.01, "epochs": 200},
    optimizers=("sgd", "adam", "adamw", "rmsprop"),
    losses=("l1", "mse", "smooth_l1", "huber"),
    scalars=scalars,
    truth={"weight": WEIGHT, "bias": BIAS},  # the run logs weight_error and bias_error
    plot_predictions=plot_predictions,
    search_space={
        "lr": [1e-4, 1e-1],
        "epochs": [50, 400],
        "pairs": ["sgd+l1", "sgd+mse", "adam+l1", "adam+mse", "adamw+smooth_l1", "rmsprop+huber"],
    },
)
