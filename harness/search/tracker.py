"""A study in MLflow: one parent run per study, one child run per trial, written by the writer process.

Functions prefixed ``w_`` run in the writer process (see writer.py); ``StudyTracker`` is the main
process's side and only submits work and keeps the little state it needs (run ids, best trial).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from concurrent.futures import Future
from typing import Any

from .. import tracking
from ..errors import HarnessError
from . import writer
from .storages import backend, file_path, study_lock
from .workers import FAIL_REASON_ATTR, abandoned, retry
from .writer import Writer, WriterGone

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
ROLE_TAG = "harness.role"
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# On a run whose final write failed part way (a full disk, a writer that died): what it lacks.
INCOMPLETE_TAG = "harness.record_incomplete"


class TrackingFailed(HarnessError):
    """A write to the MLflow store failed: the search stops rather than train trials it cannot record."""


# ---- in the writer process -------------------------------------------------------------------

def w_prepare_store(experiment_name: str | None) -> str | None:
    """Create or migrate the MLflow store now, while the main process is still opening the study,
    and say why the runs could not go to their MLflow experiment (None: they can)."""
    return tracking.check_experiment(writer.client(), experiment_name)


def w_open_study(experiment_name: str | None, study_name: str, known_parent: str | None,
                 env_run_id: str | None, tags: dict[str, str]) -> tuple[str, str]:
    """Find or create the study's parent run, mark it RUNNING and tag it. Returns (experiment, run)."""
    from mlflow.exceptions import MlflowException

    c = writer.client()
    parent = None
    for candidate in (known_parent, env_run_id):
        if candidate:
            try:
                run = c.get_run(candidate)
            except MlflowException:
                continue
            if run.info.lifecycle_stage == "active":
                parent = run
                break
    if parent is None:
        experiment_id = tracking.experiment_id(c, experiment_name)
        parent = c.create_run(experiment_id, run_name=study_name, tags={ROLE_TAG: "study"})
    run_id = parent.info.run_id
    if parent.info.status != "RUNNING":
        c.update_run(run_id, status="RUNNING")
    c.log_batch(run_id, tags=tracking.tag_list({**tags, ROLE_TAG: "study"}))
    return parent.info.experiment_id, run_id


def w_create_trial_run(experiment_id: str, parent_id: str, trial_number: int, tags: dict[str, str],
                       params: dict[str, str]) -> str:
    """The trial's run, with its params from the start: a run whose worker dies still says what it ran."""
    from mlflow.entities import Param

    c = writer.client()
    run = c.create_run(experiment_id, run_name=f"trial-{trial_number}",
                       tags={"mlflow.parentRunId": parent_id, "optuna.trial_number": str(trial_number), **tags})
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def w_fail_stale_runs(parent_id: str, reasons: dict[int, str]) -> None:
    """Close the runs that abandoned trials left RUNNING, each with its trial's fail reason (one
    query, however many trials)."""
    if not reasons:
        return
    c = writer.client()
    experiment = c.get_run(parent_id).info.experiment_id
    wanted = {str(n): reason for n, reason in reasons.items()}
    # FINISHED too: a worker that wrote its run and died before Optuna recorded the end (or a torn
    # journal that lost it) leaves a whole run whose trial failed and is retried.
    for run in c.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                             "attributes.status != 'FAILED'", max_results=50000):
        number = run.data.tags.get("optuna.trial_number")
        if number in wanted and run.info.status in ("RUNNING", "FINISHED"):
            c.log_batch(run.info.run_id, tags=tracking.tag_list({
                tracking.FAIL_REASON_TAG: wanted[number], "optuna.trial_state": "FAIL"}))
            c.set_terminated(run.info.run_id, "FAILED")


def w_write_trial(run_id: str, rec: tracking.RunRecord, status: str, figures: tuple | None) -> None:
    c = writer.client()
    tracking.write(c, run_id, rec, skip_params=set(rec.params))  # logged with the run's creation
    if figures is not None:
        w_log_figures(run_id, *figures)
    c.set_terminated(run_id, status)


def w_log_files(run_id: str, files: dict[str, bytes]) -> None:
    tracking.write(writer.client(), run_id, tracking.RunRecord(params={}, history={}, artifacts=files))


