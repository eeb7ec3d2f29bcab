"""Tracking overhead of `harness search`, measured side by side with bare in-memory Optuna.

Both sides run the same 200 trials (same sampler and seed, pruning off, the harness loop) as whole
commands in fresh working directories; the tracked side uses the default embedded stores
(Optuna journal file, MLflow sqlite:///mlflow.db) with everything the tracking contract logs.

    python benchmarks/search_overhead.py [--trials 200] [--repeats 3]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

BARE = """
import optuna, sys
from harness import Objective
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), pruner=optuna.pruners.NopPruner())
experiment = sys.argv[2] if len(sys.argv) > 2 else "linear_regression"
study.optimize(Objective(experiment, track=False), n_trials=int(sys.argv[1]))
print(len(study.trials), study.best_value)
"""


def timed(cmd: list[str]) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-") as cwd:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTUNA_"))}
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bare_cmd = [sys.executable, "-c", BARE, str(args.trials)]
    tracked_cmd = [sys.executable, "-m", "harness", "search", "--n-trials", str(args.trials), "--pruner", "none",
                   "--sampler", "tpe", "--seed", "0", "--no-progress"]
    bare, tracked = [], []
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both sides
        bare.append(timed(bare_cmd))
        tracked.append(timed(tracked_cmd))
    b, t = statistics.median(bare), statistics.median(tracked)
    print(f"trials: {args.trials}, repeats: {args.repeats} (medians of whole-command wall times)")
    print(f"bare in-memory optuna, no tracking: {b:.2f}s  {[round(x, 2) for x in bare]}")
    print(f"harness search, full tracking:      {t:.2f}s  {[round(x, 2) for x in tracked]}")
    print(f"ratio: {t / b:.2f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
