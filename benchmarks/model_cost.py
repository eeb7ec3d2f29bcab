"""What the MLflow Model at the end of a search costs, and why it is torch.export's format.

cost: a default 20-trial `harness search`, each in a fresh process with a fresh store and journal
(a `harness search` always logs the first MLflow Model of its process), its wall time from start to
the record closed: without the model (search.publish replaced by nothing) and with it, interleaved;
the part spent logging the best trial as an MLflow Model (search.publish, timed where the session
calls it), and the difference of the walls (what the model costs a search in all, up to the walls'
noise). Medians of ``--repeats``.

format: one trained model of ``--experiment`` saved as an MLflow Model both ways MLflow 3.17 offers,
``pt2`` (torch.export) and ``pickle`` (torch.save of the module): save seconds, size on disk, and,
in a fresh interpreter each (mlflow and torch imported first), the seconds `mlflow.pyfunc.load_model`
takes the first time and the next, and which modules of the
experiment's code loading imported (pickle must import the class its file names; MLflow refuses it
unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true, which the benchmark sets for that load only).

beside (a way of ``cost``, not the harness's): without the model, and a process started beside the
search that does the model's first-use work (the imports, MLflow's map of installed modules) while
the trials train, as a search that logged its model from such a process would: what overlapping
that work costs the trials.

    python benchmarks/model_cost.py [cost|format|both] [--experiment linear_regression] [--repeats 3]
                                    [--ways without,with,beside]
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOAD = """
import json, sys, time
started = time.perf_counter()
import mlflow.pyfunc, mlflow.pytorch, torch  # both ways need these: not counted in the load
imported = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter()
mlflow.pyfunc.load_model(sys.argv[1])  # again: what a process that has loaded one model pays for the next
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "again_s": time.perf_counter() - loaded,
                  "experiment_modules": sorted(m for m in sys.modules if m.startswith(("experiments", "harness")))}))
"""


# One search in a fresh process (what `harness search` pays: the first MLflow Model of a process),
# timed from run_search's start to its return; argv: experiment, way, the sampler's seed (the same
# trials each way: unseeded, digits_cnn's default search took 14 s to 250 s here by what it drew).
SEARCH = """
import json, os, sys, time
from harness.cli import build_parser
from harness.search import session
from harness.search.options import SearchOptions
from harness.fast import batched
from harness.fast.mlflow_sql import DirectWriter

experiment, way, seed = sys.argv[1:4]
spent = {"publish_s": 0.0}
publish = session.publish

def timed_publish(*args, **kwargs):
    started = time.perf_counter()
    try:
        return publish(*args, **kwargs)
    finally:
        spent["publish_s"] = time.perf_counter() - started

session.publish = timed_publish if way == "with" else (lambda *args, **kwargs: [])
args = build_parser().parse_args(["search", "--experiment", experiment, "--no-progress", "--seed", seed])
if way == "beside":  # the model's first-use work in a process of its own, overlapping the trials
    import subprocess
    beside = subprocess.Popen([sys.executable, "-c", sys.argv[4]])
started = time.perf_counter()
outcome = session.run_search(SearchOptions.from_args(  # the fast paths handed in, as `harness search` does
    args, sql_writer=DirectWriter.for_client, stacker=batched))
wall = time.perf_counter() - started
assert outcome.failure is None and not outcome.interrupted, outcome
assert (way == "with") == bool(outcome.published), outcome.published
if way == "beside":
    beside.wait()
