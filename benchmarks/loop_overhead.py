"""The harness's full-batch loop beside a plain notebook PyTorch loop, untracked, on the same configs.

For each config of the reference experiment (`linear_regression`, full batch, seed 42) this times
(a) a plain loop exactly as the reference notebook writes it: seed, model, loss_fn, optimizer, and
per epoch model.train(), forward, loss, zero_grad, backward, step, model.eval(), the test loss under
torch.inference_mode(), keeping both losses of every epoch; the user ends up with them as Python
floats. Two ways of keeping them are timed and the cheaper one is the baseline:
  item:  `.item()` on both losses each epoch (the notebook's own form);
  stack: append `loss.detach()` and `test_loss` (0-d tensors), one `torch.stack(...).tolist()` at the end;
(b) the harness: `harness.training.train(cfg, experiment, data)` with no observers, data loaded once.
Only training is timed (imports and data loading are not). The sides run interleaved, in a rotating
order, so drift in the machine's speed hits all of them; the table shows medians, and the ratio is
the median over rounds of harness/plain within each round. Both sides are first checked to give
bit-for-bit the same per-epoch losses and final weights.

    python benchmarks/loop_overhead.py [--repeats 30] [--epochs 100 300]
"""
import argparse
import math
import statistics
import time

import torch
from torch import nn

from harness import config, experiment as experiment_module, training

CONFIGS = [("sgd", "l1", 0.01), ("adam", "mse", 0.003), ("sgd", "mse", 0.01)]
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
LOSSES = {"l1": nn.L1Loss, "mse": nn.MSELoss}


def plain(make_model, data, optimizer: str, loss: str, lr: float, epochs: int, keep: str):
    X_train, y_train, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
    torch.manual_seed(42)
    model = make_model()
    loss_fn = LOSSES[loss]()
    opt = OPTIMIZERS[optimizer](params=model.parameters(), lr=lr)
    train_losses, test_losses = [], []
    for epoch in range(epochs):
        model.train()
        y_pred = model(X_train)
        loss_value = loss_fn(y_pred, y_train)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        model.eval()
        with torch.inference_mode():
            test_pred = model(X_test)
            test_loss = loss_fn(test_pred, y_test)
        if keep == "item":
            train_losses.append(loss_value.item())
            test_losses.append(test_loss.item())
        else:
            train_losses.append(loss_value.detach())
            test_losses.append(test_loss)
    if keep == "stack":
        train_losses, test_losses = torch.stack(train_losses).tolist(), torch.stack(test_losses).tolist()
    return train_losses, test_losses, model


def harness(cfg, experiment, data):
    result = training.train(cfg, experiment, data)
    return result.history.values["train_loss"], result.history.values["test_loss"], result.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs of each side per config")
    parser.add_argument("--epochs", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each side per config")
    args = parser.parse_args()

    experiment = experiment_module.load("linear_regression")
    data = experiment.load_data()
    rows = []
    for epochs in args.epochs:
        for optimizer, loss, lr in CONFIGS:
            cfg, _ = config.resolve({"experiment": "linear_regression", "optimizer": optimizer, "loss": loss,
                                     "lr": lr, "epochs": epochs, "seed": 42, "device": "cpu"},
                                    experiment=experiment, n_train=data.n_train)
            sides = {
                "item": lambda: plain(experiment.make_model, data, optimizer, loss, lr, epochs, "item"),
                "stack": lambda: plain(experiment.make_model, data, optimizer, loss, lr, epochs, "stack"),
                "harness": lambda: harness(cfg, experiment, data),
            }
            outputs = {name: run() for name, run in sides.items()}
            reference = outputs["harness"]
            for name, (train_losses, test_losses, model) in outputs.items():
                assert train_losses == reference[0] and test_losses == reference[1], f"{name} differs"
                assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                             reference[2].state_dict().values())), f"{name} differs"
            times = {name: [] for name in sides}
            names = list(sides)
            for i in range(args.warmup + args.repeats):
                for name in names[i % 3:] + names[:i % 3]:  # rotate the order each round
                    start = time.perf_counter()
                    sides[name]()
                    elapsed = time.perf_counter() - start
                    if i >= args.warmup:
                        times[name].append(elapsed)
            medians = {name: statistics.median(t) for name, t in times.items()}
            base = min(("item", "stack"), key=medians.get)
            # Runs of one round are adjacent in time: their ratio cancels most of the machine's drift.
            paired = statistics.median(h / b for h, b in zip(times["harness"], times[base]))
            rows.append((f"{optimizer}+{loss} lr {lr}", epochs, medians, base, paired))

    print(f"linear_regression, full batch, seed 42, cpu, {args.repeats} interleaved rounds; medians in ms")
    print(f"{'config':<22}{'epochs':>7}{'plain item':>12}{'plain stack':>13}{'harness':>10}{'ratio':>8}"
          "  baseline (the cheaper plain form)")
    for label, epochs, m, base, paired in rows:
        print(f"{label:<22}{epochs:>7}{m['item'] * 1e3:>12.2f}{m['stack'] * 1e3:>13.2f}{m['harness'] * 1e3:>10.2f}"
              f"{paired:>7.3f}x  {base}")
    ratios = [paired for *_, paired in rows]
    overall = math.prod(ratios) ** (1 / len(ratios))
    summed = sum(m["harness"] for _, _, m, _, _ in rows) / sum(m[base] for _, _, m, base, _ in rows)
    print("ratio: median over rounds of harness / plain (the baseline), each round's runs side by side")
    print(f"overall harness/plain: {overall:.3f}x (geometric mean of the ratios), {summed:.3f}x (sum of medians); "
          f"max {max(ratios):.3f}x; goal <= 1.05x")


if __name__ == "__main__":
    main()
