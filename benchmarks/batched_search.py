"""Trials per second of whole searches: one trial at a time against ``--batch K``, tracking off and on.

Every side runs the same N trials of the reference space (a RandomSampler with one seed proposes the
same configurations whatever the batch; no pruner, so every side trains the same epochs), through
the harness's ``Objective``: ``study.optimize`` one at a time, ``harness.search.loop.optimize`` for
K > 1. Tracking on writes every trial's run to a fresh MLflow SQLite store with a journal storage,
the embedded stores a user starts with. Sides interleaved, each in a fresh temporary folder,
medians of ``--repeats``.

    python benchmarks/batched_search.py [--trials 128] [--sizes 8 32 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from harness import Objective  # noqa: E402
from harness.experiment import load  # noqa: E402
from harness.search import loop  # noqa: E402
from harness.search import study as study_module  # noqa: E402


def run(trials: int, size: int, track: bool, seed: int) -> float:
    folder = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    old = os.getcwd()
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        experiment = load("linear_regression")
        if track:  # the store's tables, created once per store, are not a trial's cost
            from mlflow import MlflowClient

            MlflowClient().search_experiments()
        storage = study_module.open_storage(f"journal:{folder / 'optuna_journal.log'}")
        started = time.perf_counter()
        study = optuna.create_study(study_name="bench", storage=storage, sampler=optuna.samplers.RandomSampler(seed),
                                    pruner=optuna.pruners.NopPruner())
        with Objective(experiment, track=track, batch=size) as objective:
            if size == 1:
                study.optimize(objective, n_trials=trials)
            else:
                loop.optimize(study, objective, trials, size)
        elapsed = time.perf_counter() - started
        assert len(study.trials) == trials
        return elapsed
    finally:
        os.chdir(old)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sides = [(size, track) for track in (False, True) for size in (1, *args.sizes)]
    times: dict[tuple, list[float]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            times[side].append(run(args.trials, *side, args.seed))
    print(f"{args.trials} trials of the reference space (RandomSampler seed {args.seed}, no pruner), "
          f"medians of {args.repeats}; tracked: MLflow SQLite + journal storage, the study summary included")
    print(f"{'tracking':<9} {'batch':>5} {'seconds':>8} {'trials/s':>9} {'speed-up':>9}")
    for track in (False, True):
        base = statistics.median(times[(1, track)])
        for size in (1, *args.sizes):
            median = statistics.median(times[(size, track)])
            print(f"{'on' if track else 'off':<9} {size:>5} {median:8.2f} {args.trials / median:9.1f} {base / median:8.2f}x")


if __name__ == "__main__":
    main()
