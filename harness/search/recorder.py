"""Each trial's run in MLflow: created, written and closed in the background.

``TrialRecorder`` hands each trial's writes to a ``RunSink`` through two standard thread pools: one
creates runs (a trial waits for its run id, so that never queues behind a record being written) and
one writes records. Training goes on meanwhile; ``drain`` waits until everything is in the store.
A batch's trials (``--batch``) are created in one transaction and recorded in another, where the
sink writes SQL directly: a trial's run costs a fraction of a millisecond instead of ~8 ms.
benchmarks/tracking_path.py measures this against writing inline, MLflow's own async logging and a
writer process.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .. import plots, provenance, schema, tracking
from ..errors import HarnessError, experiment_exit, first_line
from ..schema import FAIL_REASON_ATTR, RUN_ATTR, RUN_STATUS
from ..sink import RunSink, WriteFailed, close_incomplete
from . import objectives as objectives_module
from .durable.workers import WORKER_DIED, abandoned, earlier_attempts, retry

if TYPE_CHECKING:  # `harness audit` closes runs with fail_run, and needs no torch for it
    from ..checkpoint import Checkpoints
    from ..config import TrainConfig
    from ..training import TrainResult

SERVER_THREADS = 4  # a tracking server takes several records at once: their round trips overlap


class TrackingFailed(HarnessError):
    """A write to the MLflow store failed: the search stops rather than train trials it cannot record."""


@dataclass(frozen=True)
class TrialStart:
    """A trial whose run is to be created, with the config it trains (and tags its run starts with)."""
    trial: object
    cfg: TrainConfig
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialEnd:
    """A trained trial: its run (a Future of the id), what training gave, and its Optuna state."""
    trial: object
    pending: Future
    result: TrainResult
    state: str  # COMPLETE, PRUNED or FAIL


@dataclass
class TrialWrite:
    """One run's final record on its way to the store."""
    run_id: str
    number: int  # the trial's
    state: str
    record: tracking.RunRecord
    status: str  # the run's MLflow status
    figures: tuple | None = None  # (history values, predictions) to render into the record


@dataclass(frozen=True)
class BestTrial:
    """This invocation's best trial on the selection metric: the parent run gets its figures and finals."""
    value: float
    number: int
    run_id: str
    figures: tuple
    finals: dict[str, float]


