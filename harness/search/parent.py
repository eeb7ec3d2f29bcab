"""A study's parent run in MLflow: found or created once for all workers, and its summary."""
from __future__ import annotations

from dataclasses import dataclass

from .. import schema, tracking
from ..errors import first_line
from ..launched import launched_run
from ..experiment import Experiment
from ..schema import PARENT_ATTR, ROLE_STUDY, ROLE_TAG
from ..sink import RunSink
from . import objectives as objectives_module
from . import summary
from .durable import optuna_private
from .options import TrialOptions
from .recorder import BestTrial, TrackingFailed
from .durable.storages import describe, study_lock

MAX_SHOWN = 500  # characters of a parent run's param


@dataclass(frozen=True)
class ParentRun:
    """The study's parent run: where its trials' runs hang, and where its summary goes."""
    sink: RunSink
    study: object
    experiment: Experiment
    experiment_id: str
    run_id: str
    params: dict[str, str]  # what the summary's description lists
    importance: bool = False  # the summary's figures include the params' importances

    @classmethod
    def open(cls, sink: RunSink, study, options: TrialOptions) -> "ParentRun":
        """Workers starting together must agree on one parent run: it is found or created under the
        study's lock, and published in the study before the next worker looks."""
        tags = {schema.STUDY_TAG: study.study_name, schema.STORAGE_TAG: describe(optuna_private.storage_of(study)),
                schema.SAMPLER_TAG: type(study.sampler).__name__, schema.PRUNER_TAG: type(study.pruner).__name__,
                schema.DIRECTION_TAG: directions(study).upper(), schema.EXPERIMENT_TAG: options.experiment.name,
                **options.study_tags, ROLE_TAG: ROLE_STUDY}
        # Two objectives: nothing is reported (Optuna prunes no multi-objective study), so no cadence is logged.
        reports = options.report_every if len(options.objectives) == 1 else None
        params = {**study_params(study, options.space, reports, options.batch, options.objectives),
                  **options.study_params}
        with study_lock(optuna_private.storage_of(study), f"parent-{study.study_name}"):
            known = study.user_attrs.get(PARENT_ATTR)
            # $MLFLOW_RUN_ID naming a run that is not this invocation's is the user's input: it passes.
            with tracking.store_failures(lambda exc, _: TrackingFailed(f"cannot open the study's parent run: "
                                                                       f"{first_line(exc)}")):
                experiment_id, run_id = _find_or_create(sink, study, options.mlflow_experiment, known, tags, params)
            if known != run_id:
                study.set_user_attr(PARENT_ATTR, run_id)
        return cls(sink, study, options.experiment, experiment_id, run_id, params, options.importance)

    def write_summary(self, best: BestTrial | None, objectives: tuple[str, ...]) -> None:
        """The study's summary: its best trial (with ``best``'s final metrics when it is that trial),
        its trials and its description."""
        study = self.study
        found = summary.summarize(study)
        finals = best.finals if best and found.get(schema.BEST_TRIAL_NUMBER) == best.number else None
        note = summary.describe(study, self.experiment, self.experiment_id, self.params, objectives=objectives)
        summary.write(self.sink.client, self.run_id, found, finals, summary.trials_csv(study), study.trials,
                      study.directions, note, objectives=objectives, front_csv=summary.front_csv(study, objectives),
                      importance=self.importance)


def _find_or_create(sink: RunSink, study, mlflow_experiment: str | None, known: str | None, tags: dict,
                    params: dict) -> tuple[str, str]:
    """The study's parent run (the one it knows, else `mlflow run`'s own, else a new one), RUNNING,
    tagged, and with the params it lacks (a param once logged keeps its value: MLflow refuses a change).
    Its experiment id and run id."""
    from mlflow.exceptions import MlflowException

    client = sink.client
    made = launched_run(client, own=known)  # `mlflow run` made this run for the invocation
    launched = made.info.run_id if made is not None else None
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
            tags = {**tags, schema.RUN_NAME_TAG: study.study_name}
        if run.info.status != "RUNNING":
            sink.reopen(run_id, tags)
        else:
            client.log_batch(run_id, tags=tracking.tag_list(tags))
        if new:
            tracking.write(client, run_id, tracking.RunRecord(params=new, history={}))
        if launched and launched != run_id:
            _point_to_parent(sink, study.study_name, launched, run.info.experiment_id, run_id)
        return run.info.experiment_id, run_id
    # By default, in the MLflow experiment named after the harness experiment (the parent's tag).
    experiment_id = tracking.experiment_id(client, mlflow_experiment, tags[schema.EXPERIMENT_TAG])
    return experiment_id, sink.create_run(experiment_id, study.study_name, tags, params)


def _point_to_parent(sink: RunSink, name: str, launched: str, experiment_id: str, parent_id: str) -> None:
    """`mlflow run` on a study that has its parent run already: MLflow's run for this invocation
    says where the trials are, instead of standing empty beside them."""
    from mlflow.exceptions import MlflowException

    note = (f"This `mlflow run` resumed the Optuna study **{name}**. Its trials are child runs of the "
            f"study's parent run [{name}](#/experiments/{experiment_id}/runs/{parent_id}), which "
            "holds the study's summary.")
    try:
        sink.client.log_batch(launched, tags=tracking.tag_list({
            schema.RUN_NAME_TAG: f"{name} (resumed)", schema.NOTE_TAG: note, schema.STUDY_RUN_TAG: parent_id}))
    except MlflowException:  # not in this store, or deleted: nothing stands empty there
        pass


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
