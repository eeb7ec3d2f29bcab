"""What checkpoints and live curves cost a run's training, side by side in one process.

One `harness train`-like run of an experiment (default: digits_cnn, mini-batches) into a fresh MLflow
SQLite store, three ways, interleaved, medians of ``--repeats``:
- off: no checkpoint, no live curves (the run's record written at its end only);
- defaults: a checkpoint every 300 s of training and live curves every 10 s (what `harness train`
  and `harness search` do unless told otherwise);
- every epoch: a checkpoint at every epoch's end and live curves at every epoch (the worst case a
  user can ask for: `--checkpoint-every 1`).
Printed: each way's training seconds (the loop, as TrainResult.seconds measures it) and its ratio to off.

    python benchmarks/checkpoint_cost.py [--experiment digits_cnn] [--epochs 6] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import config, resume, tracking, training  # noqa: E402
from harness.experiment import load  # noqa: E402
from harness.loop import History  # noqa: E402

WAYS = {"off": (None, None, 10.0 ** 9), "defaults": (None, 300.0, tracking.LIVE_SECONDS), "every epoch": (1, None, 0.0)}


def run(name: str, epochs: int, way: str) -> float:
    every, seconds, live_seconds = WAYS[way]
    folder = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    try:
        client = tracking.open_client(f"sqlite:///{folder / 'mlflow.db'}")
        experiment = load(name)
        data = experiment.load_data()
        cfg, _ = config.resolve({"experiment": name, "device": "cpu", "epochs": epochs}, experiment=experiment,
                                n_train=data.n_train)
        run_id = client.create_run("0").info.run_id
        history = History()
        live = tracking.LiveCurves(client, run_id, history, seconds=live_seconds)
        checkpoints = resume.run_checkpoints(client, run_id, every, seconds) if every or seconds else None
        result = training.train(cfg, experiment, data, observers=[live], history=history, checkpoints=checkpoints)
        tracking.log_result(client, run_id, experiment, result, first_step=live.close())
        return result.seconds
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="digits_cnn")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:  # interleaved: a machine's drift lands on every way alike
            times[way].append(run(args.experiment, args.epochs, way))
    base = statistics.median(times["off"])
    print(f"{args.experiment}, {args.epochs} epochs, medians of {args.repeats}:")
    for way, values in times.items():
        print(f"  {way:12s} {statistics.median(values):8.2f} s training   {statistics.median(values) / base:6.3f}x off")


if __name__ == "__main__":
    main()
