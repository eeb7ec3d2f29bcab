"""Overhead of `harness search`, measured side by side with bare in-memory Optuna.

Three sides run the same 200 trials of the default space (same sampler and seed, pruning off) as
whole commands in fresh working directories, interleaved:
- bare Optuna, in memory, with a plain PyTorch loop as the notebook writes it (no harness code);
- bare Optuna, in memory, with the harness's loop and no tracking (`Objective(track=False)`);
- `harness search` on the default embedded stores (Optuna journal file, MLflow sqlite:///mlflow.db)
  with everything the tracking contract logs.

Then the fixed costs of a tracked search, each part timed on its own in a fresh process (importing
MLflow, opening its store, the parent's provenance, the best trial's figures, the study summary, the
best trial's MLflow Model), against the goal of at most 1.5 s over an untracked search.

    python benchmarks/search_overhead.py [--trials 200] [--repeats 3] [--fixed-only]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PLAIN = """
import sys, optuna, torch
from torch import nn
optuna.logging.set_verbosity(optuna.logging.WARNING)
X = torch.arange(0, 1, 0.02).unsqueeze(dim=1)
y = 0.7 * X + 0.3
X_train, y_train, X_test, y_test = X[:40], y[:40], X[40:], y[40:]
class LinearRegressionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1, dtype=torch.float), requires_grad=True)
        self.bias = nn.Parameter(torch.randn(1, dtype=torch.float), requires_grad=True)
    def forward(self, x):
        return self.weights * x + self.bias
OPT = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
LOSS = {"l1": nn.L1Loss, "mse": nn.MSELoss, "smooth_l1": nn.SmoothL1Loss, "huber": nn.HuberLoss}
PAIRS = ["sgd+l1", "sgd+mse", "adam+l1", "adam+mse", "adamw+smooth_l1", "rmsprop+huber"]
def objective(trial):
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    epochs = trial.suggest_int("epochs", 50, 400)
    optimizer_name, loss_name = trial.suggest_categorical("optimizer_loss", PAIRS).split("+")
    torch.manual_seed(42)
    model = LinearRegressionModel()
    loss_fn, optimizer = LOSS[loss_name](), OPT[optimizer_name](model.parameters(), lr=lr)
    train_losses, test_losses = [], []
    for epoch in range(epochs):
        model.train()
        loss = loss_fn(model(X_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.inference_mode():
            test_loss = loss_fn(model(X_test), y_test)
        train_losses.append(loss.item())
        test_losses.append(test_loss.item())
    return test_losses[-1]
study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), pruner=optuna.pruners.NopPruner())
study.optimize(objective, n_trials=int(sys.argv[1]))
print(len(study.trials), study.best_value)
"""

BARE = """
import optuna, sys
from harness import Objective
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), pruner=optuna.pruners.NopPruner())
experiment = sys.argv[2] if len(sys.argv) > 2 else "linear_regression"
study.optimize(Objective(experiment, track=False), n_trials=int(sys.argv[1]))
print(len(study.trials), study.best_value)
"""


# The fixed costs of a tracked search on a fresh directory, each measured on its own, in the order a
# search meets them, after what an untracked search does too (torch imported, one run trained).
FIXED = """
import sys, time
import optuna, torch
from harness import config, plots, tracking, training
from harness.experiment import load
from harness.search import summary
experiment = load("linear_regression")
data = experiment.load_data()
cfg, _ = config.resolve({"epochs": 50}, experiment=experiment, n_train=data.n_train)
result = training.train(cfg, experiment, data)
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
pairs = ["sgd+l1", "sgd+mse", "adam+l1", "adam+mse", "adamw+smooth_l1", "rmsprop+huber"]
study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) * t.suggest_int("epochs", 50, 400)
               + len(t.suggest_categorical("optimizer_loss", pairs)), n_trials=int(sys.argv[1]))
mark = [time.perf_counter()]
import mlflow
mark.append(time.perf_counter())
client = tracking.open_client("sqlite:///mlflow.db")  # a copy of the template; MLflow's SQL store imported
mark.append(time.perf_counter())
parent, best, asked = (client.create_run("0").info.run_id for _ in range(3))
tracking.log_provenance(client, parent, experiment, data, "cpu")
mark.append(time.perf_counter())
tracking.write(client, best, tracking.record(result, tracking.source_params(experiment)))  # a trial's record
mark.append(time.perf_counter())
tracking.write(client, best, tracking.RunRecord(params={}, history={}, artifacts=plots.png(
    plots.render(experiment, result.history.values, data, result.predictions))))  # the best trial's figures
