"""Where a tracked trial's time goes, and which way of writing MLflow runs keeps training fastest.

1. CPU milliseconds per trial by kind of store write (run creation and params, artifacts, metrics,
   tags and status), on MLflow's public path (create_run, log_batch, log_artifacts, set_terminated)
   and on the harness's path (harness/sink.py: artifacts written into the run's local folder, the
   rest in one SQL transaction, harness/fast/mlflow_sql.py), beside the CPU of training the trial itself.
2. Wall time of the same trials trained and written four ways, interleaved, side by side: untracked;
   inline (the sink called in the training thread); a thread executor (what `harness search` does);
   MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``); and a writer process
   (``ProcessPoolExecutor`` with an initializer).

    python benchmarks/tracking_path.py [--trials 60] [--repeats 3]

Trials are the default space's reference configurations (epochs 50-400, the six pairs), on a fresh
SQLite store (MLflow's default) per run, with the full record each trial logs.
"""
import argparse
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import compat, config, schema, tracking, training  # noqa: E402
from harness.experiment import load  # noqa: E402
from harness.fast.mlflow_sql import sink_for  # noqa: E402
from harness.sink import MlflowSink  # noqa: E402

PAIRS = ["sgd+l1", "sgd+mse", "adam+l1", "adam+mse", "adamw+smooth_l1", "rmsprop+huber"]


def configs(n: int, experiment, data) -> list:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        optimizer, loss = rng.choice(PAIRS).split("+")
        values = {"experiment": "linear_regression", "optimizer": optimizer, "loss": loss,
                  "lr": 10 ** rng.uniform(-4, -1), "epochs": rng.randint(50, 400), "seed": 42, "device": "cpu"}
        cfg, _ = config.resolve(values, experiment=experiment, n_train=data.n_train)
        out.append(cfg)
    return out


def store(tmp: str) -> MlflowSink:
    client = tracking.open_client(f"sqlite:///{tmp}/mlflow.db")
    client.create_experiment("bench")
    return sink_for(client)


def record_of(cfg, result, number: int):
    rec = tracking.record(result, {schema.TRIAL_NUMBER_PARAM: number}, {schema.TRIAL_STATE_TAG: "COMPLETE"})
    return tracking.params_of(cfg, {schema.TRIAL_NUMBER_PARAM: number}), replace(rec, params={})


# ---- 1. CPU per kind of write -------------------------------------------------------------------

def cpu_by_kind(cfgs, experiment, data) -> None:
    trained = []
    train_cpu = 0.0
    for cfg in cfgs:
        start = time.process_time()
        trained.append(training.train(cfg, experiment, data))
        train_cpu += time.process_time() - start
    rows = {}
    for path in ("public", "direct"):
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            sink = store(tmp)
            client, direct = sink.client, sink._direct
            if path == "public":
                direct = None
            kinds = dict.fromkeys(("run creation + params", "artifacts", "metrics", "tags + status"), 0.0)
            for number, (cfg, result) in enumerate(zip(cfgs, trained)):
                params, rec = record_of(cfg, result, number)
                tags = {schema.TRIAL_NUMBER_TAG: str(number)}
                t = time.process_time()
                if direct:
                    run_id = sink.create_run("1", f"trial-{number}", tags, params)
                else:
                    run_id = client.create_run("1", run_name=f"trial-{number}", tags=tags).info.run_id
                    client.log_batch(run_id, params=tracking.param_list(params))
                kinds["run creation + params"] += time.process_time() - t
                t = time.process_time()
                if direct:
                    sink.write(run_id, replace(rec, history={}, finals={}, tags={}), None)  # the artifacts alone
                else:
                    tracking.write(client, run_id, replace(rec, history={}, finals={}, tags={}))
                kinds["artifacts"] += time.process_time() - t
                metrics = [(k, v, s) for k, vs in rec.history.items() for s, v in enumerate(vs)]
                metrics += [(k, v, 0) for k, v in rec.finals.items()]
                t = time.process_time()
                if direct:
                    direct.write(run_id, metrics, rec.tags, {}, "FINISHED")
                    kinds["metrics"] += time.process_time() - t
                else:
                    tracking.write(client, run_id, replace(rec, tags={}, artifacts={}))
                    kinds["metrics"] += time.process_time() - t
                    t = time.process_time()
                    client.log_batch(run_id, tags=tracking.tag_list(rec.tags))
                    client.set_terminated(run_id, "FINISHED")
                    kinds["tags + status"] += time.process_time() - t
            rows[path] = kinds
    n = len(cfgs)
    values = sum(len(v) for r in trained for v in r.history.values.values()) / n
    print(f"\n1. CPU ms per trial ({n} trials, {values:.0f} metric values a trial on average; SQLite)")
    print(f"{'kind of write':<28}{'MLflow public path':>24}{'harness path':>18}")
    for kind in rows["public"]:
        label = "metrics + tags + status" if kind == "metrics" else kind
        print(f"{label:<28}{rows['public'][kind] / n * 1000:>24.1f}{rows['direct'][kind] / n * 1000:>18.1f}")
    totals = {p: sum(r.values()) / n * 1000 for p, r in rows.items()}
    print(f"{'store, total':<28}{totals['public']:>24.1f}{totals['direct']:>18.1f}")
    print(f"{'training the trial':<28}{train_cpu / n * 1000:>24.1f}{train_cpu / n * 1000:>18.1f}")


