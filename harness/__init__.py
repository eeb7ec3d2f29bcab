"""A harness that turns the PyTorch training workflow into tracked, searchable, reproducible runs.

Importing ``harness`` loads neither mlflow nor optuna; ``harness.Objective`` loads optuna on first use.
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Objective", "SearchSpace"):
        from . import search

        return getattr(search, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
