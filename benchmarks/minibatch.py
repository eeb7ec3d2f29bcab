"""The harness's mini-batch loop beside a bare PyTorch loop over the same DataLoader batches, and
digits-search throughput with and without tracking.

1. Loop: the `digits` experiment's model, data and batches (the same seeded DataLoader object for
   both), per epoch: a bare loop as pytorch/examples writes it (train over the batches, the epoch's
   mean loss and accuracy with `.item()`, then the test loss and accuracy) against the harness's
   `loop.fit` (which records the same values on the device). Epochs alternate between the two, so
   drift in the machine's speed hits both; medians of the per-epoch times.
2. Recipe: the same, both sides with a StepLR stepped after each epoch, gradient clipping by norm
   before each step and early stopping's bookkeeping (the harness: its EarlyStopping observer
   reading every epoch and copying the best weights; the bare loop: the same by hand), patience
   too large to stop.
3. Search: `harness search --experiment digits` (its default space, TPE seed 0, pruning off) as a
   whole command on the embedded stores, against the same trials untracked
   (`Objective(track=False)` in bare in-memory Optuna).

    python benchmarks/minibatch.py [--epochs 40] [--trials 10]
"""
import argparse
import statistics
import sys
import time

import torch
from torch import nn

from harness import config, training
from harness.loop import EarlyStopping, History, Recipe, fit
from search_overhead import BARE, timed  # this folder is on sys.path when run as a script

def bare_epoch(model, loader, X_test, y_test, loss_fn, optimizer, clip=None) -> tuple[float, float, float, float]:
    model.train()
    total = correct = seen = 0.0
    for X, y in loader:
        pred = model(X)
        loss = loss_fn(pred, y)
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        total += loss.item() * len(X)
        correct += (pred.argmax(1) == y).sum().item()
        seen += len(X)
    model.eval()
    with torch.no_grad():
        pred = model(X_test)
        test_loss = loss_fn(pred, y_test).item()
        test_acc = (pred.argmax(1) == y_test).float().mean().item()
    return total / seen, correct / seen, test_loss, test_acc


def loop_ratio(epochs: int) -> None:
    cfg, experiment = config.resolve({"experiment": "digits", "device": "cpu"})
    data = experiment.make_data()
    train_batches, test_batches, _ = training.batches(data, cfg)  # the same loader object for both sides
    models = [training.build_model(cfg, experiment) for _ in range(2)]
    optimizers = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in models]
    loss_fn = nn.CrossEntropyLoss()
    bare, harness = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        bare_epoch(models[0], train_batches, data.X_test, data.y_test, loss_fn, optimizers[0])
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        fit(models[1], train_batches, test_batches, loss_fn, optimizers[1], 1, metrics_fn=experiment.metrics)
        harness.append(time.perf_counter() - start)
    b, h = statistics.median(bare[2:]), statistics.median(harness[2:])  # first epochs warm up
    print(f"loop, digits, batch_size {cfg.batch_size}, {len(train_batches)} batches an epoch, {epochs} epochs "
          "each side, alternating")
    print(f"  bare PyTorch loop, per epoch (median): {b * 1000:.2f} ms")
    print(f"  harness loop.fit,  per epoch (median): {h * 1000:.2f} ms")
    print(f"  ratio: {h / b:.3f}x (goal <= 1.05x)")


def recipe_ratio(epochs: int) -> None:
    cfg, experiment = config.resolve({"experiment": "digits", "device": "cpu"})
    data = experiment.make_data()
    train_batches, test_batches, _ = training.batches(data, cfg)
    models = [training.build_model(cfg, experiment) for _ in range(2)]
    optimizers = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in models]
    schedules = [torch.optim.lr_scheduler.StepLR(o, 5, 0.9) for o in optimizers]
    loss_fn = nn.CrossEntropyLoss()
    history = History()
    stopper = EarlyStopping(models[1], history, "test_loss", patience=10 ** 6)
    best, best_state = None, None
    bare, harness = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        *_, test_loss, _ = bare_epoch(models[0], train_batches, data.X_test, data.y_test, loss_fn, optimizers[0],
                                      clip=1.0)
        schedules[0].step()
        if best is None or test_loss < best:
            best, best_state = test_loss, {k: v.detach().clone() for k, v in models[0].state_dict().items()}
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        fit(models[1], train_batches, test_batches, loss_fn, optimizers[1], 1, metrics_fn=experiment.metrics,
            observers=[stopper], scheduler=schedules[1], recipe=Recipe(clip_norm=1.0))
        harness.append(time.perf_counter() - start)
    b, h = statistics.median(bare[2:]), statistics.median(harness[2:])
    print("recipe (StepLR per epoch, clip_grad_norm_ per step, early stopping's best-weights copy), same loop")
    print(f"  bare PyTorch loop, per epoch (median): {b * 1000:.2f} ms")
    print(f"  harness loop.fit,  per epoch (median): {h * 1000:.2f} ms")
    print(f"  ratio: {h / b:.3f}x (goal <= 1.05x)")


def search_rate(trials: int) -> None:
    untracked = timed([sys.executable, "-c", BARE, str(trials), "digits"])
    tracked = timed([sys.executable, "-m", "harness", "search", "--experiment", "digits", "--n-trials", str(trials),
                     "--pruner", "none", "--seed", "0", "--no-progress"])
    print(f"digits search, {trials} trials of the default space, TPE seed 0, pruning off, whole commands")
    print(f"  untracked (in-memory Optuna, Objective(track=False)): {untracked:.1f} s, "
          f"{trials / untracked:.2f} trials/s")
    print(f"  harness search, tracked (journal + sqlite:///mlflow.db): {tracked:.1f} s, {trials / tracked:.2f} trials/s")
    print(f"  ratio: {tracked / untracked:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    loop_ratio(args.epochs)
    recipe_ratio(args.epochs)
    if args.trials:
        search_rate(args.trials)


if __name__ == "__main__":
    main()
