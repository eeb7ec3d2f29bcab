"""How many search workers one PostgreSQL and one `mlflow server` can serve, training taken out.

Starts both services on 127.0.0.1 (harness/cluster.py) in a temporary folder, then, for each N of
--clients, runs N client processes that each do, trial after trial, what one `harness search`
worker does against the services, with a precomputed record in place of training:

- Optuna, on the RDB storage opened as the harness opens it (``study.open_storage``: its heartbeat
  is the real one), through the search loop as the worker runs it (``loop.optimize``: the cap on
  the study's trials is the real one): stale-trial check, ``ask`` (under the cap's advisory lock), heartbeat, the worker's
  user attrs, ``space.sample`` over the reference space, ``report`` + ``should_prune`` every
  --report-every epochs, ``tell``.
- MLflow, through the tracking server, as ``TrialRecorder`` does per trial: ``MlflowSink.create_run``
  with the trial's params, then ``MlflowSink.write`` of the whole record (train_loss and test_loss
  over --epochs epochs, the finals, tags, state_dict.pt and config.json), FINISHED.

Unlike a worker, a client makes its MLflow writes inline (a worker's TrialRecorder overlaps them with
the next trial's training in threads): the services get the same requests, and a trial's Optuna and
MLflow latencies stay apart. The sampler is random by default, so that the clients' CPU stays flat
as the study grows (``--sampler tpe``, the harness's default, samples in the client, not in the
services). What a study does once (its parent run's summary) is left out.

Per N: completed trials per second; p50/p95/p99 of a trial's Optuna time (its whole cycle less its
MLflow time) and of its MLflow time (create + write), in ms; the cores busy in the measured window
for PostgreSQL's process tree, the mlflow server's process tree and the whole machine (whatever else
runs there included), and the clients' (each until its last trial ends); errors (any exception; the first message is kept). Then the
ceiling C (the highest throughput) and the largest W workers whose trials of T seconds the services
keep up with: W / T < C. On a small machine the clients share the cores with the services, so C is
that machine's; "services ms/trial" (their CPU per trial) is what carries over to a machine of
their own.

    python benchmarks/capacity.py [--clients 1 2 4 8 16] [--seconds 20] [--epochs 200]
                                  [--server-workers 2] [--report-every N] [--sampler random]

Each N runs for --seconds after a --warmup (not counted), or until the study holds --max-trials
trials (the harness's cap, warm-up included), whichever comes first.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from threading import BrokenBarrierError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from harness import cli, config, schema, tracking, training  # noqa: E402
from harness.cluster import Postgres, TrackingServer, create_database, environment, libpq_passfile  # noqa: E402
from harness.experiment import load  # noqa: E402
from harness.search import space as space_module  # noqa: E402
from harness.search import study as study_module  # noqa: E402
from harness.search import loop  # noqa: E402
from harness.search.durable.workers import identity  # noqa: E402
from harness.fast.mlflow_sql import sink_for  # noqa: E402
from harness.urls import engine_url  # noqa: E402

# The environment `harness search` runs its workers in (timeouts, retries, no run URL printed per
# run); set before the client processes start so that they inherit it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
for _name, _value in cli.NETWORK_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

EXPERIMENT = "linear_regression"
MODEL_T = (0.1, 1, 10, 60)  # training seconds per trial, for the capacity table
KNEE = 1.1  # N saturates the services when it brings less than 10% more throughput than the N before


@dataclass(frozen=True)
class Setup:
    """What a client needs to run one N's trials (picklable: it goes to the client processes)."""
    storage_url: str
    tracking_uri: str
    study_name: str
    sampler: str
    max_trials: int
    space: space_module.SearchSpace
    experiment_id: str
    parent_run_id: str
    params: dict[str, str]
    record: tracking.RunRecord
    reports: tuple[tuple[int, float], ...]  # (epoch, test loss) the pruner is shown
    value: float
    warmup: float
    seconds: float


# ---- the services ------------------------------------------------------------------------------

@contextlib.contextmanager
def started_services(root: Path, server_workers: int):
    """PostgreSQL and `mlflow server` as ``cluster.services`` starts them, which yields only the URLs:
    here the server's --workers is chosen and both processes are kept, to read their CPU time."""
    stack = contextlib.ExitStack()
    with stack:
        postgres = Postgres(root / "postgres").start()
        stack.callback(postgres.stop)
        stack.enter_context(libpq_passfile(postgres.passfile))
        for name in ("optuna", "mlflow"):
            create_database(postgres.url(), name)
        server = TrackingServer(engine_url(postgres.url("mlflow")), root, workers=server_workers)
        stack.callback(server.stop)
        server.start()
        stack.enter_context(environment(server.login))
        yield postgres, server