def w_log_figures(run_id: str, experiment_name: str, values: dict, predictions) -> None:
    from .. import plots
    from ..experiment import load

    experiment = load(experiment_name)
    key = ("data", experiment_name)  # made once per writer: every trial of a study shares it
    if key not in writer._state:
        writer._state[key] = experiment.load_data()
    data = writer._state[key]
    tracking.log_figures(writer.client(), run_id, plots.render(experiment, values, data, predictions))


def w_close_study(run_id: str, summary: dict[str, Any], trials_csv: bytes, trials: list, direction) -> None:
    """The study's end-of-invocation record on its parent run: best trial, table, plots."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna.visualization")  # flat axes
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    c = writer.client()
    metrics = {k: summary[k] for k in ("best_value", "best_trial_number", "n_trials") if summary.get(k) is not None}
    if summary.get("best_run_id"):
        # The best trial's final metrics (final_test_loss, the experiment's scalars and their errors
        # against a declared truth), so the collapsed runs table says something true of the study.
        from mlflow.exceptions import MlflowException

        finals = summary.pop("best_metrics", None)
        if finals is None:  # the best trial ran in an earlier invocation: its run has them
            try:
                finals = {k: v for k, v in c.get_run(summary["best_run_id"]).data.metrics.items()
                          if not tracking.is_curve(k)}
            except MlflowException:  # its run was deleted: the summary goes on without them
                finals = {}
        metrics.update({f"best_{k}": v for k, v in finals.items()})
    tags = {f"best.{k}": str(v) for k, v in summary.get("best_params", {}).items()}
    if summary.get("best_run_id"):
        tags["best_run_id"] = summary["best_run_id"]
        tags["best_params"] = json.dumps(summary["best_params"])
    c.log_batch(run_id, metrics=tracking.metric_list(metrics, step=summary["n_trials"]), tags=tracking.tag_list(tags))
    c.log_text(run_id, trials_csv.decode(), "trials.csv")
    c.log_dict(run_id, summary, "best_params.json")
    study = optuna.create_study(direction=direction)
    study.add_trials([t for t in trials if t.state.is_finished()])
    plots = {"optimization_history.png": ovm.plot_optimization_history,
             "parallel_coordinate.png": ovm.plot_parallel_coordinate}
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(completed) >= 5 and len({tuple(sorted(t.params.items())) for t in completed}) > 1:
        # PED-ANOVA: Optuna's own evaluator, ~40x faster than fANOVA on a 200-trial study.
        from optuna.importance import PedAnovaImportanceEvaluator

        plots["param_importances.png"] = lambda s: ovm.plot_param_importances(s, evaluator=PedAnovaImportanceEvaluator())
    if completed:
        for name, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError):  # e.g. importances on a degenerate study
                continue
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(10, 6)
            c.log_figure(run_id, figure, name)
            plt.close(figure)
    c.set_terminated(run_id, "FINISHED")


# ---- in the main process -----------------------------------------------------------------------

class StudyTracker:
    """Tracks one invocation's trials of a study; ``close`` writes the study summary and drains.

    The first write that fails (a full disk, a store gone, the writer process killed) is kept in
    ``failure``; ``check`` then raises TrackingFailed, so the search stops instead of training
    trials it cannot record. Runs whose final write failed are closed as incomplete by ``close``
    (or, while the store is still failing, by ``harness audit --fix`` later).
    """

    def __init__(self, study, experiment, *, mlflow_experiment: str | None = None,
                 storage_label: str = "", sampler: str = "", pruner: str = "", trial_figures: bool = False,
                 writer: Writer | None = None, env_run_id: str | None = None):
        self.study = study
        experiment_name = experiment.name
        # How the writer process finds the experiment again (a name, a module or a file path).
        self.experiment_reference = experiment.reference or experiment.name
        self._extra = tracking.source_params(experiment)
        self.trial_figures = trial_figures
        self.writer = writer or Writer(default_tracking_uri())
        self.failure: BaseException | None = None
        self._unwritten: dict[str, tuple[int, str]] = {}  # run id -> (trial number, state) of failed final writes
        tags = {"optuna.study_name": study.study_name, "optuna.storage": storage_label or describe_storage(study),
                "optuna.sampler": sampler or type(study.sampler).__name__,
                "optuna.pruner": pruner or type(study.pruner).__name__,
                "optuna.direction": study.direction.name, "harness.experiment": experiment_name}
        self._study_tags = {"optuna.study_name": study.study_name}
        self._lock = threading.Lock()
        self._best: tuple[float, int, str, dict, Any] | None = None
        # Workers starting together must agree on one parent run: find-or-create it under the
        # study's lock, and publish it in the study before letting the next worker look.
        with study_lock(study._storage, f"parent-{study.study_name}"):
            known = study.user_attrs.get(PARENT_ATTR)
            try:
                self.experiment_id, self.parent_run_id = self._submit(w_open_study, mlflow_experiment, study.study_name, known,
                                                     env_run_id, tags, urgent=True).result()
            except Exception as exc:
                raise TrackingFailed(f"cannot open the study's parent run: {_first_line(exc)}") from None
            if known != self.parent_run_id:
                study.set_user_attr(PARENT_ATTR, self.parent_run_id)

    def _submit(self, fn, *args, urgent: bool = False, on_error=None) -> Future:
        try:
            future = self.writer.submit(fn, *args, urgent=urgent)
        except WriterGone as exc:
            self._failed(exc)
            raise TrackingFailed(f"tracking failed: {exc}") from None

        def done(f: Future) -> None:
            if f.exception() is not None:
                self._failed(f.exception())
                if on_error:
                    on_error()
        future.add_done_callback(done)
        return future

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failure = self.failure or exc

    def check(self) -> None:
        """Raise TrackingFailed if any write has failed so far (or the writer process died)."""
        if self.failure is None and self.writer.died is not None:
            self._failed(self.writer.died)
        if self.failure is not None:
            what = "" if isinstance(self.failure, WriterGone) else "a write to the MLflow store failed: "
            raise TrackingFailed(f"tracking failed: {what}{_first_line(self.failure)}")

    def start_trial(self, trial, cfg) -> Future:
        self.check()
        params = tracking.params_of(cfg, {"trial_number": trial.number, **self._extra})
        return self._submit(w_create_trial_run, self.experiment_id, self.parent_run_id, trial.number,
                            self._study_tags, params, urgent=True)

    def end_trial(self, trial, pending: Future, result, state: str) -> str:
        """Hand a finished trial's record to the writer; the run ends with the status its state maps to."""
        run_id = self._link(trial, pending)
        rec = tracking.record(result, extra_params={"trial_number": trial.number, **self._extra},
                              tags={"optuna.trial_state": state})
        if state == "PRUNED":
            rec.finals = {}
        figures = self._figure_args(result) if self.trial_figures else None
        if state == "COMPLETE":
            self._note_best(trial.number, run_id, result)
        self._write(run_id, trial.number, state, rec, RUN_STATUS[state], figures)
        return run_id

    def end_interrupted_trial(self, trial, pending: Future | None, cfg, history, reason: str,
                              run_status: str) -> str | None:
        """A trial that raised (or was interrupted): its params and the curves recorded so far."""
        if pending is None or (pending.done() and pending.exception() is not None):
            return None  # its run was never created
        run_id = self._link(trial, pending)
        rec = tracking.partial_record(cfg, history, reason, {"trial_number": trial.number, **self._extra},
                                      tags={"optuna.trial_state": "FAIL"})
        self._write(run_id, trial.number, "FAIL", rec, run_status, None)
        return run_id

    def _write(self, run_id: str, number: int, state: str, rec, status: str, figures) -> None:
        def unwritten() -> None:
            with self._lock:
                self._unwritten[run_id] = (number, state)
        try:
            self._submit(w_write_trial, run_id, rec, status, figures, on_error=unwritten)
        except TrackingFailed:
            unwritten()

    def _link(self, trial, pending: Future) -> str:
        try:
            run_id = pending.result()
        except Exception as exc:
            self._failed(exc)
            raise TrackingFailed(f"tracking failed: cannot create the run of trial {trial.number}: "
                                 f"{_first_line(exc)}") from None
        if trial.user_attrs.get(RUN_ATTR) != run_id:  # not yet linked during training
            with contextlib.suppress(Exception):  # the Optuna storage failing must not keep the run open
                trial.set_user_attr(RUN_ATTR, run_id)
        return run_id

    def _figure_args(self, result) -> tuple:
        return (self.experiment_reference, result.history.values, result.predictions)

    def _note_best(self, number: int, run_id: str, result) -> None:
        value = result.history.last("test_loss")
        sign = 1 if self.study.direction.name == "MINIMIZE" else -1
        with self._lock:
            if self._best is None or sign * value < sign * self._best[0]:
                self._best = (value, number, run_id, self._figure_args(result), result.final_metrics())

    def close(self) -> list[BaseException]:
        """Write the study's summary to its parent run and wait for every write to land.

        Runs whose final write failed are closed as incomplete, and a completed trial among them is
        queued again, so that its configuration gets a full record."""
        errors: list[BaseException] = []
        try:
            parent = self.parent_run_id
            # Trials that other workers' heartbeat checks failed while this one ran: close their runs.
            self._submit(w_fail_stale_runs, parent, abandoned_reasons(self.study))
            if self._best is not None and not self.trial_figures:
                # Rendered here, while the writer drains its queue: this process is idle now.
                self._submit(w_log_files, self._best[2], render_png(self._best[3]))
            summary = summarize(self.study)
            if self._best is not None and summary.get("best_trial_number") == self._best[1]:
                summary["best_metrics"] = self._best[4]  # else the writer reads them off the best run
            self._submit(w_close_study, parent, summary, trials_csv(self.study),
                         self.study.trials, self.study.direction)
        except TrackingFailed:
            pass  # the writer is gone: what it could not write is left to `harness audit --fix`
        finally:
            errors = self.writer.close()
        self._close_unwritten()
        return errors

    def _close_unwritten(self) -> None:
        """The runs whose final write failed: marked incomplete (in this process, the writer being
        done), and the configuration of a COMPLETE trial among them queued again."""
        with self._lock:
            unwritten, self._unwritten = dict(self._unwritten), {}
        if not unwritten:
            return
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for number, state in sorted(unwritten.values()):
            if state == "COMPLETE" and number in by_number:
                try:
                    retry(self.study, by_number[number])
                except Exception:  # the Optuna storage fails too: audit --fix queues it later
                    pass
        try:
            client = tracking.open_client(default_tracking_uri())
            for run_id, (number, _) in unwritten.items():
                close_incomplete(client, run_id, f"the final write of trial {number}'s record failed: "
                                                 f"{_first_line(self.failure)}")
        except Exception:  # the store still fails: `harness audit --fix` closes them later
            pass


