"""Handwritten digits: scikit-learn's bundled 8x8 images (1797, 10 classes), an MLP, mini-batches.

The images ship inside scikit-learn (sklearn/datasets/data/digits.csv.gz): nothing is downloaded.
"""
import torch
from torch import nn

from harness.experiment import Data, Experiment, Hyperparameter

DATA_SEED, TEST_FRACTION = 1234, 0.2


def make_data() -> Data:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    X = torch.tensor(images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(labels, dtype=torch.long)
    # A generator of its own: the split stays the same whatever seed the model is built with.
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(DATA_SEED))
    X, y = X[order], y[order]
    split = len(X) - int(TEST_FRACTION * len(X))
    return Data(X[:split], y[:split], X[split:], y[split:])


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))  # logits


def metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": (logits.argmax(dim=1) == y).float().mean()}


def plot_predictions(ax, data: Data, logits: torch.Tensor) -> None:
    """The confusion matrix of the test set: which digits the model takes for which."""
    truth, predicted = data.y_test.cpu(), logits.cpu().argmax(dim=1)
    matrix = torch.zeros(10, 10, dtype=torch.long)
    matrix.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in zip(((i, j) for i in range(10) for j in range(10)), matrix.flatten().tolist()):
        if count:
            ax.text(j, i, count, ha="center", va="center", color="white" if i == j else "black", fontsize=9)
    accuracy = (truth == predicted).float().mean().item()
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit",
           title=f"Test set confusion matrix (accuracy {accuracy:.3f})")


EXPERIMENT = Experiment(
    name="digits",
    description=__doc__,
    make_data=make_data,
    make_model=DigitsMLP,
    hyperparameters=(
        Hyperparameter("hidden", "int", 64, low=16, high=256, log=True, help="width of both hidden layers"),
        Hyperparameter("dropout", "float", 0.1, low=0.0, high=0.5, help="dropout after each hidden layer"),
    ),
    defaults={"optimizer": "adam", "loss": "cross_entropy", "lr": 0.003, "epochs": 30, "batch_size": 64},
    optimizers=("sgd", "adam", "adamw"),
    losses=("cross_entropy",),
    metrics=metrics,
    plot_predictions=plot_predictions,
    search_space={
        "lr": [3e-4, 3e-2],
        "epochs": [10, 50],
        "pairs": ["adam+cross_entropy", "adamw+cross_entropy", "sgd+cross_entropy"],
        "hidden": True,
        "dropout": True,
        "batch_size": [32, 64, 128],
        "momentum": [0.0, 0.95],
    },
)
