"""A study's parent-run description while its trials train: which trials are running (params, epochs
done, latest selection value, worker, run), how many finished and the best so far.

Every worker writes the whole study's state as the Optuna storage holds it, so workers sharing one
study show one picture: a worker first puts its own trials' progress into the storage (each trial's
``harness.progress`` attr), then composes the description from what the storage says of every trial.
The writes come from a thread of their own, at most every ``tracking.LIVE_SECONDS`` and only when
something changed; training never waits for one, and one that fails is left to the next (the
end-of-search summary replaces the description in any case).
"""
from __future__ import annotations

import math
import threading
import time

from .. import tracking
from ..schema import NOTE_TAG, PROGRESS_ATTR, RUN_ATTR, TRAIN_LOSS, WORKER_ATTR, trial_run_name
from . import summary
from .durable import optuna_private

RUNNING_SHOWN = 20  # rows of the running trials' table
IDLE_CHECK_S = 1.0  # how often an idle writer looks whether a trial's epochs moved on


class LiveStatus:
    """The running-trials description of ``parent`` (a ``ParentRun``), kept current from a thread.
    ``started``/``watch``/``ended`` follow this process's trials; ``close`` stops the writes (the
    summary comes next)."""

    def __init__(self, parent, objectives: tuple[str, ...], seconds: float | None = None, clock=time.monotonic):
        self.parent, self.objectives, self.clock = parent, objectives, clock
        self.seconds = tracking.LIVE_SECONDS if seconds is None else seconds
        self._trials: dict[int, tuple[int, int, object]] = {}  # number -> (trial id, epochs, history)
        self._written: dict[int, dict] = {}  # number -> the progress last put in the storage
        self._changed = False  # a trial started or ended since the last write
        self._closed = False
        self._last = -math.inf
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def started(self, trial, epochs: int) -> None:
        with self._cond:
            if self._closed:
                return
            self._trials[trial.number] = (optuna_private.trial_id(trial), epochs, None)
            self._changed = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="harness-live-status", daemon=True)
                self._thread.start()
            self._cond.notify()

    def watch(self, number: int, history) -> None:
        """The history the trial's loop fills: its epochs done and latest values are read from it."""
        with self._cond:
            if number in self._trials:
                trial_id, epochs, _ = self._trials[number]
                self._trials[number] = (trial_id, epochs, history)

    def ended(self, number: int) -> None:
        with self._cond:
            if self._trials.pop(number, None) is not None:
                self._written.pop(number, None)
                self._changed = True
                self._cond.notify()

    def close(self) -> None:
        """Stop writing, once the write in flight (if any) has landed."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                due = self._last + self.seconds - self.clock()
                moved = {n: (self._trials[n][0], p) for n, p in self._progress().items() if self._written.get(n) != p}
                if due > 0 or not (self._changed or moved):
                    self._cond.wait(max(min(due if due > 0 else self.seconds, IDLE_CHECK_S), 0.01))
                    continue
                self._changed, self._last = False, self.clock()
            self._write(moved)

    def _progress(self) -> dict[int, dict]:
        """Each of this process's trials' progress, as its storage attr holds it."""
        found = {}
        for number, (_, epochs, history) in self._trials.items():
            values = history.values if history is not None else {}
            done = len(values.get(TRAIN_LOSS, ()))
            curve = values.get(self.objectives[0]) or ()
            last = curve[-1] if len(curve) == done and done else None  # a final-value objective has no curve
            found[number] = {"trial": number, "done": done, "epochs": epochs,
                             "value": float(last) if last is not None and math.isfinite(last) else None}
        return found

    def _write(self, moved: dict[int, tuple[int, dict]]) -> None:
        """This process's trials' progress that moved on (by number: trial id, progress) into the
        storage, then the whole study's picture into the description."""
        parent = self.parent
        storage = optuna_private.storage_of(parent.study)
        for number, (trial_id, value) in moved.items():
            with self._cond:
                if number not in self._trials:  # it ended meanwhile: its trial is (about to be) finished
                    continue
            try:
                storage.set_trial_user_attr(trial_id, PROGRESS_ATTR, value)
            except Exception:  # noqa: BLE001 - e.g. the trial just finished: the others' progress still goes
                continue
            with self._cond:
                if number in self._trials:
                    self._written[number] = value
        try:
            trials = parent.study.get_trials(deepcopy=False)
            note = summary.describe(parent.study, parent.experiment, parent.experiment_id, parent.params,
                                    objectives=self.objectives,
                                    running=running_lines(trials, parent.experiment_id, self.objectives[0],
                                                          parent.study.directions[0].name.lower()))
            with self._cond:
                if self._closed:  # the summary is on its way: this picture is older than it
                    return
            parent.sink.client.set_tag(parent.run_id, NOTE_TAG, note)
        except Exception:  # noqa: BLE001 - a trial never fails for its study's description; the next write tries again
            pass


def running_lines(trials: list, experiment_id: str, metric: str, direction: str) -> list[str]:
    """The running trials as a table, and the best completed one so far (the description's live part)."""
    from optuna.trial import TrialState

    running = [t for t in trials if t.state == TrialState.RUNNING]
    if not running:
        return []
    lines = ["", f"**Running now:** {len(running)} trial(s); epochs and {metric} as their workers last wrote "
                 f"them (every ~{tracking.LIVE_SECONDS:g} s while a trial trains)", "",
             f"| trial | epochs done | {metric} | params | worker | run |", "|---:|---:|---:|---|---|---|"]
    for trial in running[:RUNNING_SHOWN]:
        done, value = _progress_cells(trial)
        params = ", ".join(f"{k}={summary.cell(v)}" for k, v in sorted(trial.params.items(),
                                                                        key=lambda kv: summary.param_order(kv[0])))
        run = trial.user_attrs.get(RUN_ATTR)
        link = f"[{trial_run_name(trial.number)}](#/experiments/{experiment_id}/runs/{run})" \
            if isinstance(run, str) and run.isalnum() else "-"
        lines.append(f"| {trial.number} | {done} | {value} | {params or '-'} | {_worker(trial)} | {link} |")
    if len(running) > RUNNING_SHOWN:
        lines.append(f"\n(and {len(running) - RUNNING_SHOWN} more)")
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and len(t.values) == 1]
    if done:
        best = (min if direction == "minimize" else max)(done, key=lambda t: t.value)
        lines += ["", f"**Best so far:** trial {best.number}, {metric} {best.value:.6g} (of {len(done)} complete)"]
    return lines


def _progress_cells(trial) -> tuple[str, str]:
    """(epochs done / total, latest value) from the trial's progress attr, "-" where unknown (a storage's
    attr is untrusted input; one a retried trial inherited names the earlier trial, and is not this one's)."""
    progress = trial.user_attrs.get(PROGRESS_ATTR)
    if not isinstance(progress, dict) or progress.get("trial") != trial.number:
        return "-", "-"
    done, epochs, value = progress.get("done"), progress.get("epochs"), progress.get("value")
    counts = f"{done} / {epochs}" if all(isinstance(n, int) and not isinstance(n, bool) for n in (done, epochs)) \
        else "-"
    shown = f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else "-"
    return counts, shown


def _worker(trial) -> str:
    worker = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(worker, dict):
        return "-"
    return summary.cell(f"{str(worker.get('host'))[:64]} pid {worker.get('pid')}")
