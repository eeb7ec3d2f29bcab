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
from .storages import StudyFull

def optimize(study, objective, n_trials: int, batch: int, timeout: float | None = None) -> None:
    """Run ``n_trials`` trials, ``batch`` at a time (the last batch may be smaller). Stops early at
    ``timeout``, when the storage's cap is reached, or on a held signal once a batch is told."""
    started, done = time.time(), 0
    while done < n_trials and not signals.pending():
        if timeout is not None and time.time() - started >= timeout:
            break
        trials, capped = [], False
        try:
            with warnings.catch_warnings():  # heartbeats are beaten here, as optimize would (_heartbeats)
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                for _ in range(min(batch, n_trials - done)):
                    trials.append(study.ask())
        except StudyFull:
            if not trials:
                raise
            capped = True
        with _heartbeats(study, trials):
            try:
                outcomes = objective.run_batch(trials)
            except BaseException:
                for trial in trials:  # as optimize does for a trial whose objective raised
                    with contextlib.suppress(Exception):
                        study.tell(trial, state=TrialState.FAIL)
                raise
        for trial, (state, value) in zip(trials, outcomes):
            if state == "COMPLETE":
                study.tell(trial, value)
            else:
                study.tell(trial, state=TrialState[state])
        done += len(trials)
        if capped:
            break


@contextlib.contextmanager
def _heartbeats(study, trials):
    """Optuna's heartbeat for every trial of the batch while it trains (RDB storages with one):
    other workers fail a silent trial as stale."""
    storage = optuna_private.backend(optuna_private.storage_of(study))
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()  # RDB storages have one
    if not trials or interval is None:
        yield
        return
    stop = threading.Event()
    ids = [optuna_private.trial_id(t) for t in trials]

    def beat() -> None:
        while True:
            for trial_id in ids:
                with contextlib.suppress(Exception):  # a dropped connection: the next beat retries
                    storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="harness-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
