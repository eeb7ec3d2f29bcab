"""Optuna's experimental features that the harness uses knowingly (heartbeats and their retry
callback, QMC and CMA-ES samplers' options, the Wilcoxon pruner, metric names): each use would warn
that its interface may change, a warning for Optuna's maintainers to give and not the user's to read
on every search. The one filter for it."""
from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def experimental_ok():
    from optuna.exceptions import ExperimentalWarning  # optuna only where it is used

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield
