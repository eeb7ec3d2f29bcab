"""Work a preempted search loses: `kill -9` (or SIGTERM) at random moments of a digits_cnn search,
against the checkpoint interval.

Each sample is a fresh store and a `harness search` of ``--trials`` trials (epochs drawn from
``--epochs-range``, checkpoints every N epochs and never by time), killed once its training has
done a seeded-random number of batches, then run again until every trial is COMPLETE (the killed
trial is retried from its last checkpoint). The experiment is digits_cnn with a metrics function
that also counts every training batch in a file (each process appends; a killed one keeps what it
wrote). Work lost = batches trained in all minus the batches of the COMPLETE trials' epochs, in
epochs. `kill -9` should lose less than one interval (what came after the last checkpoint); SIGTERM
none (the run writes a checkpoint at the next batch boundary and stops there).

    python benchmarks/preemption.py [--intervals 1 4] [--kills 2] [--sigterm] [--trials 1] [--epochs-range 4 6]

About a minute and a half a stop on a 2-core machine: the defaults take about 6 minutes; the figures in
docs/benchmarks.md (``--intervals 1 2 4 --kills 3 --sigterm``) about 20.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COUNTING = """
from dataclasses import replace

from experiments.digits_cnn import EXPERIMENT as CNN

COUNT = {count!r}


def metrics(log_probs, y):
    if not log_probs.is_inference():  # a training batch's (evaluation runs in inference mode)
        with open(COUNT, "a") as out:
            out.write(".")
    return CNN.metrics(log_probs, y)


EXPERIMENT = replace(CNN, name="counted", metrics=metrics)
"""


def batches_per_epoch(batch_size: int) -> int:
    from harness.experiment import load

    n_train = load("digits_cnn").load_data().n_train
    return -(-n_train // batch_size)


def sample(folder: Path, args, every: int, signum: int, target: int) -> dict:
    """One search killed with ``signum`` once ``target`` batches were trained, then completed."""
    count = folder / "count"
    (folder / "counted.py").write_text(COUNTING.format(count=str(count)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTUNA_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    flags = [sys.executable, "-m", "harness", "search", "--experiment", "counted.py", "--n-trials", str(args.trials),
             "--max-trials", str(args.trials), "--epochs-range", *map(str, args.epochs_range), "--seed", "0",
             "--pruner", "none", "--no-progress", "--checkpoint-every", str(every), "--checkpoint-seconds", "0",
             "--set", f"batch_size={args.batch_size}"]
    process = subprocess.Popen(flags, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and (count.stat().st_size if count.exists() else 0) < target:
        time.sleep(0.002)
    killed_at = count.stat().st_size if count.exists() else 0
    if process.poll() is None:
        os.kill(process.pid, signum)
    stopped = process.wait()
    for _ in range(3):  # the retry, and anything a kill inside a trial's wrap-up left queued
        subprocess.run(flags, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        done = _complete_epochs(folder)
        if done is not None:
            break
    else:
        raise RuntimeError(f"the search in {folder} did not complete its {args.trials} trials")
    return {"trained": count.stat().st_size, "needed": done, "killed_at": killed_at, "status": stopped}


def _complete_epochs(folder: Path) -> int | None:
    """The epochs of the study's COMPLETE trials, summed; None until it has them all."""
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(folder / "optuna_journal.log")))
    (study,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=study.study_name, storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if any(t.state in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING) for t in trials):
        return None
    return sum(t.params["epochs"] for t in complete)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 4], help="checkpoint every N epochs")
    parser.add_argument("--kills", type=int, default=2, help="samples per interval and signal")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--epochs-range", type=int, nargs=2, default=[4, 6])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sigterm", action="store_true", help="also SIGTERM at the largest interval")
    parser.add_argument("--seed", type=int, default=28)
    args = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    per_epoch = batches_per_epoch(args.batch_size)
    # Somewhere in the first trials' training: a search of --trials trials of at least the range's low end.
    span = args.trials * args.epochs_range[0] * per_epoch
    rng = random.Random(args.seed)
    rows = [(every, signal.SIGKILL) for every in args.intervals]
    if args.sigterm:
        rows.append((max(args.intervals), signal.SIGTERM))
    print(f"digits_cnn, {args.trials} trials of {args.epochs_range[0]}-{args.epochs_range[1]} epochs, "
          f"{per_epoch} batches an epoch; work lost in epochs (batches trained again / {per_epoch})")
    print(f"{'signal':>8} {'interval':>8} {'kills':>5} {'lost: mean':>10} {'max':>6}  each (killed at batch)")
    for every, signum in rows:
        lost, shown = [], []
        for _ in range(args.kills):
            target = rng.randrange(1, span)
            folder = Path(tempfile.mkdtemp(prefix="harness-preempt-"))
            try:
                result = sample(folder, args, every, signum, target)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            epochs = (result["trained"] - result["needed"] * per_epoch) / per_epoch
            lost.append(epochs)
            shown.append(f"{epochs:.2f} ({result['killed_at']})")
        print(f"{signal.Signals(signum).name:>8} {every:>8} {len(lost):>5} {statistics.mean(lost):>10.2f} "
              f"{max(lost):>6.2f}  {', '.join(shown)}", flush=True)


if __name__ == "__main__":
    main()