def abandoned_reasons(study) -> dict[int, str]:
    """The abandoned trials (failed, their configuration queued again) and why each failed."""
    trials = study.get_trials(deepcopy=False)
    numbers = abandoned(trials)
    return {t.number: t.user_attrs.get(FAIL_REASON_ATTR) or "worker died" for t in trials if t.number in numbers}


def close_incomplete(client, run_id: str, reason: str) -> None:
    client.log_batch(run_id, tags=tracking.tag_list({INCOMPLETE_TAG: reason, tracking.FAIL_REASON_TAG: reason}))
    client.set_terminated(run_id, "FAILED")


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def describe_storage(study) -> str:
    """Where a study lives, for a study opened by the user's own script (password removed)."""
    from ..urls import redact

    storage = backend(study._storage)
    if getattr(storage, "url", None):
        return redact(storage.url)
    path = file_path(storage)
    return f"journal:{path}" if path else type(storage).__name__


def render_png(figure_args: tuple) -> dict[str, bytes]:
    from .. import plots
    from ..experiment import load

    experiment_name, values, predictions = figure_args
    experiment = load(experiment_name)
    return plots.png(plots.render(experiment, values, experiment.load_data(), predictions))


def default_tracking_uri() -> str:
    """MLflow's own resolution ($MLFLOW_TRACKING_URI, else the local default), without importing mlflow."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def summarize(study) -> dict[str, Any]:
    from optuna.trial import TrialState

    summary: dict[str, Any] = {"study_name": study.study_name, "n_trials": len(study.trials)}
    if any(t.state == TrialState.COMPLETE for t in study.trials):
        best = study.best_trial
        summary.update(best_value=best.value, best_trial_number=best.number, best_params=best.params,
                       best_run_id=best.user_attrs.get(RUN_ATTR))
    return summary


def trials_csv(study) -> bytes:
    frame = trials_frame(study)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def trials_frame(study):
    frame = study.trials_dataframe()
    column = f"user_attrs_{RUN_ATTR}"
    frame[RUN_ATTR] = frame[column] if column in frame else None
    return frame
