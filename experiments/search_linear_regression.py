"""A plain Optuna study over the reference experiment, every trial tracked in MLflow.

    python experiments/search_linear_regression.py [N_TRIALS]
"""
import sys

import optuna

from harness import Objective

if __name__ == "__main__":  # the tracking writer is a subprocess: keep the script importable
    study = optuna.create_study(
        study_name="linear-regression-script",
        storage="sqlite:///optuna.db",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=10),
    )
    with Objective("linear_regression") as objective:  # closing writes the study summary
        study.optimize(objective, n_trials=int(sys.argv[1]) if len(sys.argv) > 1 else 20)
    best = study.best_trial
    print(f"best test loss {best.value:.3g} with {best.params}, run {best.user_attrs['mlflow_run_id']}")
