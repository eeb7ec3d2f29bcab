"""The search loop (harness/search/loop.py) against the paths it replaced, side by side.

Before it, `harness search` ran sequential trials through Optuna's ``study.optimize`` and
``--batch K`` through a loop of its own, and ``--max-trials`` was held by a replaced private Optuna
method at trial creation. This runs the same whole commands with the harness of ``--old`` (a git
revision, extracted with ``git archive`` into a temporary folder) and with this working tree's,
interleaved, each in a fresh directory, and prints the ratios (new / old; 1.00x: it costs nothing):

- a 200-trial default search (TPE seed 0, pruning off, embedded stores, full tracking);
- the same with ``--max-trials 200`` (the cap checked before every trial);
- ``--batch 32``.

    python benchmarks/search_loop.py [--old REV] [--trials 200] [--repeats 2]
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import search_overhead  # a whole command's wall time, in a fresh directory, without MLFLOW_*/OPTUNA_*

ROOT = Path(__file__).resolve().parents[1]
BASE = ["search", "--pruner", "none", "--sampler", "tpe", "--seed", "0", "--no-progress"]


def timed(harness_root: Path, args: list[str]) -> float:
    return search_overhead.timed(["env", f"PYTHONPATH={harness_root}", sys.executable, "-m", "harness", *args])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="8125756", help="the revision before the loop (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n = str(args.trials)
    sides = {"default": [*BASE, "--n-trials", n], "--max-trials": [*BASE, "--n-trials", n, "--max-trials", n],
             "--batch 32": [*BASE, "--n-trials", n, "--batch", "32"]}
    with tempfile.TemporaryDirectory(prefix="old-harness-") as old:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old, "harness"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        times = {(name, side): [] for name in sides for side in ("old", "new")}
        for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both sides
            for name, command in sides.items():
                times[name, "old"].append(timed(Path(old), command))
                times[name, "new"].append(timed(ROOT, command))
                print(f"{name}: old {times[name, 'old'][-1]:.2f}s, new {times[name, 'new'][-1]:.2f}s", flush=True)
    print(f"trials: {args.trials}, repeats: {args.repeats}, old: {args.old} (medians of whole-command wall times)")
    for name in sides:
        o, w = statistics.median(times[name, "old"]), statistics.median(times[name, "new"])
        print(f"{name:13s} old {o:6.2f}s {[round(x, 2) for x in times[name, 'old']]}  "
              f"new {w:6.2f}s {[round(x, 2) for x in times[name, 'new']]}  new/old {w / o:.2f}x")


if __name__ == "__main__":
    main()
