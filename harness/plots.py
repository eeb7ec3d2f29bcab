"""The two figures of a run. Figure objects, not pyplot: no global state, safe off the main thread."""
from __future__ import annotations

from matplotlib.figure import Figure

from .experiment import Experiment
from .training import TrainResult


def loss_curves(values: dict[str, list[float]]) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    epochs = range(len(values["train_loss"]))
    ax.plot(epochs, values["train_loss"], label="Train loss")
    ax.plot(epochs, values["test_loss"], label="Test loss")
    ax.set_title("Training and test loss curves")
    ax.set_ylabel("Loss")
    ax.set_xlabel("Epochs")
    ax.legend()
    return fig


def predictions(experiment: Experiment, result: TrainResult) -> Figure | None:
    if experiment.plot_predictions is None:
        return None
    fig = Figure(figsize=(10, 7))
    experiment.plot_predictions(fig.add_subplot(), result.data, result.predictions)
    return fig


def render(experiment: Experiment, result: TrainResult) -> dict[str, Figure]:
    figures = {"loss_curves.png": loss_curves(result.history.values)}
    fig = predictions(experiment, result)
    if fig is not None:
        figures["predictions.png"] = fig
    return figures
