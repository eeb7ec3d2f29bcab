"""``study.optimize`` for ``Objective.run_batch``: ask K trials, train them together, tell each.

Optuna's ``optimize`` runs one trial per call of the objective; a batch needs its ask-and-tell
interface. What ``optimize`` does besides (heartbeats on an RDB storage, telling FAIL when the
objective raises, stopping at a timeout) is done here the same way.
"""
from __future__ import annotations

import contextlib
import threading
import time
import warnings

from optuna.trial import TrialState

from .. import signals
from . import optuna_private
from ..schema import FAIL_REASON_ATTR
from .limits import MAX_BATCH
from .storages import StudyFull
from .workers import INTERRUPTED, retry


def optimize(study, objective, n_trials: int, batch: int, timeout: float | None = None) -> None:
    """Run ``n_trials`` trials, ``batch`` at a time (the last batch may be smaller). Stops early at
    ``timeout``, when the storage's cap is reached, or on a held signal: one that arrives while a
    batch is asked ends the trials asked so far as interrupted (queued again) instead of training them."""
    from .. import config

    batch = config.int_in("batch", batch, 1, MAX_BATCH)
    started, done = time.time(), 0
    while done < n_trials and not signals.pending():
        if timeout is not None and time.time() - started >= timeout:
            break
        trials, capped = [], False
        # Beaten from each trial's ask on, as optimize does: a trial asked and never beaten is
        # never found stale by another worker's heartbeat check, should this worker die asking.
        with _heartbeats(study) as beaten:
            try:
                with warnings.catch_warnings():  # heartbeats are beaten here, as optimize would
                    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                    for _ in range(min(batch, n_trials - done)):
                        trials.append(study.ask())
                        beaten(trials[-1])
                        if signals.pending():
                            break
            except StudyFull:
                if not trials:
                    raise
                capped = True
            if signals.pending():
                _interrupted(study, trials, objective)
                break
            try:
                outcomes = objective.run_batch(trials)
            except BaseException:
                for trial in trials:  # as optimize does for a trial whose objective raised
                    with contextlib.suppress(Exception):
                        study.tell(trial, state=TrialState.FAIL)
                raise
        for trial, told in zip(trials, outcomes):
            # skip_if_finished: a trial another machine's heartbeat check failed while this worker
            # was starved past the grace has its configuration queued there; it stays as it is.
            if told.state == "COMPLETE":
                study.tell(trial, told.value, skip_if_finished=True)
            else:
                study.tell(trial, state=TrialState[told.state], skip_if_finished=True)
        done += len(trials)
        if capped:
            break


def _interrupted(study, trials, objective) -> None:
    """Trials asked but not trained when a signal came: each with its FAILED run (where the objective
    tracks them), FAIL as interrupted, and queued again."""
    record = getattr(objective, "record_unstarted", None)
    if record is not None:
        with contextlib.suppress(Exception):  # the store failing: `audit --fix` gives them their runs
            record(trials, INTERRUPTED)
    for trial in trials:
        with contextlib.suppress(Exception):  # the storage failing: the next search queues them (no reason = unfinished)
            trial.set_user_attr(FAIL_REASON_ATTR, INTERRUPTED)
            frozen = study.tell(trial, state=TrialState.FAIL)
            retry(study, frozen)


@contextlib.contextmanager
def _heartbeats(study):
    """Optuna's heartbeat for every trial of the batch, from its ask until it is told (RDB storages
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
