"""Overhead of `harness search`, measured side by side with bare in-memory Optuna.

Three sides run the same 200 trials of the default space (same sampler and seed, pruning off) as
whole commands in fresh working directories, interleaved:
- bare Optuna, in memory, with a plain PyTorch loop as the notebook writes it (no harness code);
- bare Optuna, in memory, with the harness's loop and no tracking (`Objective(track=False)`);
- `harness search` on the default embedded stores (Optuna journal file, MLflow sqlite:///mlflow.db)
  with everything the tracking contract logs.

    python benchmarks/search_overhead.py [--trials 200] [--repeats 3]
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


# The fixed costs of a tracked search on a fresh directory, each measured on its own.
FIXED = """
import sys, time
t0 = time.perf_counter()
import mlflow
t1 = time.perf_counter()
from harness import tracking
tracking.open_client("sqlite:///first.db")  # MLflow's migrations (an empty cache: XDG_CACHE_HOME below)
t2 = time.perf_counter()
client = tracking.open_client("sqlite:///mlflow.db")  # a copy of the template the first one left
t2b = time.perf_counter()
import optuna
from harness.search import summary
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
pairs = ["sgd+l1", "sgd+mse", "adam+l1", "adam+mse", "adamw+smooth_l1", "rmsprop+huber"]
study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) * t.suggest_int("epochs", 50, 400)
               + len(t.suggest_categorical("optimizer_loss", pairs)), n_trials=int(sys.argv[1]))
parent, asked = client.create_run("0").info.run_id, client.create_run("0").info.run_id
t3 = time.perf_counter()
summary.write(client, parent, summary.summarize(study), {}, summary.trials_csv(study), study.trials, study.directions,
              importance=False)
t4 = time.perf_counter()
summary.write(client, asked, summary.summarize(study), {}, summary.trials_csv(study), study.trials, study.directions,
              importance=True)
t5 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {t2b - t2:.2f} {t4 - t3:.2f} {t5 - t4:.2f}")
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
    plain_cmd = [sys.executable, "-c", PLAIN, str(args.trials)]
    bare_cmd = [sys.executable, "-c", BARE, str(args.trials)]
    tracked_cmd = [sys.executable, "-m", "harness", "search", "--n-trials", str(args.trials), "--pruner", "none",
                   "--sampler", "tpe", "--seed", "0", "--no-progress"]
    plain, bare, tracked = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits every side
        plain.append(timed(plain_cmd))
        bare.append(timed(bare_cmd))
        tracked.append(timed(tracked_cmd))
    p, b, t = statistics.median(plain), statistics.median(bare), statistics.median(tracked)
    print(f"trials: {args.trials}, repeats: {args.repeats} (medians of whole-command wall times)")
    print(f"bare in-memory optuna, plain PyTorch loop:   {p:.2f}s  {[round(x, 2) for x in plain]}")
    print(f"bare in-memory optuna, harness loop:         {b:.2f}s  {[round(x, 2) for x in bare]}")
    print(f"harness search, full tracking, embedded:     {t:.2f}s  {[round(x, 2) for x in tracked]}")
    print(f"ratio vs the plain loop: {t / p:.2f}x (goal <= 1.15x); vs the harness loop untracked: {t / b:.2f}x; "
          f"harness loop vs plain loop, both untracked: {b / p:.2f}x")
    with tempfile.TemporaryDirectory(prefix="bench-") as cwd:
        env = {**os.environ, "XDG_CACHE_HOME": os.path.join(cwd, "cache")}  # no template yet
        out = subprocess.run([sys.executable, "-c", FIXED, str(args.trials)], cwd=cwd, capture_output=True, text=True,
                             env=env)
    if out.returncode != 0:
        sys.exit(out.stderr[-2000:])
    imports, migrated, store, summary, with_importance = map(float, out.stdout.split()[-5:])
    rest = t - b - imports - store - summary
    print(f"what the {t - b:.1f}s over the untracked harness loop is made of: import mlflow {imports:.1f}s, "
          f"create a fresh MLflow store {store:.1f}s (from the template; through MLflow's migrations, the first "
          f"store of a machine: {migrated:.1f}s), the study summary (table, best, 2 Optuna plots) {summary:.1f}s "
          f"(with --importance, the importance plot as well: {with_importance:.1f}s), "
          f"the rest {rest:.1f}s ({rest / args.trials * 1000:.0f} ms a trial: the trial's run and record, "
          "the journal storage; benchmarks/tracking_path.py splits it)")


if __name__ == "__main__":
    main()