mark.append(time.perf_counter())
summary.write(client, parent, summary.summarize(study), {}, summary.trials_csv(study), study.trials, study.directions,
              importance=False)
mark.append(time.perf_counter())
from harness import models
models.log_run_model(client, best, experiment, data)
mark.append(time.perf_counter())
summary.write(client, asked, summary.summarize(study), {}, summary.trials_csv(study), study.trials, study.directions,
              importance=True)
mark.append(time.perf_counter())
print(" ".join(f"{b - a:.2f}" for a, b in zip(mark, mark[1:])))
"""

# Once per machine (a user cache without the template): the first store through MLflow's migrations.
MIGRATED = """
import time
from harness import tracking
start = time.perf_counter()
tracking.open_client("sqlite:///first.db")
print(f"{time.perf_counter() - start:.2f}")
"""

PARTS = ("import mlflow", "open the store (MLflow's SQL store code imported, the template copied)",
         "the parent's provenance", None, "the best trial's figures (loss curves, predictions)",
         "the study summary (table, best, 2 Optuna figures)", "the best trial's MLflow Model")


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
    parser.add_argument("--fixed-only", action="store_true", help="only the fixed costs, --repeats times")
    args = parser.parse_args()
    plain_cmd = [sys.executable, "-c", PLAIN, str(args.trials)]
    bare_cmd = [sys.executable, "-c", BARE, str(args.trials)]
    tracked_cmd = [sys.executable, "-m", "harness", "search", "--n-trials", str(args.trials), "--pruner", "none",
                   "--sampler", "tpe", "--seed", "0", "--no-progress"]
    plain, bare, tracked, fixed = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-") as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}  # no template yet: the first store makes it
        migrated = float(fixed_run(MIGRATED, [], env).split()[-1])
        for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits every side
            if not args.fixed_only:
                plain.append(timed(plain_cmd))
                bare.append(timed(bare_cmd))
                tracked.append(timed(tracked_cmd))
            fixed.append([float(x) for x in fixed_run(FIXED, [str(args.trials)], env).split()[-len(PARTS) - 1:]])
    parts = [statistics.median(column) for column in zip(*fixed)]
    *parts, importance = parts
    named = [(name, seconds) for name, seconds in zip(PARTS, parts) if name]
    total = sum(seconds for _, seconds in named)
    print(f"the fixed costs of a tracked search (medians of {args.repeats}, each in a fresh process; a trial's own "
          f"record, {parts[3]:.2f}s, is a per-trial cost):")
    for name, seconds in named:
        print(f"  {name}: {seconds:.2f}s")
    print(f"  total: {total:.2f}s (goal: at most 1.5s); with --importance the summary takes {importance:.2f}s; "
          f"--models none leaves out the model; the first store of a machine, through MLflow's migrations: "
          f"{migrated:.2f}s")
    if args.fixed_only:
        return
    p, b, t = statistics.median(plain), statistics.median(bare), statistics.median(tracked)
    print(f"trials: {args.trials}, repeats: {args.repeats} (medians of whole-command wall times)")
    print(f"bare in-memory optuna, plain PyTorch loop:   {p:.2f}s  {[round(x, 2) for x in plain]}")
    print(f"bare in-memory optuna, harness loop:         {b:.2f}s  {[round(x, 2) for x in bare]}")
    print(f"harness search, full tracking, embedded:     {t:.2f}s  {[round(x, 2) for x in tracked]}")
    print(f"ratio vs the plain loop: {t / p:.2f}x (goal <= 1.15x); vs the harness loop untracked: {t / b:.2f}x; "
          f"harness loop vs plain loop, both untracked: {b / p:.2f}x")
    rest = t - b - total
    print(f"what the {t - b:.1f}s over the untracked harness loop is made of: the fixed costs {total:.1f}s, "
          f"the rest {rest:.1f}s ({rest / args.trials * 1000:.0f} ms a trial: the trial's run and record, "
          "the journal storage; benchmarks/tracking_path.py splits it)")


def fixed_run(script: str, argv: list[str], env: dict) -> str:
    """``script``'s output, run in a fresh directory (a new store there)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as cwd:
        out = subprocess.run([sys.executable, "-c", script, *argv], cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(out.stderr[-2000:])
    return out.stdout


if __name__ == "__main__":
    main()