print(json.dumps({"wall_s": wall, **spent}))
"""
# What a process started beside the search would do before the last trial, for the model to cost
# only its trace and writes at the end: import torch's export machinery and MLflow's flavor, and
# build MLflow's map of installed modules (its requirements check).
BESIDE = """
import mlflow.pytorch, torch.export, torch._functorch.aot_autograd
from mlflow.utils.requirements_utils import _init_packages_to_modules_map
_init_packages_to_modules_map()
"""
WAYS = {"without": "without the model", "with": "with the model",
        "beside": "without the model, its first-use work in a process beside the trials"}


def cost(experiment: str, repeats: int, ways: list[str], seed: int) -> None:
    measured: dict[str, list[dict]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way in ways:  # interleaved: the machine's load drifts
            folder = Path(tempfile.mkdtemp(prefix="harness-bench-"))
            try:
                env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
                out = subprocess.run([sys.executable, "-c", SEARCH, experiment, way, str(seed), BESIDE], env=env,
                                     cwd=folder, capture_output=True, text=True, check=True)
                measured[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"cost: 20-trial default search of {experiment} (sampler seed {seed}), each in a fresh process, "
          f"{repeats} repeat(s) interleaved, load average at the end {load}")
    walls = {way: statistics.median(r["wall_s"] for r in rows) for way, rows in measured.items()}
    for way, rows in measured.items():
        runs = ", ".join(f"{r['wall_s']:.1f}" for r in rows)
        line = f"  {WAYS[way]}: wall {walls[way]:.2f} s (runs: {runs})"
        if way == "with":
            logs = [r["publish_s"] for r in rows]
            logged = statistics.median(logs)
            line += (f"; logging the best trial's MLflow Model {logged:.3f} s (runs: "
                     f"{', '.join(f'{s:.3f}' for s in logs)}) = {100 * logged / walls[way]:.2f}% of the wall")
        if way != "without" and "without" in walls:
            more = walls[way] - walls["without"]
            line += f"; the walls differ by {more:+.2f} s ({100 * more / walls['without']:+.1f}%)"
        print(line)


def fmt(experiment: str, repeats: int) -> None:
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from harness import config, training
    from harness.experiment import load
    from harness.models import input_example

    found = load(experiment)
    data = found.load_data()
    cfg, _ = config.resolve({"experiment": experiment, "device": "cpu", "epochs": 2}, experiment=found,
                            n_train=data.n_train)
    model = training.train(cfg, found, data).model.eval()
    example = input_example(found, data)
    with torch.inference_mode():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    rows = {}
    for way in ("pt2", "pickle"):
        saves, loads, agains, imports, sizes = [], [], [], set(), []
        for _ in range(repeats):
            folder = Path(tempfile.mkdtemp(prefix="harness-bench-")) / "model"
            try:
                started = time.perf_counter()
                mlflow.pytorch.save_model(model, str(folder), serialization_format=way, input_example=example,
                                          signature=signature, pip_requirements=["torch"])
                saves.append(time.perf_counter() - started)
                sizes.append(sum(p.stat().st_size for p in (folder / "data").rglob("*") if p.is_file()))
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                if way == "pickle":
                    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
                out = subprocess.run([sys.executable, "-c", LOAD, str(folder)], env=env, capture_output=True,
                                     text=True, check=True, cwd=folder.parent)
                measured = json.loads(out.stdout.strip().splitlines()[-1])
                loads.append(measured["load_s"])
                agains.append(measured["again_s"])
                imports.update(measured["experiment_modules"])
            finally:
                shutil.rmtree(folder.parent, ignore_errors=True)
        rows[way] = (statistics.median(saves), statistics.median(loads), statistics.median(agains),
                     statistics.median(sizes), sorted(imports))
    print(f"format: {experiment}'s model, medians of {repeats}")
    for way, (save, load_s, again, size, imported) in rows.items():
        print(f"  {way:6}  save {save:.3f} s  first load {load_s:.3f} s  next load {again:.3f} s  {size / 1024:.1f} KiB  "
              f"imports of the experiment's code: {', '.join(imported) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="both", choices=("cost", "format", "both"))
    parser.add_argument("--experiment", default="linear_regression")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="cost: the searches' sampler seed")
    parser.add_argument("--ways", default="without,with",
                        help=f"cost: which searches to run, of {', '.join(WAYS)} (comma-separated)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.what in ("format", "both"):
        fmt(args.experiment, args.repeats)
    if args.what in ("cost", "both"):
        ways = args.ways.split(",")
        if not set(ways) <= set(WAYS):
            parser.error(f"--ways {args.ways!r}: a comma-separated list of {', '.join(WAYS)}")
        cost(args.experiment, args.repeats, ways, args.seed)


if __name__ == "__main__":
    main()