# ---- 2. ways of writing, side by side -----------------------------------------------------------

_SINK = None


def _init(uri: str) -> None:
    global _SINK
    _SINK = sink_for(tracking.open_client(uri))


def _create(name: str, tags: dict, params: dict) -> str:
    return _SINK.create_run("1", name, tags, params)


def _write(run_id: str, rec) -> None:
    _SINK.write(run_id, rec, "FINISHED")


def timed_search(mode: str, cfgs, experiment, data) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        if mode != "untracked":
            store(tmp)
        pool = None
        if mode == "thread executor":
            _init(uri)
            pool = ThreadPoolExecutor(1)
        elif mode == "writer process":
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                                       initargs=(uri,))
            pool.submit(int).result()  # started before the clock, as the search starts it while loading
        elif mode in ("inline", "mlflow async"):
            _init(uri)
        pending = []
        start = time.perf_counter()
        for number, cfg in enumerate(cfgs):
            tags = {schema.TRIAL_NUMBER_TAG: str(number)}
            if pool is not None:
                created = pool.submit(_create, f"trial-{number}", tags,
                                      tracking.params_of(cfg, {schema.TRIAL_NUMBER_PARAM: number}))
            result = training.train(cfg, experiment, data)
            if mode == "untracked":
                continue
            params, rec = record_of(cfg, result, number)
            if pool is not None:
                pending.append(pool.submit(_write, created.result(), rec))
            elif mode == "inline":
                _write(_create(f"trial-{number}", tags, params), rec)
            else:  # MLflow's own async logging (its public path): its queue and threads, then the status
                from mlflow.entities import Metric

                client = _SINK.client
                run_id = _create(f"trial-{number}", tags, params)
                _SINK.write(run_id, replace(rec, history={}, finals={}, tags={}), None)  # the artifacts
                now = int(time.time() * 1000)
                metrics = [Metric(k, v, now, s) for k, vs in rec.history.items() for s, v in enumerate(vs)]
                metrics += [Metric(k, v, now, 0) for k, v in rec.finals.items()]
                for i in range(0, len(metrics), 1000):
                    pending.append(client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=False))
                pending.append(client.log_batch(run_id, tags=tracking.tag_list(rec.tags), synchronous=False))
                pending.append(run_id)
        for item in pending:
            if isinstance(item, str):
                _SINK.client.set_terminated(item, "FINISHED")
            elif hasattr(item, "wait"):
                item.wait()
            else:
                item.result()
        if pool is not None:
            pool.shutdown(wait=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    experiment = load("linear_regression")
    data = experiment.load_data()
    cfgs = configs(args.trials, experiment, data)
    import mlflow

    print(f"MLflow {mlflow.__version__} (one-transaction path {'on' if compat.mlflow_tested() else 'OFF'}), "
          f"{os.cpu_count()} CPUs")
    cpu_by_kind(cfgs, experiment, data)
    modes = ("untracked", "inline", "thread executor", "mlflow async", "writer process")
    times = {m: [] for m in modes}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits every mode
        for mode in modes:
            times[mode].append(timed_search(mode, cfgs, experiment, data))
    base = statistics.median(times["untracked"])
    print(f"\n2. {args.trials} trials trained and written, wall time (median of {args.repeats}, interleaved)")
    for mode in modes:
        median = statistics.median(times[mode])
        print(f"{mode:<18}{median:>8.2f}s  {median / base:>5.2f}x untracked   {[round(t, 2) for t in times[mode]]}")


if __name__ == "__main__":
    main()
