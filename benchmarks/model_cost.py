"""What the MLflow Model at the end of a search costs, and why it is torch.export's format.

cost: a default 20-trial `harness search` (in-process, a fresh store and journal each time), its
wall time from start to the record closed, with the model and without (search.publish replaced by
nothing), interleaved, and the part spent logging the best trial as an MLflow Model (search.publish,
timed where the session calls it). Medians of ``--repeats``.

format: one trained model of ``--experiment`` saved as an MLflow Model both ways MLflow 3.17 offers,
``pt2`` (torch.export) and ``pickle`` (torch.save of the module): save seconds, size on disk, and,
in a fresh interpreter each (mlflow and torch imported first), the seconds `mlflow.pyfunc.load_model`
takes the first time and the next, and which modules of the
experiment's code loading imported (pickle must import the class its file names; MLflow refuses it
unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true, which the benchmark sets for that load only).

    python benchmarks/model_cost.py [cost|format|both] [--experiment linear_regression] [--repeats 3]
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


def cost(experiment: str, repeats: int) -> None:
    from harness.cli import build_parser
    from harness.fast import batched
    from harness.fast.mlflow_sql import DirectWriter
    from harness.search import session
    from harness.search.options import SearchOptions

    spent: list[float] = []
    original = session.publish

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    walls: dict[str, list[float]] = {"without": [], "with": []}
    logs = []
    for _ in range(repeats):
        for way in walls:  # interleaved: the machine's load drifts
            session.publish = timed if way == "with" else (lambda *args, **kwargs: [])
            folder = Path(tempfile.mkdtemp(prefix="harness-bench-"))
            before = os.getcwd()
            try:
                os.chdir(folder)
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
                args = build_parser().parse_args(["search", "--experiment", experiment, "--no-progress"])
                started = time.perf_counter()
                outcome = session.run_search(SearchOptions.from_args(  # as `harness search` hands them in
                    args, sql_writer=DirectWriter.for_client, stacker=batched))
                walls[way].append(time.perf_counter() - started)
                assert outcome.failure is None and not outcome.interrupted, outcome
                if way == "with":
                    assert outcome.published, "no model was logged"
                    logs.append(spent[-1])
            finally:
                os.chdir(before)
                shutil.rmtree(folder, ignore_errors=True)
    session.publish = original
    wall, logged = statistics.median(walls["with"]), statistics.median(logs)
    print(f"cost: 20-trial default search of {experiment}, {repeats} repeats, interleaved: wall with the model "
          f"{wall:.2f} s (runs: {', '.join(f'{w:.1f}' for w in walls['with'])}), without "
          f"{statistics.median(walls['without']):.2f} s (runs: {', '.join(f'{w:.1f}' for w in walls['without'])}); "
          f"logging the best trial's MLflow Model {logged:.3f} s (runs: {', '.join(f'{s:.3f}' for s in logs)}) "
          f"= {100 * logged / wall:.2f}% of the wall time")


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
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.what in ("format", "both"):
        fmt(args.experiment, args.repeats)
    if args.what in ("cost", "both"):
        cost(args.experiment, args.repeats)


if __name__ == "__main__":
    main()