def postmaster_pid(postgres: Postgres) -> int:
    return int((postgres.data / "postmaster.pid").read_text().split()[0])


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and its descendants. A child's own time while it lives, its
    reaper's cutime/cstime once reaped, so backends that come and go are still counted."""
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                stats[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(stats[pid][1] for pid in tree if pid in stats) / CLOCK_TICKS


def settle(pids: list[int], quiet: float = 0.1, limit: float = 120) -> float:
    """Wait until the services idle (under ``quiet`` cores for a second): `mlflow server` answers
    /health while its job runner and consumers are still starting, which would weigh on the first N."""
    started, before = time.time(), sum(map(tree_cpu, pids))
    while time.time() - started < limit:
        time.sleep(1)
        now = sum(map(tree_cpu, pids))
        if now - before < quiet:
            break
        before = now
    return time.time() - started


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine so far (all but idle and iowait)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS


# ---- one client process ------------------------------------------------------------------------

class Client:
    """One worker's per-trial calls, as ``Objective`` makes them, with a finished record for training."""

    def __init__(self, setup: Setup, stop):
        self.setup, self.stop = setup, stop
        storage = study_module.open_storage(setup.storage_url, heartbeat=study_module.HEARTBEAT_S)
        self.study = optuna.load_study(study_name=setup.study_name, storage=storage,
                                       sampler=study_module.make_sampler(setup.sampler, None, setup.space),
                                       pruner=study_module.make_pruner("median"))
        self.sink = sink_for(tracking.open_client(setup.tracking_uri))
        self.worker = identity()
        self.samples: list[tuple[float, float]] = []  # (optuna s, mlflow s) per completed trial
        self.errors, self.first_error = 0, None
        self.counting = False

    def objective(self, trial) -> float:
        self.mlflow_s = 0.0
        try:
            trial.set_user_attr(schema.WORKER_ATTR, self.worker)
            values = space_module.sample(trial, self.setup.space)
            params = {**self.setup.params, **{k: str(v) for k, v in values.items()},
                      schema.TRIAL_NUMBER_PARAM: str(trial.number)}
            tags = {schema.PARENT_TAG: self.setup.parent_run_id, schema.TRIAL_NUMBER_TAG: str(trial.number),
                    schema.STUDY_TAG: self.setup.study_name}
            started = time.perf_counter()
            run_id = self.sink.create_run(self.setup.experiment_id, f"trial-{trial.number}", tags, params)
            self.mlflow_s += time.perf_counter() - started
            trial.set_user_attr(schema.RUN_ATTR, run_id)
            for epoch, loss in self.setup.reports:
                trial.report(loss, epoch)
                trial.should_prune()  # every trial has the same curve: the median pruner never prunes
            started = time.perf_counter()
            self.sink.write(run_id, self.setup.record, "FINISHED")
            self.mlflow_s += time.perf_counter() - started
        except Exception as exc:
            self.error(exc)
            raise
        return self.setup.value

    def trial(self, trial) -> float:
        """The objective as the search loop runs it; one that raised is told FAIL (NaN) and the next starts."""
        self.asked = True
        try:
            value = self.objective(trial)
        except Exception:
            return float("nan")
        self.completed = True
        return value

    def error(self, exc: BaseException) -> None:
        self.errors += self.counting
        if self.counting and self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"

    def run(self, deadline: float) -> bool:
        """Trials until ``deadline`` (Unix time); False once the study is full."""
        while time.time() < deadline and not self.stop.is_set():
            started, self.asked, self.completed = time.perf_counter(), False, False
            try:
                # As `harness search` runs it: stale-trial check, ask under the cap's lock, heartbeat, tell.
                loop.optimize(self.study, self.trial, 1, max_trials=self.setup.max_trials)
            except Exception as exc:  # ask or tell failed: the store is what is measured, so go on
                self.error(exc)
                time.sleep(0.1)
                continue
            if not self.asked:
                return False  # the study is full
            if self.counting and self.completed:
                self.samples.append((time.perf_counter() - started - self.mlflow_s, self.mlflow_s))
        return True


# What main shares with one N's client processes, handed over by the pool's initializer (a
# multiprocessing Barrier or Event cannot travel with a task): the barrier they start measuring at
# together, and the event that stops them early (main interrupted).
SHARED: dict = {}


def _receive(barrier, stop) -> None:
    SHARED.update(barrier=barrier, stop=stop)


def client(setup: Setup) -> dict:
    """One client process's part of one N: warm up, wait for the others, run the measured trials."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is counted, not logged
    barrier = SHARED["barrier"]
    try:
        worker = Client(setup, SHARED["stop"])
        room = worker.run(time.time() + setup.warmup)  # connections, caches, the server's first requests
    except BaseException:
        barrier.abort()  # the others, and main, stop waiting
        raise
    barrier.wait(timeout=setup.warmup + 300)
    worker.counting = True
    started, cpu = time.time(), time.process_time()
    if room:
        worker.run(started + setup.seconds)
    # Cores this process kept busy (its heartbeat threads included) until its last trial ended, which
    # may be past the window: a client whose trials outlast the window still shows its load.
    cores = (time.process_time() - cpu) / max(time.time() - started, 1e-9)
    return {"samples": worker.samples, "cores": cores, "errors": worker.errors, "first_error": worker.first_error}


# ---- one N -------------------------------------------------------------------------------------

def measure(n: int, setup: Setup, context, postgres_pid: int, server_pid: int) -> dict:
    barrier, stop = context.Barrier(n + 1), context.Event()
    # A pool per N: exactly N processes, each running one client.
    with ProcessPoolExecutor(n, mp_context=context, initializer=_receive, initargs=(barrier, stop)) as pool:
        futures = [pool.submit(client, setup) for _ in range(n)]
        try:
            barrier.wait(timeout=setup.warmup + 300)  # process start-up and warm-up
            t0, pg0, ml0, all0 = time.time(), tree_cpu(postgres_pid), tree_cpu(server_pid), machine_cpu()
            wait(futures, timeout=setup.seconds)  # or earlier, when the study reaches its cap
            t1, pg1, ml1, all1 = time.time(), tree_cpu(postgres_pid), tree_cpu(server_pid), machine_cpu()
        except BrokenBarrierError:  # a client failed to start: its error, not the others' broken barrier
            wait(futures)
            for future in futures:
                if future.exception() and not isinstance(future.exception(), BrokenBarrierError):
                    raise future.exception() from None
            raise
        except BaseException:  # Ctrl-C, SIGTERM: no client waits at the barrier or runs on
            barrier.abort()
            stop.set()
            raise
        results = [f.result() for f in futures]
    window = t1 - t0
    samples = pd.DataFrame([s for r in results for s in r["samples"]], columns=["optuna", "mlflow"]) * 1000
    quantiles = samples.quantile([0.5, 0.95, 0.99])
    errors = [r["first_error"] for r in results if r["first_error"]]
    return {"clients": n, "trials": len(samples), "trials/s": len(samples) / window,
            **{f"optuna p{round(q * 100)}": quantiles.at[q, "optuna"] for q in quantiles.index},
            **{f"mlflow p{round(q * 100)}": quantiles.at[q, "mlflow"] for q in quantiles.index},
            "postgres": (pg1 - pg0) / window, "mlflow server": (ml1 - ml0) / window,
            "clients cpu": sum(r["cores"] for r in results), "machine": (all1 - all0) / window,
            # What a trial costs the services, whoever else shares the machine.
            "services ms/trial": (pg1 - pg0 + ml1 - ml0) / len(samples) * 1000 if len(samples) else math.nan,
            "errors": sum(r["errors"] for r in results), "first error": errors[0] if errors else ""}


# ---- what the clients send ---------------------------------------------------------------------

def reference_record(epochs: int):
    """The reference config trained once: the params a trial's run is created with, and the record
    its final write sends (as ``TrialRecorder.end_trials`` builds it: params already logged)."""
    experiment = load(EXPERIMENT)
    data = experiment.load_data()
    cfg, _ = config.resolve({"experiment": EXPERIMENT, "epochs": epochs, "device": "cpu"}, experiment=experiment,
                            n_train=data.n_train)
    result = training.train(cfg, experiment, data)
    extra = {schema.TRIAL_NUMBER_PARAM: 0, **tracking.source_params(experiment)}
    rec = tracking.record(result, extra_params=extra, tags={schema.TRIAL_STATE_TAG: "COMPLETE"})
    space = space_module.resolve(experiment, n_train=data.n_train)
    return space, tracking.params_of(cfg, extra), replace(rec, params={}), result.history.values[schema.TEST_LOSS]


def new_study(n: int, storage_url: str, tracking_uri: str, sampler: str, space) -> tuple[str, str, str]:
    """A fresh study per N (every N starts from an empty study) and its parent run."""
    name = f"capacity-{n}-clients-{time.time_ns()}"
    storage = study_module.open_storage(storage_url)
    study_module.create_study(name, storage, direction="minimize", space=space, experiment=EXPERIMENT,
                              sampler=study_module.make_sampler(sampler, None, space),
                              pruner=study_module.make_pruner("median"))
    sink = sink_for(tracking.open_client(tracking_uri))
    experiment_id = tracking.experiment_id(sink.client, "capacity")
    parent = sink.create_run(experiment_id, name, {schema.ROLE_TAG: schema.ROLE_STUDY, schema.STUDY_TAG: name}, {})
    return name, experiment_id, parent


# ---- the report --------------------------------------------------------------------------------

def ceiling(table: pd.DataFrame) -> tuple[int | None, float]:
    """(the first N whose throughput is under KNEE x the previous N's, or None; the highest throughput)."""
    rates = table.set_index("clients")["trials/s"]
    knee = next((n for prev, n in zip(rates.index, rates.index[1:]) if rates[n] < KNEE * rates[prev]), None)
    return knee, rates.max()


def max_workers(c: float, t: float) -> int:
    """The most workers W with W / t < c: strictly, so c * t itself is one too many."""
    return max(math.ceil(c * t) - 1, 0)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per N")
    parser.add_argument("--warmup", type=float, default=3, help="seconds per N before measuring, not counted")
    parser.add_argument("--max-trials", type=int, default=5000, help="the study's cap per N (warm-up included)")
    parser.add_argument("--epochs", type=int, default=200, help="epochs of the record each trial writes")
    parser.add_argument("--server-workers", type=int, help="mlflow server --workers (default: harness/cluster.py's)",
                        default=inspect.signature(TrackingServer).parameters["workers"].default)
    parser.add_argument("--report-every", type=int, help="epochs between reports (default: the space's cadence)")
    parser.add_argument("--sampler", default="random", choices=["random", "tpe"],
                        help="random keeps the clients' CPU flat; tpe (harness default) samples in the client")
    args = parser.parse_args()
    # SIGTERM ends the run the way Ctrl-C does (as in harness/cli.py): the services are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.time()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, params, record, test_loss = reference_record(args.epochs)
    every = args.report_every or space_module.report_cadence(space)
    reports = tuple((epoch, test_loss[epoch]) for epoch in range(0, args.epochs, every))
    axes = ["lr", "epochs", "optimizer+loss", *(p.name for p in space.params)]
    print(f"cores: {os.cpu_count()}; clients {args.clients}, {args.seconds:g}s each after {args.warmup:g}s warm-up "
          f"(cap {args.max_trials} trials); mlflow server --workers {args.server_workers}; {args.sampler} sampler, "
          f"median pruner. Per trial: suggests {', '.join(axes)}; {len(reports)} reports (every {every} epochs); "
          f"a record of {len(record.history)} curves x {args.epochs} epochs, {len(record.finals)} finals, "
          f"{len(record.artifacts)} artifacts ({sum(map(len, record.artifacts.values()))} bytes)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp, \
            started_services(Path(tmp), args.server_workers) as (postgres, server):
        storage_url = postgres.url("optuna")
        pids = postmaster_pid(postgres), server.process.pid
        print(f"services started; idle after {settle(list(pids)):.0f}s more", flush=True)
        # Client processes fork from a server that has imported everything once: N=16 starts in
        # seconds, not 16 imports of torch and mlflow on a small machine.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__"])
        for n in args.clients:
            name, experiment_id, parent = new_study(n, storage_url, server.url, args.sampler, space)
            setup = Setup(storage_url, server.url, name, args.sampler, args.max_trials, space, experiment_id,
                          parent, params, record, reports, test_loss[-1], args.warmup, args.seconds)
            rows.append(measure(n, setup, context, *pids))
            print(f"  {n} clients: {rows[-1]['trials/s']:.1f} trials/s, {rows[-1]['errors']} errors", flush=True)
    show(pd.DataFrame(rows))
    print(f"wall time: {time.time() - started:.0f}s")


def show(table: pd.DataFrame) -> None:
    print("\nper N (latencies in ms per trial; CPU in cores busy over the measured window):")
    print(table.drop(columns="first error").to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    for _, row in table[table["first error"] != ""].iterrows():
        print(f"  first error with {row['clients']} clients: {row['first error']}")
    knee, c = ceiling(table)
    print(f"\nceiling: C = {c:.1f} trials/s (the highest); "
          + (f"the knee is N = {knee}, the first N that adds under {KNEE - 1:.0%} to the N before it"
             if knee is not None else
             f"throughput rose by {KNEE}x or more at every step: C is a lower bound, try more clients"))
    model = pd.DataFrame({"T (s)": MODEL_T, "max workers W": [max_workers(c, t) for t in MODEL_T]})
    print("workers served without slowdown, W / T < C (a worker's trial takes T seconds of training):")
    print(model.to_string(index=False))


if __name__ == "__main__":
    main()
