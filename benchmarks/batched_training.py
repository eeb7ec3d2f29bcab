"""Training throughput of stacked configurations (harness.fast.batched) against one at a time, side by side.

Configurations are drawn from the reference search space (lr log-uniform 1e-4..1e-1, epochs 50..400,
the six optimizer/loss pairs) with one seed, grouped by ``batched.stack_key`` as a search groups them
(every pair of the reference in one stack), and
trained: one at a time with ``training.train``, and as stacks of K with ``batched.train_stack``.
Training only: no Optuna, no MLflow (the tracking path has its own benchmark). Sides are
interleaved, medians of ``--repeats``; every stacked member is checked against its sequential
result, so a speed-up never comes from different work.

    python benchmarks/batched_training.py [--configs 128] [--sizes 8 32 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import config, training  # noqa: E402
from harness.fast import batched  # noqa: E402
from harness.experiment import load  # noqa: E402
from harness.search.space import DEFAULT  # noqa: E402

PAIRS = ["sgd+l1", "sgd+mse", "adam+l1", "adam+mse", "adamw+smooth_l1", "rmsprop+huber"]


def configs(experiment, data, n: int, seed: int):
    rng = random.Random(seed)
    low, high = DEFAULT["lr"]
    out = []
    for _ in range(n):
        optimizer, loss = rng.choice(PAIRS).split("+")
        lr = math.exp(rng.uniform(math.log(low), math.log(high)))
        epochs = rng.randint(*DEFAULT["epochs"])
        out.append(config.resolve({"experiment": experiment.name, "optimizer": optimizer, "loss": loss, "lr": lr,
                                   "epochs": epochs, "seed": 42, "device": "cpu"},
                                  experiment=experiment, n_train=data.n_train)[0])
    return out


def sequential(cfgs, experiment, data):
    return [training.train(cfg, experiment, data) for cfg in cfgs]


def stacked(cfgs, experiment, data, size: int):
    by_key: dict = {}
    for i, cfg in enumerate(cfgs):
        by_key.setdefault(batched.stack_key(cfg), []).append(i)
    results = [None] * len(cfgs)
    for indices in by_key.values():
        for start in range(0, len(indices), size):
            chunk = indices[start:start + size]
            for i, result in zip(chunk, batched.train_stack([cfgs[i] for i in chunk], experiment, data)):
                results[i] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    experiment = load("linear_regression")
    data = experiment.load_data()
    cfgs = configs(experiment, data, args.configs, args.seed)
    epochs = sum(c.epochs for c in cfgs)
    times: dict[str, list[float]] = {}
    reference = None
    for _ in range(args.repeats):
        for side in ["one at a time", *(f"stacks of {k}" for k in args.sizes)]:
            started = time.perf_counter()
            if side == "one at a time":
                results = sequential(cfgs, experiment, data)
            else:
                results = stacked(cfgs, experiment, data, int(side.rsplit(" ", 1)[1]))
            times.setdefault(side, []).append(time.perf_counter() - started)
            curves = [r.history.values for r in results]
            reference = reference or curves
            assert curves == reference, f"{side}: a member's curves differ from its training alone"
    base = statistics.median(times["one at a time"])
    print(f"{args.configs} configurations of the reference space ({epochs} epochs in all), training only, "
          f"medians of {args.repeats}; every member's curves equal to its training alone")
    print(f"{'side':<16} {'seconds':>8} {'trials/s':>9} {'speed-up':>9}")
    for side, values in times.items():
        median = statistics.median(values)
        print(f"{side:<16} {median:8.2f} {args.configs / median:9.1f} {base / median:8.2f}x")


if __name__ == "__main__":
    main()
