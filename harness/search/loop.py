"""The one loop every search runs: ask up to K trials (K = ``--batch``, else 1), train them, tell
each. ``--n-jobs N`` runs it in N threads, as Optuna's ``study.optimize`` does.

What ``optimize`` gave a trial is done here the same way: heartbeats on an RDB storage from ask to
tell, stale trials failed (and retried) before each ask, FAIL told when the objective raises, a
timeout, a progress bar. Added: ``--max-trials``, checked and asked under one lock that every worker
takes, so that workers sharing a study never overshoot it.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import optuna
from optuna.trial import TrialState

from .. import signals
from ..schema import FAIL_REASON_ATTR, WORKER_ATTR
from .durable import optuna_private
from .experimental import experimental_ok
from .limits import MAX_BATCH, MAX_N_JOBS
from .durable.storages import study_lock
from .durable.workers import INTERRUPTED, identity, retry

# Toward --max-trials counts every trial that is not FAIL: a failed trial is not a result, and its
# retry (queued, WAITING) is asked even in a full study, so a crash never costs the study a result.
COUNTED = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)


class StudyFull(Exception):
    """The study already holds its --max-trials trials and none is queued; no trial was created."""


def ask(study, max_trials: int | None = None) -> optuna.Trial:
    """``study.ask()`` within ``max_trials``: the count and the ask happen under the study's lock
    (storages.study_lock), so two workers never take the last place both. A queued trial is asked
    even in a full study (it is already counted). The trial names its worker (a harness storage
    does it as the trial is created or taken, storages.py; here it is done for any other)."""
    with warnings.catch_warnings():  # this loop beats the heartbeats, as optimize would
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        if max_trials is None:
            trial = study.ask()
        else:
            storage = optuna_private.storage_of(study)
            with study_lock(storage, f"study-{storage.get_study_id_from_name(study.study_name)}"):
                counted = study.get_trials(deepcopy=False, states=COUNTED)
                if len(counted) >= max_trials and not any(t.state == TrialState.WAITING for t in counted):
                    raise StudyFull(f"{len(counted)} trials of at most {max_trials}")
                trial = study.ask()
    if WORKER_ATTR not in trial.user_attrs:
        trial.set_user_attr(WORKER_ATTR, identity())
    return trial


def optimize(study, objective, n_trials: int, batch: int = 1, *, n_jobs: int = 1, timeout: float | None = None,
             max_trials: int | None = None, progress: bool = False) -> None:
    """Run up to ``n_trials`` trials of ``objective``, ``batch`` at a time through
    ``objective.run_batch`` (one at a time through ``objective(trial)``), in ``n_jobs`` threads.
    Stops early at ``timeout`` seconds, once the study holds ``max_trials`` trials that count, or
    on a held signal (harness.signals): trials asked when one arrives are ended as interrupted and
    queued again instead of trained; trials in training finish (or the objective stops them)."""
    from .. import config

    batch = config.int_in("batch", batch, 1, MAX_BATCH)
    n_jobs = config.int_in("n_jobs", n_jobs, 1, MAX_N_JOBS)
    budget = _Budget(n_trials, timeout)
    optuna_private.clear_stop(study)
    with _progress_bar(progress, n_trials, study) as told:
        def work() -> None:
            try:
                with optuna_private.optimize_loop(study):
                    _work(study, objective, batch, budget, max_trials, told, reseed=n_jobs > 1)
            except BaseException:
                budget.stop()  # the other threads end after their current trials
                raise
            finally:
                # Optuna's optimize too: each thread's database session back to the pool.
                optuna_private.storage_of(study).remove_session()

        if n_jobs == 1:  # in this thread: where signals are delivered, so an interrupt stops training at once
            work()
            return
        with ThreadPoolExecutor(n_jobs, thread_name_prefix="harness-trial") as pool:
            futures = [pool.submit(work) for _ in range(n_jobs)]
        for future in futures:
            future.result()  # the first thread's error, as optimize raises it


def _work(study, objective, batch: int, budget: "_Budget", max_trials: int | None, told, reseed: bool) -> None:
    while (size := budget.take(batch)):
        if reseed:  # as optimize does in each of its threads, before each trial
            study.sampler.reseed_rng()
        with experimental_ok():  # what optimize does before each trial (heartbeat storages only)
            optuna.storages.fail_stale_trials(study)
        trials, full = [], False
        # Beaten from each trial's ask on, as optimize does: a trial asked and never beaten is
        # never found stale by another worker's heartbeat check, should this worker die asking.
        with _heartbeats(study) as beaten:
            try:
                for _ in range(size):
                    trials.append(ask(study, max_trials))
                    beaten(trials[-1])
                    if signals.pending():
                        break
            except StudyFull:
                full = True
            if signals.pending():
                _interrupted(study, trials, objective)
                return
            outcomes = _run(study, objective, trials, batch) if trials else []
        for trial, (state, values) in zip(trials, outcomes):
            # skip_if_finished: a trial another machine's heartbeat check failed while this worker
            # was starved past the grace has its configuration queued there; it stays as it is.
            if state == TrialState.COMPLETE:
                study.tell(trial, values, skip_if_finished=True)
            else:
                study.tell(trial, state=state, skip_if_finished=True)
            told()
        if full or optuna_private.stop_asked(study):  # stop(): GridSampler once its grid is used up
            budget.stop()
            return


def _run(study, objective, trials: list, batch: int) -> list[tuple[TrialState, object]]:
    """Each trial's (state, values): trained through ``objective.run_batch`` in a batched search,
    else through ``objective(trial)``, the very path a plain ``study.optimize(objective)`` takes."""
    try:
        if batch > 1:
            return [(TrialState[t.state], t.value) for t in objective.run_batch(trials)]
        try:
            values = objective(trials[0])
        except optuna.TrialPruned:
            return [(TrialState.PRUNED, None)]
        return [(TrialState.COMPLETE if _feasible(values) else TrialState.FAIL, values)]
    except BaseException:
        for trial in trials:  # as optimize does for a trial whose objective raised
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL)
        raise


def _feasible(values) -> bool:
    """What optimize tells as COMPLETE: numbers, none of them NaN (a failed trial returns NaN)."""
    try:
        return not any(math.isnan(float(v)) for v in (values if isinstance(values, (list, tuple)) else [values]))
    except (TypeError, ValueError):
        return False


class _Budget:
    """The trials left to ask and the time left, shared by the threads of one optimize."""

    def __init__(self, n_trials: int, timeout: float | None):
        self._left, self._stopped, self._lock = n_trials, False, threading.Lock()
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def take(self, most: int) -> int:
        """How many trials to ask next (up to ``most``); 0 once none are left, the time is up, a
        signal is held or a thread stopped the search."""
        with self._lock:
            if self._stopped or signals.pending() or (self._deadline is not None and time.monotonic() >= self._deadline):
                return 0
            taken = min(most, self._left)
            self._left -= taken
            return taken

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


@contextlib.contextmanager
def _progress_bar(shown: bool, n_trials: int, study):
    """optimize's progress bar (tqdm, as Optuna draws it); yields the function to call per told trial."""
    if not shown:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    bar, lock = tqdm(total=n_trials), threading.Lock()

    def told() -> None:
        with lock:
            if len(study.directions) == 1:
                with contextlib.suppress(ValueError):  # no trial is COMPLETE yet
                    best = study.best_trial
                    bar.set_description(f"Best trial: {best.number}. Best value: {best.value:.6g}")
            bar.update(1)

    try:
        yield told
    finally:
        bar.close()


