"""How often to report to the pruner: each cadence's cost on each embedded storage, side by side.

The same trials of the default space (TPE with one seed, the median pruner: the harness's own
``make_sampler("tpe", ...)`` and ``make_pruner("median")``, what `harness search` uses) run through
the harness's ``Objective`` on Optuna's in-memory storage, the journal file (``journal:PATH``,
harness.search.study.open_storage) and SQLite (``sqlite:///PATH``, the same), at each cadence:

- ``every 1``: a report every epoch (the default on the embedded stores before this benchmark);
- ``fixed 10``: a report every 10 epochs (the default on a database server before it);
- ``e//50``, ``e//20``: every max(1, epochs // K) epochs, from the trial's own epochs;
- ``max//50``, ``max//20``: every max(1, high // K) epochs, from the space's epochs upper bound,
  one cadence for the whole study (so every trial reports at the same steps, which the median
  pruner compares: a per-trial cadence reports at steps other trials never report at). ``max//20``
  is the default now (harness.search.space.report_cadence).

1. Untracked (``track=False``): wall time of ``create_study`` + ``optimize``, the trials pruned
   and the epochs trained, and the ratio to the in-memory search at every-epoch cadence (the
   target: <= 1.3x) and to the in-memory search at the same cadence (the storage's own cost).
2. Tracked (``track=True``, MLflow on a fresh ``sqlite:///<tmp>/mlflow.db``, created before the
   clock starts), on the journal and SQLite: what users run. The time includes the study summary
   that ``Objective.close()`` writes.
3. With ``--wal``, also SQLite with the Optuna database in WAL mode (``harness.tracking.use_wal``,
   which the harness applies to the MLflow store only) and ``PRAGMA synchronous=NORMAL``, untracked:
   how much of SQLite's cost is waiting for the disk at each commit.

The every-epoch cadence on the journal and SQLite runs ``--every-epoch-repeats`` times only (default
1): on SQLite it is by far the slowest side, and it is the one already known to miss the target.

Every side runs in this one process, interleaved, each in a fresh temporary folder; medians of
``--repeats`` runs. The sampler's seed is the same on every side, so at one cadence every storage
runs the same trials and prunes the same ones.

    python benchmarks/pruning_cadence.py [--trials 30] [--repeats 3] [--seed 0] [--no-tracked] [--wal]
                                         [--every-epoch-repeats 1]
"""
import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from harness import tracking  # noqa: E402
from harness.experiment import load  # noqa: E402
from harness.search import objective as objective_module  # noqa: E402
from harness.search import space as space_module  # noqa: E402
from harness.search import trials as trials_module  # noqa: E402
from harness.search.study import make_pruner, make_sampler, open_storage  # noqa: E402

EXPERIMENT = "linear_regression"
STORAGES = ("memory", "journal", "sqlite")