class TrialRecorder:
    """The runs of one invocation's trials, all children of ``parent_run_id``.

    The first write that fails (a full disk, a store gone) is kept in ``failure``; ``check`` then
    raises TrackingFailed, so the search stops instead of training trials it cannot record. Runs
    whose final write failed are closed as incomplete by ``close_unwritten`` (or, while the store
    is still failing, by ``harness audit --fix`` later).
    """

    def __init__(self, sink: RunSink, study, experiment_id: str, parent_run_id: str, *, experiment, data,
                 objectives: tuple[str, ...], trial_figures: bool, server: bool, status=None):
        """``status``: the study's live description (search.status.LiveStatus), told of each trial's start and end."""
        self.sink, self.study, self.experiment_id, self.parent_run_id = sink, study, experiment_id, parent_run_id
        self.status = status
        self.experiment, self._data = experiment, data
        self.objectives, self.trial_figures = objectives, trial_figures
        self._extra = tracking.source_params(experiment)
        self.failure: BaseException | None = None
        # The experiment's plot_predictions asking to stop while a figure was drawn (an ExperimentExit,
        # or a KeyboardInterrupt it raised): that figure is left out, and the search stops as it would
        # have had the code raised in training (see TrialRunner.finish, StudyTracker.close).
        self.stopped: BaseException | None = None
        self.best: BestTrial | None = None
        self._unwritten: dict[str, TrialWrite] = {}  # by run id: the final writes that failed
        self._live: dict[int, tracking.LiveCurves] = {}  # by trial number, while it trains
        self._lock = threading.Lock()
        self._create = ThreadPoolExecutor(1, thread_name_prefix="harness-mlflow-create")
        self._writes = ThreadPoolExecutor(SERVER_THREADS if server else 1, thread_name_prefix="harness-mlflow-write")
        # On an embedded store each write is waited for: a worker killed with -9 then never leaves a
        # trial without its run, or a finished trial without its record. It costs nothing measurable
        # there (benchmarks/tracking_path.py: inline and the pool both 1.20x); a server's round trips
        # overlap instead, and `harness audit --fix` closes what a killed worker left open.
        self._wait = not server

    def _submit(self, pool: ThreadPoolExecutor, fn, *args, on_error=None) -> Future:
        try:
            future = pool.submit(fn, *args)
        except RuntimeError as exc:  # the pool is shut down: the search is closing
            self.failed(exc)
            raise TrackingFailed(f"tracking failed: {exc}") from None

        def done(f: Future) -> None:
            if f.exception() is not None:
                self.failed(f.exception())
                if on_error:
                    on_error(f.exception())
        future.add_done_callback(done)
        return future

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failure = self.failure or exc

    def check(self) -> None:
        """Raise TrackingFailed if any write has failed so far."""
        if self.failure is not None:
            raise TrackingFailed(f"tracking failed: a write to the MLflow store failed: {first_line(self.failure)}")

    def start_trials(self, starts: list[TrialStart]) -> list[Future]:
        """The trials' runs, created in the background: a Future of each run's id. Several at once go
        in one transaction where the store allows (a batch's trials)."""
        self.check()
        specs = [(schema.trial_run_name(start.trial.number),
                  {**provenance.run_tags(self.experiment, self._data, start.cfg.device, start.cfg.valid_fraction),
                   schema.PARENT_TAG: self.parent_run_id, schema.TRIAL_NUMBER_TAG: str(start.trial.number),
                   schema.STUDY_TAG: self.study.study_name, **start.tags},
                  tracking.params_of(start.cfg, {schema.TRIAL_NUMBER_PARAM: start.trial.number, **self._extra}))
                 for start in starts]
        if self.status is not None:
            for start in starts:
                self.status.started(start.trial, start.cfg.epochs)
        if len(specs) == 1 or not self.sink.direct:
            futures = [self._submit(self._create, self.sink.create_run, self.experiment_id, *spec) for spec in specs]
        else:
            futures = _split(self._submit(self._create, self.sink.create_runs, self.experiment_id, specs), len(specs))
        if self._wait:
            wait(futures)
        return futures

    def checkpoints(self, trial, pending: Future, every: int | None, seconds: float | None) -> Checkpoints:
        """The checkpoints of a trial's run, written among its artifacts (its id waited for at the first)."""
        from .. import resume

        return resume.run_checkpoints(self.sink.client, lambda: self._link(trial, pending), every, seconds)

    def resumable(self, frozen, cfg: TrainConfig) -> tuple[dict | None, str | None]:
        """The latest usable checkpoint an earlier attempt at this trial's configuration left (Optuna's
        retry of a trial cut short), and that attempt's run; (None, None) without one."""
        from .. import resume

        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for number in reversed(earlier_attempts(frozen)):
            run_id = by_number[number].user_attrs.get(RUN_ATTR) if number in by_number else None
            if isinstance(run_id, str) and run_id:
                state, _ = resume.latest(self.sink.client, run_id, cfg.to_dict(), self.experiment.sha256)
                if state is not None:
                    return state, run_id
        return None, None

    def live(self, trial, pending: Future, history) -> tracking.LiveCurves:
        """A loop observer sending the trial's curves to its run while it trains."""
        live = tracking.LiveCurves(self.sink.client, lambda: self._link(trial, pending), history)
        if self.status is not None:
            self.status.watch(trial.number, history)
        with self._lock:
            self._live[trial.number] = live
        return live

    def _sent(self, trial) -> int:
        """The step the trial's final record starts at: the curves before it are on its run.
        The trial no longer trains: the live description is told so."""
        if self.status is not None:
            self.status.ended(trial.number)
        with self._lock:
            live = self._live.pop(trial.number, None)
        return live.close() if live is not None else 0

    def restarted(self, trial, pending: Future) -> None:
        """A retried trial whose earlier attempt's checkpoint was refused trains from epoch 0: its run,
        created saying where it would resume, says so (as a `harness train` run that did)."""
        self._submit(self._writes, lambda: self.sink.write(
            self._link(trial, pending), tracking.RunRecord(params={}, history={}, tags={schema.RESUMED_TAG: "0"}),
            None))

    def record_refused(self, trial, params: dict[str, str], reason: str) -> None:
        """A queued trial refused before it had a config: a FAILED run with its queued ``params`` and
        the reason, so that this trial too has its run (as `audit --fix` gives one that failed early)."""
        tags = {schema.PARENT_TAG: self.parent_run_id, schema.TRIAL_NUMBER_TAG: str(trial.number),
                schema.STUDY_TAG: self.study.study_name, schema.TRIAL_STATE_TAG: "FAIL", schema.FAIL_REASON_TAG: reason}
        pending = self._submit(self._create, self.sink.create_run, self.experiment_id, schema.trial_run_name(trial.number), tags,
                               {**params, schema.TRIAL_NUMBER_PARAM: str(trial.number)})
        self._submit(self._writes, self.sink.close, self._link(trial, pending), "FAILED")

    def end_trials(self, ends: list[TrialEnd]) -> list[str]:
        """Hand finished trials' records to the writes (several in one transaction where the store
        allows); each run ends with the status its trial's state maps to. Their run ids."""
        writes = []
        for end in ends:
            trial, result, state = end.trial, end.result, end.state
            run_id = self._link(trial, end.pending)
            rec = tracking.record(result, extra_params={schema.TRIAL_NUMBER_PARAM: trial.number, **self._extra},
                                  tags={schema.TRIAL_STATE_TAG: state})
            rec = replace(rec, params={}, first_step=self._sent(trial))  # params: logged with the run's creation
            if state == "PRUNED":
                rec.finals = {}
                # KILLED is MLflow's nearest status, drawn like a failure: the name and description say pruned.
                rec.tags.update(pruned_tags(trial.number, result.history.stopped, type(self.study.pruner).__name__))
            if state == "COMPLETE":
                rec.finals.update(objectives_module.metrics(self.objectives, result))
                self._note_best(trial.number, run_id, result)
            figures = (result.history.values, result.predictions) if self.trial_figures else None
            writes.append(TrialWrite(run_id, trial.number, state, rec, RUN_STATUS[state], figures))
        self._write(writes)
        return [write.run_id for write in writes]

    def end_interrupted_trial(self, trial, pending: Future | None, cfg, history, reason: str,
                              run_status: str) -> str | None:
        """A trial that raised (or was interrupted): its params and the curves recorded so far."""
        if pending is None or (pending.done() and pending.exception() is not None):
            if self.status is not None:
                self.status.ended(trial.number)
            return None  # its run was never created
        run_id = self._link(trial, pending)
        rec = tracking.partial_record(cfg, history, reason, tags={schema.TRIAL_STATE_TAG: "FAIL"},
                                      first_step=self._sent(trial))
        self._write([TrialWrite(run_id, trial.number, "FAIL", replace(rec, params={}), run_status)])
        return run_id

    def _write(self, writes: list[TrialWrite]) -> None:
        """Write the records: one by one, or in one ``write_many`` where the store takes them in one transaction."""
        def write(batch: list[TrialWrite]) -> None:
            for one in batch:
                if one.figures is not None:
                    one.record.artifacts.update(self._render(*one.figures))
            self.sink.write_many([(one.run_id, one.record, one.status) for one in batch])

        def unwritten(batch: list[TrialWrite], exc: BaseException | None) -> None:
            failed = set(exc.run_ids) if isinstance(exc, WriteFailed) else None
            with self._lock:
                for one in batch:
                    if failed is None or one.run_id in failed:
                        self._unwritten[one.run_id] = one

        futures = []
        for batch in ([writes] if self.sink.direct else [[one] for one in writes]):
            try:
                futures.append(self._submit(self._writes, write, batch,
                                            on_error=lambda exc, batch=batch: unwritten(batch, exc)))
            except TrackingFailed:
                unwritten(batch, None)
        if self._wait:
            wait(futures)

    def _render(self, values, predictions) -> dict[str, bytes]:
        if self._data is None:
            self._data = self.experiment.load_data()

        def stop(exc: BaseException) -> None:
            with self._lock:
                self.stopped = self.stopped or experiment_exit(exc, len(values[schema.TRAIN_LOSS])) or exc

        return plots.png(plots.render(self.experiment, values, self._data, predictions, on_stop=stop))

    def _link(self, trial, pending: Future) -> str:
        try:
            run_id = pending.result()
        except Exception as exc:
            self.failed(exc)
            raise TrackingFailed(f"tracking failed: cannot create the run of trial {trial.number}: "
                                 f"{first_line(exc)}") from None
        if trial.user_attrs.get(RUN_ATTR) != run_id:  # not yet linked during training
            with contextlib.suppress(Exception):  # the Optuna storage failing must not keep the run open
                trial.set_user_attr(RUN_ATTR, run_id)
        return run_id

    def _note_best(self, number: int, run_id: str, result) -> None:
        # With two objectives, the trial whose figures the parent gets is the one of the best selection metric.
        value = result.value(self.objectives[0])
        sign = 1 if self.study.directions[0].name == "MINIMIZE" else -1
        with self._lock:
            if self.best is None or sign * value < sign * self.best.value:
                self.best = BestTrial(value, number, run_id, (result.history.values, result.predictions),
                                      result.final_metrics())

    def drain(self) -> None:
        """Close the runs of trials other workers found abandoned, give the best trial's figures to
        the parent run, and wait for every write to land."""
        try:
            # Trials that other workers' heartbeat checks failed while this one ran: close their runs.
            self._submit(self._writes, fail_abandoned_runs, self.sink, self.parent_run_id, abandoned_reasons(self.study))
            if self.best is not None and not self.trial_figures:
                # Rendered here, beside the last writes: this thread is idle now.
                self._submit(self._writes, self.sink.write, self.best.run_id,
                             tracking.RunRecord(params={}, history={}, artifacts=self._render(*self.best.figures)),
                             None)
        except TrackingFailed:
            pass
        self.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            lives, self._live = list(self._live.values()), {}
        for live in lives:  # trials whose run never came to be
            live.close()
        self._create.shutdown(wait=True)
        self._writes.shutdown(wait=True)

    def close_unwritten(self) -> None:
        """The runs whose final write failed: marked incomplete, and the configuration of a COMPLETE
        trial among them queued again, so that it gets a full record."""
        with self._lock:
            unwritten, self._unwritten = dict(self._unwritten), {}
        if not unwritten:
            return
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for one in sorted(unwritten.values(), key=lambda one: (one.number, one.state)):
            if one.state == "COMPLETE" and one.number in by_number:
                with contextlib.suppress(Exception):  # the Optuna storage fails too: audit --fix queues it later
                    retry(self.study, by_number[one.number])
        with contextlib.suppress(Exception):  # the store still fails: `harness audit --fix` closes them later
            for run_id, one in unwritten.items():
                close_incomplete(self.sink, run_id, f"the final write of trial {one.number}'s record failed: "
                                                    f"{first_line(self.failure)}")