def _interrupted(study, trials, objective) -> None:
    """Trials asked but not trained when a signal came: each with its FAILED run (where the objective
    tracks them), FAIL as interrupted, and queued again."""
    record = getattr(objective, "record_unstarted", None)
    if record is not None and trials:
        with contextlib.suppress(Exception):  # the store failing: `audit --fix` gives them their runs
            record(trials, INTERRUPTED)
    for trial in trials:
        with contextlib.suppress(Exception):  # the storage failing: the next search queues them (no reason = unfinished)
            trial.set_user_attr(FAIL_REASON_ATTR, INTERRUPTED)
            frozen = study.tell(trial, state=TrialState.FAIL)
            retry(study, frozen)


@contextlib.contextmanager
def _heartbeats(study):
    """Optuna's heartbeat for every trial asked, from its ask until it is told (RDB storages
    with one): other workers fail a silent trial as stale. Yields the function that adds a trial."""
    storage = optuna_private.backend(optuna_private.storage_of(study))
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()  # RDB storages have one
    if interval is None:
        yield lambda trial: None
        return
    stop = threading.Event()
    ids: list[int] = []

    def beat(ids) -> None:
        for trial_id in ids:
            with contextlib.suppress(Exception):  # a dropped connection: the next beat retries
                storage.record_heartbeat(trial_id)

    def add(trial) -> None:
        ids.append(optuna_private.trial_id(trial))
        beat(ids[-1:])

    def beating() -> None:
        while not stop.wait(interval):
            beat(list(ids))

    thread = threading.Thread(target=beating, name="harness-heartbeat", daemon=True)
    thread.start()
    try:
        yield add
    finally:
        stop.set()
        thread.join()
