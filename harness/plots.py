"""The two figures of a run. Figure objects, not pyplot: no global state, safe off the main thread."""
from __future__ import annotations

import io
import sys
import threading

from matplotlib.figure import Figure

from .errors import described
from .experiment import Data, Experiment
from .schema import LOSS_CURVES, PREDICTIONS, TEST_LOSS, TRAIN_LOSS

# zlib's fastest level: PNG compression was half of savefig's time (a 10x6 in figure: 105 ms at
# Pillow's default, 59 ms at 1, for files a quarter larger), and a search draws four at its end.
SAVE_KWARGS = {"format": "png", "pil_kwargs": {"compress_level": 1}}


def loss_curves(values: dict[str, list[float]]) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    epochs = range(len(values[TRAIN_LOSS]))
    ax.plot(epochs, values[TRAIN_LOSS], label="Train loss")
    ax.plot(epochs, values[TEST_LOSS], label="Test loss")
    ax.set_title("Training and test loss curves")
    ax.set_ylabel("Loss")
    ax.set_xlabel("Epochs")
    ax.legend()
    return fig


def predictions(experiment: Experiment, data: Data, predicted, on_stop=None) -> Figure | None:
    """The experiment's figure of ``predicted``; None where it has none, or its code raised. ``on_stop``:
    given what the code raised where it asks to stop (``sys.exit()``, a BaseException of its own, a
    KeyboardInterrupt), the figure left out; without it, that passes on to the caller."""
    if experiment.plot_predictions is None or predicted is None:
        return None
    fig = Figure(figsize=(10, 7))
    try:
        experiment.plot_predictions(fig.add_subplot(), data, predicted)
    except Exception as exc:  # the experiment's own code: the figure is left out, the run keeps the rest
        _said_once(f"harness: the predictions figure is left out: experiment {experiment.name!r}: its "
                   f"plot_predictions raised {described(exc)}")
        return None
    except BaseException as exc:
        if on_stop is None:
            raise
        on_stop(exc)
        return None
    return fig


_said: set[str] = set()
_said_lock = threading.Lock()  # trials' figures are drawn on the recorder's threads


def _said_once(line: str) -> None:
    """Each distinct line once a process: a search draws the same failing figure for every trial."""
    with _said_lock:
        if line in _said:
            return
        _said.add(line)
    print(line, file=sys.stderr, flush=True)


def render(experiment: Experiment, values: dict[str, list[float]], data: Data, predicted,
           on_stop=None) -> dict[str, Figure]:
    """Both figures of a run from its curves, its data and its final test-set predictions
    (``on_stop``: see ``predictions``)."""
    figures = {LOSS_CURVES: loss_curves(values)}
    fig = predictions(experiment, data, predicted, on_stop)
    if fig is not None:
        figures[PREDICTIONS] = fig
    return figures


def png(figures: dict[str, Figure]) -> dict[str, bytes]:
    out = {}
    for name, fig in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, **SAVE_KWARGS)
        out[name] = buffer.getvalue()
    return out