def pruned_tags(number: int, stopped: str, pruner: str) -> dict[str, str]:
    return {schema.RUN_NAME_TAG: f"{schema.trial_run_name(number)} ({stopped})",
            schema.NOTE_TAG: f"**Optuna trial {number}: {stopped}** by {pruner}. MLflow has no pruned status, so "
                             "the run is KILLED; its curves run up to that epoch, and it has no final metrics."}


def fail_run(sink: RunSink, run_id: str, reason: str) -> None:
    """The run of a trial that failed (and was queued again): FAILED, with the trial's reason."""
    sink.close(run_id, "FAILED", {schema.FAIL_REASON_TAG: reason, schema.TRIAL_STATE_TAG: "FAIL"})


def fail_abandoned_runs(sink: RunSink, parent_id: str, reasons: dict[int, str]) -> None:
    """Close the runs that abandoned trials left open, each with its trial's fail reason (one query,
    however many trials)."""
    if not reasons:
        return
    wanted = {str(n): reason for n, reason in reasons.items()}
    # FINISHED too: a worker that wrote its run and died before Optuna recorded the end (or a torn
    # journal that lost it) leaves a whole run whose trial failed and is retried.
    for run in sink.child_runs(parent_id):
        number = run.data.tags.get(schema.TRIAL_NUMBER_TAG)
        if number in wanted and run.info.status in ("RUNNING", "FINISHED"):
            fail_run(sink, run.info.run_id, wanted[number])


def abandoned_reasons(study) -> dict[int, str]:
    """The abandoned trials (failed, their configuration queued again) and why each failed."""
    trials = study.get_trials(deepcopy=False)
    numbers = abandoned(trials)
    return {t.number: t.user_attrs.get(FAIL_REASON_ATTR) or WORKER_DIED for t in trials if t.number in numbers}


def _split(future: Future, count: int) -> list[Future]:
    """One Future per item of ``future``'s list result (its exception, for each, if it fails)."""
    parts = [Future() for _ in range(count)]
    for part in parts:
        part.set_running_or_notify_cancel()

    def done(f: Future) -> None:
        error = f.exception()
        for index, part in enumerate(parts):
            if error is not None:
                part.set_exception(error)
            else:
                part.set_result(f.result()[index])
    future.add_done_callback(done)
    return parts
