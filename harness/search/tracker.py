"""A study in MLflow: one parent run per study, one child run per trial, written by the writer process.

Functions prefixed ``w_`` run in the writer process (see writer.py); ``StudyTracker`` is the main
process's side and only submits work and keeps the little state it needs (run ids, best trial).
"""
from __future__ import annotations

import io
import json
import os
import threading
from concurrent.futures import Future
from typing import Any

from .. import tracking
from . import writer
from .storages import backend, file_path, study_lock
from .workers import abandoned
from .writer import Writer

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
ROLE_TAG = "harness.role"
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


# ---- in the writer process -------------------------------------------------------------------

def w_prepare_store() -> None:
    """Create or migrate the MLflow store now, while the main process is still opening the study."""
    writer.client()


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
    writer._state.update(parent=run_id, experiment_id=parent.info.experiment_id)
    return parent.info.experiment_id, run_id


def w_create_trial_run(trial_number: int, tags: dict[str, str], params: dict[str, str]) -> str:
    """The trial's run, with its params from the start: a run whose worker dies still says what it ran."""
    from mlflow.entities import Param

    state = writer._state
    c = writer.client()
    run = c.create_run(state["experiment_id"], run_name=f"trial-{trial_number}",
                       tags={"mlflow.parentRunId": state["parent"], "optuna.trial_number": str(trial_number), **tags})
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def w_fail_stale_runs(parent_id: str, trial_numbers: list[int]) -> None:
    """Close the runs that the trials of a dead worker left RUNNING (one query, however many trials)."""
    if not trial_numbers:
        return
    c = writer.client()
    experiment = c.get_run(parent_id).info.experiment_id
    wanted = {str(n) for n in trial_numbers}
    for run in c.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                             "attributes.status = 'RUNNING'", max_results=50000):
        if run.data.tags.get("optuna.trial_number") in wanted:
            c.log_batch(run.info.run_id, tags=tracking.tag_list({
                tracking.FAIL_REASON_TAG: "worker died", "optuna.trial_state": "FAIL"}))
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
    """Tracks one invocation's trials of a study; ``close`` writes the study summary and drains."""

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
            _, self.parent_run_id = self.writer.submit(w_open_study, mlflow_experiment, study.study_name, known,
                                                       env_run_id, tags, urgent=True).result()
            if known != self.parent_run_id:
                study.set_user_attr(PARENT_ATTR, self.parent_run_id)

    def start_trial(self, trial, cfg) -> Future:
        params = tracking.params_of(cfg, {"trial_number": trial.number, **self._extra})
        return self.writer.submit(w_create_trial_run, trial.number, self._study_tags, params, urgent=True)

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
        self.writer.submit(w_write_trial, run_id, rec, RUN_STATUS[state], figures)
        return run_id

    def end_interrupted_trial(self, trial, pending: Future, cfg, history, reason: str, run_status: str) -> str:
        """A trial that raised (or was interrupted): its params and the curves recorded so far."""
        run_id = self._link(trial, pending)
        rec = tracking.partial_record(cfg, history, reason, {"trial_number": trial.number, **self._extra},
                                      tags={"optuna.trial_state": "FAIL"})
        self.writer.submit(w_write_trial, run_id, rec, run_status, None)
        return run_id

    @staticmethod
    def _link(trial, pending: Future) -> str:
        run_id = pending.result()
        if trial.user_attrs.get(RUN_ATTR) != run_id:  # not yet linked during training
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
        """Write the study's summary to its parent run and wait for every write to land."""
        try:
            parent = self.parent_run_id
            # Trials that other workers' heartbeat checks failed while this one ran: close their runs.
            self.writer.submit(w_fail_stale_runs, parent, sorted(abandoned(self.study.get_trials(deepcopy=False))))
            if self._best is not None and not self.trial_figures:
                # Rendered here, while the writer drains its queue: this process is idle now.
                self.writer.submit(w_log_files, self._best[2], render_png(self._best[3]))
            summary = summarize(self.study)
            if self._best is not None and summary.get("best_trial_number") == self._best[1]:
                summary["best_metrics"] = self._best[4]  # else the writer reads them off the best run
            self.writer.submit(w_close_study, parent, summary, trials_csv(self.study),
                               self.study.trials, self.study.direction)
        finally:
            errors = self.writer.close()
        return errors


def describe_storage(study) -> str:
    """Where a study lives, for a study opened by the user's own script (password removed)."""
    from .study import redact

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