def cadences(space) -> dict:
    """Name -> rule: the trial's epochs -> report every N epochs."""
    high = space.epochs[1]
    return {
        "every 1": lambda epochs: 1,
        "fixed 10": lambda epochs: 10,
        "e//50": lambda epochs: max(1, epochs // 50),
        "e//20": lambda epochs: max(1, epochs // 20),
        f"max//50={max(1, high // 50)}": lambda epochs: max(1, high // 50),
        f"max//20={max(1, high // 20)}": lambda epochs: max(1, high // 20),
    }


class RuleObjective(objective_module.Objective):
    """The harness's Objective with the report cadence a function of the trial's epochs.

    ``Objective`` takes one ``report_every`` for every trial; its trial runner's ``_observers`` runs
    after the trial's config is sampled, so the trial's epochs are known there."""

    def __init__(self, *args, rule, **kwargs):
        super().__init__(*args, **kwargs)
        observers = self._runner._observers

        def with_rule(trial) -> list:
            return [trials_module._Reporter(trial, rule(trial.params["epochs"]), o.metric)
                    if isinstance(o, trials_module._Reporter) else o for o in observers(trial)]
        self._runner._observers = with_rule


def run_side(storage_name: str, rule, trials: int, seed: int, track: bool, experiment, data, space) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-cadence-") as tmp:
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        if track:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
            tracking.open_client(os.environ["MLFLOW_TRACKING_URI"])  # the store's schema, before the clock
        try:
            objective = RuleObjective(experiment, space, track=track, data=data, rule=rule, device="cpu")
            start = time.perf_counter()
            storage = (None if storage_name == "memory" else
                       open_storage(f"journal:{tmp}/optuna_journal.log") if storage_name == "journal" else
                       open_storage(f"sqlite:///{tmp}/optuna.db"))
            if storage_name == "sqlite-wal":
                # WAL (what tracking.use_wal does to the MLflow store, here on Optuna's database) with
                # synchronous=NORMAL on every connection: a commit no longer waits for the disk; a
                # power cut may lose the last commits, a crashed process loses nothing.
                from sqlalchemy import event

                event.listen(storage.engine, "connect",
                             lambda connection, record: connection.execute("PRAGMA synchronous=NORMAL"))
                storage.engine.dispose()
                tracking.use_wal(f"sqlite:///{tmp}/optuna.db")
            study = optuna.create_study(study_name="cadence", storage=storage, direction="minimize",
                                        sampler=make_sampler("tpe", seed, space), pruner=make_pruner("median"))
            with objective:
                study.optimize(objective, n_trials=trials)
            elapsed = time.perf_counter() - start
            finished = study.get_trials(deepcopy=False)
            pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in finished)
            failed = sum(t.state == optuna.trial.TrialState.FAIL for t in finished)
            # Epochs trained: a pruned trial stopped right after its last report.
            epochs = sum(max(t.intermediate_values) + 1 if t.state == optuna.trial.TrialState.PRUNED
                         else t.params["epochs"] for t in finished)
            reports = sum(len(t.intermediate_values) for t in finished)
            at_first = sum(t.state == optuna.trial.TrialState.PRUNED and max(t.intermediate_values) == 0
                           for t in finished)
            best = study.best_value
            with contextlib.suppress(Exception):
                if storage is not None and hasattr(storage, "engine"):
                    storage.remove_session()
                    storage.engine.dispose()
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved
    return {"seconds": elapsed, "pruned": pruned, "failed": failed, "epochs": epochs, "reports": reports,
            "at_first": at_first, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed, the same on every side")
    parser.add_argument("--no-tracked", action="store_true", help="skip the tracked table")
    parser.add_argument("--wal", action="store_true",
                        help="also run SQLite with the Optuna database in WAL mode (as harness.tracking.use_wal "
                             "puts the MLflow store) and synchronous=NORMAL, untracked")
    parser.add_argument("--every-epoch-repeats", type=int, default=1,
                        help="repeats of the every-epoch cadence on the journal and SQLite (default 1: on SQLite "
                             "it is by far the slowest side, and the one already known to miss the target)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.simplefilter("ignore")

    experiment = load(EXPERIMENT)
    data = experiment.load_data()
    space = space_module.resolve(experiment, n_train=data.n_train)
    rules = cadences(space)
    storages = STORAGES + (("sqlite-wal",) if args.wal else ())
    sides = [(s, c, False) for c in rules for s in storages]
    if not args.no_tracked:
        sides += [(s, c, True) for c in rules for s in ("journal", "sqlite")]
    results: dict = {side: [] for side in sides}
    started = time.perf_counter()
    for storage_name, track in (("memory", False), ("journal", False), ("sqlite", False), ("sqlite", True)):
        run_side(storage_name, rules["fixed 10"], 2, args.seed, track, experiment, data, space)  # warm-up, untimed
    for repeat in range(args.repeats):  # interleaved, so drift in the machine's speed hits every side
        for side in sides:
            storage_name, cadence, track = side
            if cadence == "every 1" and storage_name != "memory" and repeat >= args.every_epoch_repeats:
                continue
            results[side].append(run_side(storage_name, rules[cadence], args.trials, args.seed, track,
                                          experiment, data, space))
        print(f"repeat {repeat + 1}/{args.repeats} done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)

    def median(side) -> float:
        return statistics.median(r["seconds"] for r in results[side])

    print(f"space: epochs {space.epochs[0]}-{space.epochs[1]}, {len(space.pairs)} pairs; {args.trials} trials, "
          f"TPE seed {args.seed}, median pruner; {args.repeats} repeats, medians of create_study + optimize")
    reference = median(("memory", "every 1", False))
    header = (f"{'cadence':<12} {'storage':<10} {'median s':>8} {'vs mem@1':>8} {'vs mem@same':>11} "
              f"{'pruned':>6} {'at 0':>4} {'epochs':>7} {'reports':>7} {'best loss':>9}  runs (s)")
    print(f"\n1. untracked (Objective(track=False)); reference: in-memory, every epoch = {reference:.2f}s")
    print(header)
    for cadence in rules:
        same = median(("memory", cadence, False))
        for storage_name in storages:
            side = (storage_name, cadence, False)
            print(row(cadence, storage_name, results[side], median(side), reference, same))
    if not args.no_tracked:
        print("\n2. tracked (Objective(track=True), MLflow sqlite:///<tmp>/mlflow.db); ratios to the same "
              "untracked in-memory references")
        print(header)
        for cadence in rules:
            same = median(("memory", cadence, False))
            for storage_name in ("journal", "sqlite"):
                side = (storage_name, cadence, True)
                print(row(cadence, storage_name, results[side], median(side), reference, same))
    print("\npruned: trials pruned (at 0: at the first report, epoch 0); epochs: epochs trained in all; "
          "reports: intermediate values written")
    print("meets <= 1.3x of in-memory every-epoch, untracked, on both journal and SQLite: "
          + (", ".join(c for c in rules
                       if all(median((s, c, False)) <= 1.3 * reference for s in ("journal", "sqlite")))
             or "none"))
    if args.wal:
        print("meets <= 1.3x of in-memory every-epoch, untracked, on both journal and SQLite in WAL mode: "
              + (", ".join(c for c in rules
                           if all(median((s, c, False)) <= 1.3 * reference for s in ("journal", "sqlite-wal")))
                 or "none"))
    print(f"total wall time: {time.perf_counter() - started:.0f}s")


def row(cadence: str, storage_name: str, runs: list[dict], med: float, reference: float, same: float) -> str:
    first = runs[0]
    varies = any((r["pruned"], r["epochs"]) != (first["pruned"], first["epochs"]) for r in runs)
    failed = f" failed {first['failed']}" if first["failed"] else ""
    return (f"{cadence:<12} {storage_name:<10} {med:>8.2f} {med / reference:>7.2f}x {med / same:>10.2f}x "
            f"{first['pruned']:>6} {first['at_first']:>4} {first['epochs']:>7} {first['reports']:>7} {first['best']:>9.3g}  "
            f"{[round(r['seconds'], 2) for r in runs]}{' (counts vary by repeat)' if varies else ''}{failed}")


if __name__ == "__main__":
    main()
