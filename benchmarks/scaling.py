"""Scaling of `harness search` workers, embedded stores vs PostgreSQL + MLflow tracking server.

Measured side by side in one run:

1. Throughput: trials per second with 1 and with 2 worker processes sharing one study of --trials
   trials (goal: 2 workers >= 1.8x one), in the workers' steady state (see ``steady``), so
   process start-up is not counted.
   Also printed: how many of the machine's cores are busy in that window (the workers, their writer
   processes and, for "server", PostgreSQL and mlflow server): what one worker leaves for a second.
2. Per-trial overhead of one tracked worker over the same trials untracked (in-memory Optuna, the
   harness loop, same sampler and seed) at 10, 100 and 1000 trials (goal: at 1000 within 1.5x of
   at 10), in the workers' steady state; the fixed cost of a study's start and summary is printed
   beside it. Epochs are fixed to a narrow range so 1000 trials fit in minutes.

    python benchmarks/scaling.py [--trials 40] [--sizes 10 100 1000] [--backends embedded server]

"server" starts PostgreSQL (from the system's packages) and `mlflow server` on 127.0.0.1.
"""
import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = """
import optuna, sys, time
from harness import Objective
from harness.experiment import load
from harness.search import space
optuna.logging.set_verbosity(optuna.logging.WARNING)
objective = Objective("linear_regression", space.resolve(load("linear_regression"), overrides={"epochs": (40, 60)}),
                      track=False)
optuna.create_study().optimize(objective, n_trials=3)  # warm-up: torch's first-call costs are not overhead
study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), pruner=optuna.pruners.NopPruner())
start = time.perf_counter()
study.optimize(objective, n_trials=int(sys.argv[1]))
print(time.perf_counter() - start)
"""


@contextlib.contextmanager
def embedded(root: Path):
    yield f"journal:{root / 'optuna_journal.log'}", f"sqlite:///{root / 'mlflow.db'}"


@contextlib.contextmanager
def server(root: Path):
    from harness.cluster import services

    with services(root) as stores:
        yield stores


BACKENDS = {"embedded": embedded, "server": server}


class CpuSampler:
    """The machine's busy CPU time (services included), sampled 20 times a second from /proc/stat,
    so that utilization can be read over the workers' steady-state window afterwards."""

    def __init__(self):
        import threading

        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
            total = sum(fields)
            self.samples.append((time.time(), total - fields[3] - fields[4], total))  # minus idle, iowait

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def cores_busy(self, start: float, end: float) -> float:
        inside = [s for s in self.samples if start <= s[0] <= end]
        (_, b0, t0), (_, b1, t1) = inside[0], inside[-1]
        return os.cpu_count() * (b1 - b0) / (t1 - t0)


def search(n_workers: int, storage: str, tracking: str, study: str, trials: int, cwd: Path, *extra: str):
    from harness.cluster import LOGIN_VARS

    # The tracking server's login, which services() put in the environment, goes with its URL.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTUNA_")) or k in LOGIN_VARS}
    env["MLFLOW_TRACKING_URI"] = tracking
    cmd = [sys.executable, "-m", "harness", "search", "--storage", storage, "--study-name", study,
           "--max-trials", str(trials), "--n-trials", str(trials), "--pruner", "none", "--no-progress", *extra]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n_workers)]
    outputs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outputs):
        if p.returncode:
            sys.exit(f"worker failed: {' '.join(cmd)}\n{err[-2000:]}")
    return [o for o, _ in outputs]


def steady(storage: str, study: str) -> tuple[int, float, float, float]:
    """(trials, seconds, start, end) of the workers' steady state: each worker's first trial is left
    out (it pays the process's one-time costs, torch's lazy imports among them), and the window runs
    from the first start to the last end of the rest (start and end as Unix times)."""
    import optuna

    from harness.search.study import open_storage

    trials = sorted(optuna.load_study(study_name=study, storage=open_storage(storage)).trials,
                    key=lambda t: t.datetime_start)
    seen, kept = set(), []
    for t in trials:
        worker = t.user_attrs["harness.worker"]["pid"]
        if worker in seen:
            kept.append(t)
        seen.add(worker)
    start = min(t.datetime_start for t in kept).timestamp()
    end = max(t.datetime_complete for t in kept).timestamp()
    return len(kept), end - start, start, end


