"""A study in MLflow: one parent run per study, one child run per trial.

``StudyTracker`` hands each trial's writes to a ``RunSink`` through two standard thread pools: one
creates runs (a trial waits for its run id, so that never queues behind a record being written) and
one writes records. Training goes on meanwhile; ``close`` waits until everything is in the store.
A batch's trials (``--batch``) are created in one transaction and recorded in another, where the
sink writes SQL directly: a trial's run costs a fraction of a millisecond instead of ~8 ms.
benchmarks/tracking_path.py measures this against writing inline, MLflow's own async logging and a
writer process.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any

from .. import plots, schema, tracking
from ..errors import HarnessError
from ..schema import FAIL_REASON_ATTR, PARENT_ATTR, ROLE_STUDY, ROLE_TAG, RUN_ATTR, RUN_STATUS
from ..sink import MlflowSink, RunSink, WriteFailed, close_incomplete
from . import objectives as objectives_module
from . import optuna_private, summary
from .storages import describe, study_lock
from .workers import WORKER_DIED, abandoned, retry

MAX_SHOWN = 500  # characters of a parent run's param
SERVER_THREADS = 4  # a tracking server takes several records at once: their round trips overlap


class TrackingFailed(HarnessError):
    """A write to the MLflow store failed: the search stops rather than train trials it cannot record."""


class StudyTracker:
    """Tracks one invocation's trials of a study; ``close`` writes the study summary and drains.

    The first write that fails (a full disk, a store gone) is kept in ``failure``; ``check`` then
    raises TrackingFailed, so the search stops instead of training trials it cannot record. Runs
    whose final write failed are closed as incomplete by ``close`` (or, while the store is still
    failing, by ``harness audit --fix`` later).
    """

    def __init__(self, study, experiment, *, data=None, mlflow_experiment: str | None = None,
                 study_tags: dict[str, str] | None = None, trial_figures: bool = False, space=None,
                 report_every=None, batch: int = 1, extra_params: dict[str, str] | None = None,
                 objectives: tuple[str, ...] = objectives_module.DEFAULT):
        self.study = study
        self.objectives = tuple(objectives)
        self.experiment = experiment
        self._data = data
        self._extra = tracking.source_params(experiment)
        self.trial_figures = trial_figures
        self.failure: BaseException | None = None
        self._unwritten: dict[str, tuple[int, str]] = {}  # run id -> (trial number, state) of failed final writes
        self._lock = threading.Lock()
        self._best: tuple[float, int, str, Any, dict] | None = None
        uri = tracking.default_tracking_uri()
        try:
            self.sink: RunSink = MlflowSink(tracking.open_client(uri))
        except Exception as exc:
            raise TrackingFailed(f"cannot open the MLflow store: {first_line(exc)}") from None
        self._create = ThreadPoolExecutor(1, thread_name_prefix="harness-mlflow-create")
        server = uri.startswith(("http://", "https://"))
        self._writes = ThreadPoolExecutor(SERVER_THREADS if server else 1, thread_name_prefix="harness-mlflow-write")
        # On an embedded store each write is waited for: a worker killed with -9 then never leaves a
        # trial without its run, or a finished trial without its record. It costs nothing measurable
        # there (benchmarks/tracking_path.py: inline and the pool both 1.20x); a server's round trips
        # overlap instead, and `harness audit --fix` closes what a killed worker left open.
        self._wait = not server
        tags = {schema.STUDY_TAG: study.study_name, schema.STORAGE_TAG: describe(optuna_private.storage_of(study)),
                schema.SAMPLER_TAG: type(study.sampler).__name__, schema.PRUNER_TAG: type(study.pruner).__name__,
                schema.DIRECTION_TAG: directions(study).upper(), schema.EXPERIMENT_TAG: experiment.name,
                **(study_tags or {}), ROLE_TAG: ROLE_STUDY}
        # Workers starting together must agree on one parent run: find-or-create it under the
        # study's lock, and publish it in the study before letting the next worker look.
        params = self._params = {**study_params(study, space, report_every, batch, self.objectives),
                                 **(extra_params or {})}
        with study_lock(optuna_private.storage_of(study), f"parent-{study.study_name}"):
            known = study.user_attrs.get(PARENT_ATTR)
            try:
                self.experiment_id, self.parent_run_id = self._open_parent(mlflow_experiment, known, tags, params)
            except Exception as exc:
                self._shutdown()
                raise TrackingFailed(f"cannot open the study's parent run: {first_line(exc)}") from None
            if known != self.parent_run_id:
                study.set_user_attr(PARENT_ATTR, self.parent_run_id)

    def _open_parent(self, mlflow_experiment: str | None, known: str | None, tags: dict,
                     params: dict) -> tuple[str, str]:
        """The study's parent run (the one it knows, else `mlflow run`'s own, else a new one), RUNNING,
        tagged, and with the params it lacks (a param once logged keeps its value: MLflow refuses a change)."""
        from mlflow.exceptions import MlflowException

        client = self.sink.client
        launched = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run` made this run for the invocation
        for candidate in (known, launched):
            if not candidate:
                continue
            try:
                run = client.get_run(candidate)
            except MlflowException:
                continue
            if run.info.lifecycle_stage != "active":
                continue
            run_id, new = run.info.run_id, {k: v for k, v in params.items() if k not in run.data.params}
            if candidate != known:  # `mlflow run`'s run becomes the parent of a new study: named after it
                tags = {**tags, schema.RUN_NAME_TAG: self.study.study_name}
            if run.info.status != "RUNNING":
                self.sink.reopen(run_id, tags)
            else:
                client.log_batch(run_id, tags=tracking.tag_list(tags))
            if new:
                tracking.write(client, run_id, tracking.RunRecord(params=new, history={}))
            if launched and launched != run_id:
                self._point_to_parent(launched, run.info.experiment_id, run_id)
            return run.info.experiment_id, run_id
        experiment_id = tracking.experiment_id(client, mlflow_experiment)
        return experiment_id, self.sink.create_run(experiment_id, self.study.study_name, tags, params)

    def _point_to_parent(self, launched: str, experiment_id: str, parent_id: str) -> None:
        """`mlflow run` on a study that has its parent run already: MLflow's run for this invocation
        says where the trials are, instead of standing empty beside them."""
        from mlflow.exceptions import MlflowException

        name = self.study.study_name
        note = (f"This `mlflow run` resumed the Optuna study **{name}**. Its trials are child runs of the "
                f"study's parent run [{name}](#/experiments/{experiment_id}/runs/{parent_id}), which "
                "holds the study's summary.")
        try:
            self.sink.client.log_batch(launched, tags=tracking.tag_list({
                schema.RUN_NAME_TAG: f"{name} (resumed)", schema.NOTE_TAG: note, schema.STUDY_RUN_TAG: parent_id}))
        except MlflowException:  # not in this store, or deleted: nothing stands empty there
            pass

    def _submit(self, pool: ThreadPoolExecutor, fn, *args, on_error=None) -> Future:
        try:
            future = pool.submit(fn, *args)
        except RuntimeError as exc:  # the pool is shut down: the search is closing
            self._failed(exc)
            raise TrackingFailed(f"tracking failed: {exc}") from None

        def done(f: Future) -> None:
            if f.exception() is not None:
                self._failed(f.exception())
                if on_error:
                    on_error(f.exception())
        future.add_done_callback(done)
        return future

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failure = self.failure or exc

    def check(self) -> None:
        """Raise TrackingFailed if any write has failed so far."""
        if self.failure is not None:
            raise TrackingFailed(f"tracking failed: a write to the MLflow store failed: {first_line(self.failure)}")

    def start_trial(self, trial, cfg) -> Future:
        """The trial's run, created in the background: a Future of its id."""
        return self.start_trials([(trial, cfg)])[0]

    def start_trials(self, trials: list[tuple]) -> list[Future]:
        """The runs of (trial, config) pairs, created in the background: a Future of each run's id.
        Several at once go in one transaction where the store allows (a batch's trials)."""
        self.check()
        specs = [(f"trial-{trial.number}",
                  {schema.PARENT_TAG: self.parent_run_id, schema.TRIAL_NUMBER_TAG: str(trial.number),
                   schema.STUDY_TAG: self.study.study_name},
                  tracking.params_of(cfg, {schema.TRIAL_NUMBER_PARAM: trial.number, **self._extra}))
                 for trial, cfg in trials]
        if len(specs) == 1 or not self.sink.direct:
            futures = [self._submit(self._create, self.sink.create_run, self.experiment_id, *spec) for spec in specs]
        else:
            futures = _split(self._submit(self._create, self.sink.create_runs, self.experiment_id, specs), len(specs))
        if self._wait:
            wait(futures)
        return futures

    def record_refused(self, trial, params: dict[str, str], reason: str) -> None:
        """A queued trial refused before it had a config: a FAILED run with its queued ``params`` and
        the reason, so that this trial too has its run (as `audit --fix` gives one that failed early)."""
        tags = {schema.PARENT_TAG: self.parent_run_id, schema.TRIAL_NUMBER_TAG: str(trial.number),
                schema.STUDY_TAG: self.study.study_name, schema.TRIAL_STATE_TAG: "FAIL", schema.FAIL_REASON_TAG: reason}
        pending = self._submit(self._create, self.sink.create_run, self.experiment_id, f"trial-{trial.number}", tags,
                               {**params, schema.TRIAL_NUMBER_PARAM: str(trial.number)})
        self._submit(self._writes, self.sink.close, self._link(trial, pending), "FAILED")

    def end_trial(self, trial, pending: Future, result, state: str) -> str:
        """Hand a finished trial's record to the writes; the run ends with the status its state maps to."""
        return self.end_trials([(trial, pending, result, state)])[0]

    def end_trials(self, ends: list[tuple]) -> list[str]:
        """``end_trial`` for (trial, pending, result, state) tuples; several records go in one
        transaction where the store allows. Their run ids."""
        writes = []
        for trial, pending, result, state in ends:
            run_id = self._link(trial, pending)
            rec = tracking.record(result, extra_params={schema.TRIAL_NUMBER_PARAM: trial.number, **self._extra},
                                  tags={schema.TRIAL_STATE_TAG: state})
            rec = replace(rec, params={})  # logged with the run's creation
            if state == "PRUNED":
                rec.finals = {}
                # KILLED is MLflow's nearest status, drawn like a failure: the name and description say pruned.
                rec.tags.update(pruned_tags(trial.number, result.history.stopped, type(self.study.pruner).__name__))
            if state == "COMPLETE":
                rec.finals.update(objectives_module.metrics(self.objectives, result))
                self._note_best(trial.number, run_id, result)
            figures = (result.history.values, result.predictions) if self.trial_figures else None
            writes.append((run_id, trial.number, state, rec, RUN_STATUS[state], figures))
        self._write(writes)
        return [write[0] for write in writes]

    def end_interrupted_trial(self, trial, pending: Future | None, cfg, history, reason: str,
                              run_status: str) -> str | None:
        """A trial that raised (or was interrupted): its params and the curves recorded so far."""
        if pending is None or (pending.done() and pending.exception() is not None):
            return None  # its run was never created
        run_id = self._link(trial, pending)
        rec = tracking.partial_record(cfg, history, reason, tags={schema.TRIAL_STATE_TAG: "FAIL"})
        self._write([(run_id, trial.number, "FAIL", replace(rec, params={}), run_status, None)])
        return run_id

    def _write(self, writes: list[tuple]) -> None:
        """Write (run id, trial number, state, record, status, figures) tuples: one by one, or in one
        ``write_many`` where the store takes them in one transaction."""
        def write(batch: list[tuple]) -> None:
            for run_id, _, _, rec, _, figures in batch:
                if figures is not None:
                    rec.artifacts.update(self._render(*figures))
            self.sink.write_many([(run_id, rec, status) for run_id, _, _, rec, status, _ in batch])

        def unwritten(batch: list[tuple], exc: BaseException | None) -> None:
            failed = set(exc.run_ids) if isinstance(exc, WriteFailed) else None
            with self._lock:
                for run_id, number, state, *_ in batch:
                    if failed is None or run_id in failed:
                        self._unwritten[run_id] = (number, state)

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
        return plots.png(plots.render(self.experiment, values, self._data, predictions))

    def _link(self, trial, pending: Future) -> str:
        try:
            run_id = pending.result()
        except Exception as exc:
            self._failed(exc)
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
            if self._best is None or sign * value < sign * self._best[0]:
                self._best = (value, number, run_id, (result.history.values, result.predictions),
                              result.final_metrics())

    def close(self) -> list[BaseException]:
        """Close abandoned trials' runs, write the study's summary to its parent run, and wait for
        every write to land. Returns the errors of writes that failed.

        Runs whose final write failed are closed as incomplete, and a completed trial among them is
        queued again, so that its configuration gets a full record."""
        errors: list[BaseException] = []
        try:
            # Trials that other workers' heartbeat checks failed while this one ran: close their runs.
            self._submit(self._writes, fail_abandoned_runs, self.sink, self.parent_run_id, abandoned_reasons(self.study))
            if self._best is not None and not self.trial_figures:
                # Rendered here, beside the last writes: this thread is idle now.
                self._submit(self._writes, self.sink.write, self._best[2],
                             tracking.RunRecord(params={}, history={}, artifacts=self._render(*self._best[3])), None)
        except TrackingFailed:
            pass
        self._shutdown()
        try:  # also after a failed write: the store may take this one, and the parent is then closed
            best = summary.summarize(self.study)
            finals = self._best[4] if self._best and best.get(schema.BEST_TRIAL_NUMBER) == self._best[1] else None
            note = summary.describe(self.study, self.experiment, self.experiment_id, self._params,
                                    objectives=self.objectives)
            summary.write(self.sink.client, self.parent_run_id, best, finals, summary.trials_csv(self.study),
                          self.study.trials, self.study.directions, note, objectives=self.objectives,
                          front_csv=summary.front_csv(self.study, self.objectives))
        except Exception as exc:  # what it could not write is left to `harness audit --fix`
            self._failed(exc)
        if self.failure is not None:
            errors.append(self.failure)
        self._close_unwritten()
        return errors

    def _shutdown(self) -> None:
        self._create.shutdown(wait=True)
        self._writes.shutdown(wait=True)

    def _close_unwritten(self) -> None:
        """The runs whose final write failed: marked incomplete, and the configuration of a COMPLETE
        trial among them queued again."""
        with self._lock:
            unwritten, self._unwritten = dict(self._unwritten), {}
        if not unwritten:
            return
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for number, state in sorted(unwritten.values()):
            if state == "COMPLETE" and number in by_number:
                with contextlib.suppress(Exception):  # the Optuna storage fails too: audit --fix queues it later
                    retry(self.study, by_number[number])
        with contextlib.suppress(Exception):  # the store still fails: `harness audit --fix` closes them later
            for run_id, (number, _) in unwritten.items():
                close_incomplete(self.sink, run_id, f"the final write of trial {number}'s record failed: "
                                                    f"{first_line(self.failure)}")


