"""What provenance (harness.provenance: git, packages, data, machine) costs a default search.

A 20-trial `harness search` of the default experiment into a fresh working folder (MLflow's SQLite
store, Optuna's journal), each in a process of its own (provenance is worked out once per process:
a process's first run pays for it), two ways, interleaved, medians of ``--repeats``:
- on: as `harness search` runs;
- off: the same with provenance's tags and artifacts left out (the functions that make them replaced).
Printed: each way's wall seconds (the command's main(), interpreter start-up left out), the seconds
spent in provenance itself (on), and the ratios.

    python benchmarks/provenance_cost.py [--trials 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from harness import provenance

spent = [0.0]


def timed(fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started
    return wrapper


if sys.argv[1] == "off":
    provenance.run_tags = lambda *args, **kwargs: {}
    provenance.artifacts = lambda *args, **kwargs: {}
else:
    provenance.run_tags, provenance.artifacts = timed(provenance.run_tags), timed(provenance.artifacts)
from harness.cli import main

started = time.perf_counter()
status = main(["search", "--n-trials", sys.argv[2], "--no-progress"])
print(json.dumps({"status": status, "wall": time.perf_counter() - started, "provenance": spent[0]}))
"""


def run(way: str, trials: int) -> dict:
    folder = tempfile.mkdtemp(prefix="harness-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTUNA_"))}
    env["PYTHONPATH"] = str(ROOT)
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, way, str(trials)], cwd=folder, env=env,
                              capture_output=True, text=True, check=True)
        found = json.loads(done.stdout.strip().splitlines()[-1])
        assert found["status"] == 0, done.stderr
        return found
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    found: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for way in found:  # interleaved: a machine's drift lands on both ways alike
            found[way].append(run(way, args.trials))
    off = statistics.median(r["wall"] for r in found["off"])
    on = statistics.median(r["wall"] for r in found["on"])
    spent = statistics.median(r["provenance"] for r in found["on"])
    print(f"{args.trials}-trial default search, medians of {args.repeats} (each in a fresh process and folder):")
    print(f"  off  {off:8.2f} s wall")
    print(f"  on   {on:8.2f} s wall   {on / off:6.3f}x off")
    print(f"  provenance itself: {spent:.3f} s, {100 * spent / on:.2f}% of the search's wall time")


if __name__ == "__main__":
    main()
