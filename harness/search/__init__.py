"""Optuna search over the harness: the objective, its search space and the study's MLflow tracking.

The package itself imports nothing heavy: ``harness.Objective`` loads optuna on first use.
"""

__all__ = ["Objective", "SearchSpace"]


def __getattr__(name):
    if name == "Objective":
        from .objective import Objective

        return Objective
    if name == "SearchSpace":
        from .space import SearchSpace

        return SearchSpace
    raise AttributeError(f"module 'harness.search' has no attribute {name!r}")