def pruned_tags(number: int, stopped: str, pruner: str) -> dict[str, str]:
    return {schema.RUN_NAME_TAG: f"trial-{number} ({stopped})",
            schema.NOTE_TAG: f"**Optuna trial {number}: {stopped}** by {pruner}. MLflow has no pruned status, so "
                             "the run is KILLED; its curves run up to that epoch, and it has no final metrics."}


def study_params(study, space, report_every, batch: int = 1,
                 objectives: tuple[str, ...] = objectives_module.DEFAULT) -> dict[str, str]:
    """The parent run's params: the study's settings and its search space, one param per axis."""
    params = {schema.SAMPLER_PARAM: type(study.sampler).__name__, schema.PRUNER_PARAM: type(study.pruner).__name__,
              schema.DIRECTION_PARAM: directions(study)}
    params[schema.OBJECTIVES_PARAM] = " ".join(objectives)
    if report_every is not None:
        params[schema.REPORT_EVERY_PARAM] = str(report_every)
    params[schema.BATCH_PARAM] = str(batch)
    for axis, value in (space.to_dict() if space is not None else {}).items():
        if axis == "grid_points" and type(study.sampler).__name__ != "GridSampler":
            continue
        params[schema.space_param(schema.PAIR_TRIAL_PARAM if axis == "pairs" else axis)] = describe_axis(axis, value)
    # For the eye, not for reading back (the study's harness.space attr has the space whole): a long
    # list of choices must not push a param past MLflow's limit and stop the search.
    return {k: v if len(v) <= MAX_SHOWN else v[:MAX_SHOWN - 3] + "..." for k, v in params.items()}


def directions(study) -> str:
    """The study's direction (``minimize``), or its directions space-separated (``minimize minimize``)."""
    return " ".join(d.name.lower() for d in study.directions)


def describe_axis(axis: str, value) -> str:
    """One axis of a space, as a person reads it: ``[0.0001, 0.1] log``, ``sgd+l1, adam+mse``."""
    if axis == "lr":
        return f"[{value[0]:g}, {value[1]:g}] log"
    if isinstance(value, list):
        return f"[{value[0]}, {value[1]}]" if axis == "epochs" else ", ".join(map(str, value))
    if not isinstance(value, dict):
        return str(value)
    if "choices" in value:
        text = "{" + ", ".join(map(str, value["choices"])) + "}"
    else:
        text = f"[{value['low']:g}, {value['high']:g}]" + (" log" if value.get("log") else "")
        text += f" step {value['step']:g}" if value.get("step") is not None else ""
    return text + (f" ({'/'.join(value['optimizers'])} only)" if value.get("optimizers") else "")


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


def first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


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
