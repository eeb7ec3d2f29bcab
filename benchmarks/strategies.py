"""Which search strategy to pick, from figures: every sampler's best value after 20, 50 and 100
trials, and every pruner's cost to reach a target, on the reference space and on the
classification experiment.

Samplers: each of `harness search`'s samplers (no pruner) runs --trials trials per sampler seed
through the harness's ``Objective`` (untracked: the strategy is measured, not the stores); the
table holds the median over the seeds of the best final test loss after each checkpoint. The grid
sampler's order is fixed (its seed only shuffles it).

Pruners: TPE with each pruner (its default settings, the harness's report cadence) per seed. The
target is the median best value that TPE without a pruner reaches after --target-after trials, or
--target (an absolute value: on the reference space that median is already an exact fit, 0, by 20
trials). The table holds, per pruner, in how many seeds a trial reached the target within --trials
trials, the median number of trials and of epochs trained until then (epochs are what pruning
saves), and the epochs the whole study trained.

    python benchmarks/strategies.py [--experiments linear_regression binary_classification]
        [--samplers ...] [--pruners ...] [--seeds 5] [--trials 100] [--checkpoints 20 50 100] [--target-after 20 | --target X] [--jobs 2]

Seeds run in parallel processes (--jobs); each study is in memory, so sides share nothing. The full
run takes hours on a small machine: --records FILE keeps each finished study (one JSON line), and a
rerun with the same FILE and settings trains only the studies it lacks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from harness import Objective  # noqa: E402
from harness.experiment import load  # noqa: E402
from harness.search import space as space_module  # noqa: E402
from harness.search import study as study_module  # noqa: E402

_OBJECTIVES: dict = {}  # experiment name -> Objective, one per worker process (data loaded once)


def _objective(experiment_name: str) -> tuple[Objective, space_module.SearchSpace]:
    if experiment_name not in _OBJECTIVES:
        experiment = load(experiment_name)
        space = space_module.resolve(experiment, n_train=experiment.load_data().n_train)
        _OBJECTIVES[experiment_name] = (Objective(experiment, space, track=False), space)
    return _OBJECTIVES[experiment_name]


def search(experiment_name: str, sampler: str, pruner: str, seed: int, trials: int) -> list[tuple[float | None, int]]:
    """One study; per trial in order: (its final test loss, None unless COMPLETE; epochs trained)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    objective, space = _objective(experiment_name)
    study = optuna.create_study(sampler=study_module.make_sampler(sampler, seed, space),
                                pruner=study_module.make_pruner(pruner))
    study.optimize(objective, n_trials=trials)
    out = []
    for trial in study.trials:
        complete = trial.state == TrialState.COMPLETE
        epochs = trial.params["epochs"] if complete else (max(trial.intermediate_values, default=0) + 1)
        out.append((trial.value if complete else None, epochs))
    return out


def best_after(record: list, n: int) -> float:
    values = [v for v, _ in record[:n] if v is not None]
    return min(values) if values else float("nan")


def to_target(record: list, target: float) -> tuple[int, int] | None:
    """(trials, epochs trained) until a trial reached ``target``; None if none did."""
    epochs = 0
    for index, (value, trained) in enumerate(record, start=1):
        epochs += trained
        if value is not None and value <= target:
            return index, epochs
    return None


def _load(path: Path | None, trials: int) -> dict:
    """The studies a former run with these --trials kept in ``path`` ({side: record})."""
    if path is None or not path.exists():
        return {}
    found = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {tuple(item["side"]): [tuple(trial) for trial in item["record"]] for item in found
            if item["trials"] == trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=["linear_regression", "binary_classification"])
    parser.add_argument("--samplers", nargs="+", default=list(study_module.SAMPLERS))
    parser.add_argument("--pruners", nargs="*", default=list(study_module.PRUNERS),
                        help="none given: no pruner table")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--target-after", type=int, default=20,
                        help="the target: TPE's median best value without a pruner after this many trials")
    parser.add_argument("--target", type=float,
                        help="an absolute target instead (where TPE's median already is an exact fit, 0)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--records", type=Path, help="JSON lines of finished studies: kept as they finish, "
                                                     "and a rerun skips those it finds (same --trials)")
    args = parser.parse_args()
    started = time.time()
    seeds = range(args.seeds)
    sides = [(e, s, "none", seed) for e in args.experiments for s in args.samplers for seed in seeds]
    # The pruners' runs, with TPE without one as their baseline (also when tpe is not among --samplers).
    pruned = [(e, "tpe", p, seed) for e in args.experiments for p in ["none"] * bool(args.pruners) + args.pruners
              for seed in seeds]
    sides += [side for side in dict.fromkeys(pruned) if side not in sides]
    records = _load(args.records, args.trials)
    with ProcessPoolExecutor(args.jobs) as pool:
        running = {pool.submit(search, *side, args.trials): side for side in sides if side not in records}
        for future in as_completed(running):
            side, record = running[future], future.result()
            records[side] = record
            if args.records:
                with args.records.open("a") as out:
                    out.write(json.dumps({"side": side, "trials": args.trials, "record": record}) + "\n")
    print(f"{args.trials} trials per study, {args.seeds} sampler seeds, medians over the seeds; untracked; "
          f"{os.cpu_count()} cores, {args.jobs} processes; {time.time() - started:.0f}s")
    for experiment in args.experiments:
        rows = []
        for sampler in args.samplers:
            row = {"sampler": sampler}
            for n in args.checkpoints:
                row[f"best after {n}"] = statistics.median(best_after(records[(experiment, sampler, "none", s)], n)
                                                         for s in seeds)
            rows.append(row)
        print(f"\n{experiment}: best final test loss per sampler (no pruner)")
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        if not args.pruners:
            continue
        target = args.target if args.target is not None else statistics.median(
            best_after(records[(experiment, "tpe", "none", s)], args.target_after) for s in seeds)
        rows = []
        for pruner in args.pruners:
            reached = [to_target(records[(experiment, "tpe", pruner, s)], target) for s in seeds]
            got = [r for r in reached if r is not None]
            rows.append({"pruner": pruner, "reached": f"{len(got)}/{len(reached)}",
                         "trials": statistics.median(t for t, _ in got) if got else float("nan"),
                         "epochs trained": statistics.median(e for _, e in got) if got else float("nan"),
                         "epochs in all trials": statistics.median(
                             sum(e for _, e in records[(experiment, "tpe", pruner, s)]) for s in seeds)})
        origin = ("--target" if args.target is not None
                  else f"TPE's median best after {args.target_after} trials without one")
        print(f"\n{experiment}: TPE with each pruner, to reach {target:.3g} ({origin}); medians over the seeds "
              "that reached it; epochs in all trials: the whole study's training")
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.0f}"))


if __name__ == "__main__":
    main()