def optimize_seconds(stdout: str) -> float:
    return float(re.search(r"this run took ([\d.]+)s", stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="trials per throughput study")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = parser.parse_args()
    # Small studies are noisy: repeat them (medians), so that each size sees a few hundred trials.
    repeats = {n: max(1, min(5, 300 // n)) for n in args.sizes}
    bare = {n: statistics.median(float(subprocess.run([sys.executable, "-c", BARE, str(n)], capture_output=True,
                                                      text=True, check=True).stdout) for _ in range(repeats[n]))
            for n in args.sizes}
    print(f"cpus: {os.cpu_count()}; untracked in-memory Optuna, seconds per trial: "
          + ", ".join(f"{n}: {bare[n] / n * 1000:.1f} ms" for n in args.sizes))
    for name in args.backends:
        with tempfile.TemporaryDirectory(prefix=f"scaling-{name}-") as tmp, BACKENDS[name](Path(tmp)) as stores:
            storage, tracking = stores
            cwd = Path(tmp)
            rates, busy = {}, {}
            for n_workers in (1, 2, 1, 2):  # twice, interleaved, so drift hits both sides
                study = f"throughput-{n_workers}-{time.monotonic_ns()}"
                with CpuSampler() as cpu:
                    search(n_workers, storage, tracking, study, args.trials, cwd, "--sampler", "random")
                kept, seconds, start, end = steady(storage, study)
                rates.setdefault(n_workers, []).append(kept / seconds)
                busy.setdefault(n_workers, []).append(cpu.cores_busy(start, end))
            one, two = (max(rates[k]) for k in (1, 2))
            print(f"[{name}] {args.trials} trials: 1 worker {one:.2f} trials/s, 2 workers {two:.2f} trials/s "
                  f"(runs: {[round(r, 2) for r in rates[1]]} / {[round(r, 2) for r in rates[2]]}); "
                  f"ratio {two / one:.2f}x (goal >= 1.8x)")
            print(f"[{name}] cores busy in those windows (workers, writers, services; of {os.cpu_count()}): "
                  f"1 worker {[round(b, 2) for b in busy[1]]}, 2 workers {[round(b, 2) for b in busy[2]]}",
                  flush=True)
            overhead = {}
            for n in args.sizes:
                per_trial, totals = [], []
                for r in range(repeats[n]):
                    study = f"overhead-{n}-{r}"
                    [out] = search(1, storage, tracking, study, n, cwd, "--sampler", "random", "--seed", "0",
                                   "--epochs-range", "40", "60")
                    kept, seconds, _, _ = steady(storage, study)
                    per_trial.append(seconds / kept)
                    totals.append(optimize_seconds(out))
                tracked, total = statistics.median(per_trial), statistics.median(totals)
                overhead[n] = tracked - bare[n] / n
                print(f"[{name}] {n} trials (median of {repeats[n]}): {tracked * 1000:.1f} ms per trial tracked "
                      f"(steady state), {bare[n] / n * 1000:.1f} ms untracked: overhead {overhead[n] * 1000:.1f} ms "
                      f"per trial ({(total - bare[n]) / n * 1000:.1f} ms with the study's start and summary, "
                      f"{total:.1f}s in all)", flush=True)
            first, last = overhead[args.sizes[0]], overhead[args.sizes[-1]]
            print(f"[{name}] overhead per trial at {args.sizes[-1]} / at {args.sizes[0]}: {last / first:.2f}x "
                  "(goal <= 1.5x)")


if __name__ == "__main__":
    main()
