"""A harness that turns the PyTorch training workflow into tracked, searchable, reproducible runs.

Importing ``harness`` loads neither mlflow nor optuna; the search pieces load on first use.
"""
__version__ = "0.1.0"
