"""pytorch/examples' MNIST recipe on scikit-learn's bundled 8x8 digits: two conv layers, dropout,
log_softmax + nll, Adadelta (lr 1.0) and StepLR (gamma 0.7, every epoch), mini-batches of 64.

The port changes the data and the first linear layer's width (8x8 images, not 28x28) and nothing
else of the recipe. The images ship inside scikit-learn: nothing is downloaded. Train, validation
and test parts come from one fixed permutation (60/20/20): a search selects on the validation part.
"""
import torch
import torch.nn.functional as F
from torch import nn

from harness.experiment import Data, Experiment, Hyperparameter

DATA_SEED = 1234


def make_data() -> Data:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    X = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    X = (X - X.mean()) / X.std()  # the recipe's Normalize, with this data's own mean and deviation
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(DATA_SEED))
    X, y = X[order], y[order]
    a, b = int(0.6 * len(X)), int(0.8 * len(X))
    return Data(X[:a], y[:a], X[b:], y[b:], X_valid=X[a:b], y_valid=y[a:b])


class Net(nn.Module):
    """pytorch/examples mnist/main.py's Net, for 8x8 inputs."""

    def __init__(self, dropout1: float = 0.25, dropout2: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(dropout1)
        self.dropout2 = nn.Dropout(dropout2)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def metrics(log_probs: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": (log_probs.argmax(dim=1) == y).float().mean()}


EXPERIMENT = Experiment(
    name="digits_cnn",
    description=__doc__,
    make_data=make_data,
    make_model=Net,
    hyperparameters=(
        Hyperparameter("dropout1", "float", 0.25, low=0.0, high=0.5, help="dropout after the convolutions"),
        Hyperparameter("dropout2", "float", 0.5, low=0.0, high=0.7, help="dropout before the last layer"),
    ),
    # The recipe's own values: Adadelta(lr=1.0), StepLR(step_size=1, gamma=0.7), 14 epochs, batches of 64.
    defaults={"optimizer": "adadelta", "loss": "nll", "lr": 1.0, "epochs": 14, "batch_size": 64,
              "scheduler": "step", "step_size": 1, "gamma": 0.7},
    optimizers=("adadelta",),
    losses=("nll",),
    metrics=metrics,
    search_space={
        "lr": [0.1, 3.0],
        "epochs": [5, 20],
        "gamma": [0.5, 0.95],
        "dropout1": True,
        "dropout2": True,
    },
)
