"""The harness's mini-batch loop beside a bare PyTorch loop over the same DataLoader batches, and
digits-search throughput with and without tracking.

1. Loop: the `digits` experiment's model, data and batches (the same seeded DataLoader object for
   both), per epoch: a bare loop as pytorch/examples writes it (train over the batches, the epoch's
   mean loss and accuracy with `.item()`, then the test loss and accuracy) against the harness's
   `loop.fit` (which records the same values on the device). Epochs alternate between the two, so
   drift in the machine's speed hits both; medians of the per-epoch times.
2. Search: `harness search --experiment digits` (its default space, TPE seed 0, pruning off) as a
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
from harness.loop import fit
from search_overhead import BARE, timed  # this folder is on sys.path when run as a script

def bare_epoch(model, loader, X_test, y_test, loss_fn, optimizer) -> tuple[float, float, float, float]:
    model.train()
    total = correct = seen = 0.0
    for X, y in loader:
        pred = model(X)
        loss = loss_fn(pred, y)
        optimizer.zero_grad()
        loss.backward()
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
    train_batches, test_batches = training.batches(data, cfg)  # the same loader object for both sides
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
    search_rate(args.trials)


if __name__ == "__main__":
    main()
