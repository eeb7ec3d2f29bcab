"""The top runs of a study (or an MLflow experiment) as a table, and their curves overlaid; for a study
of two objectives, also its Pareto front, from the runs' objective metrics."""
from __future__ import annotations

from matplotlib.figure import Figure

from . import schema
from .errors import UsageError, did_you_mean
from .runs import curves
from .tracking import scoped_tracking_uri

ROLE_COLUMN = f"tags.{schema.ROLE_TAG}"  # as mlflow.search_runs names the column
# Params that say how a run was made, not what it tried.
BOOKKEEPING = ("experiment", "seed", "device", schema.TORCH_VERSION_PARAM, schema.TORCH_THREADS_PARAM,
               schema.TRIAL_NUMBER_PARAM, schema.EXPERIMENT_SHA_PARAM)


def top_runs(client, *, study: str | None = None, mlflow_experiment: str | None = None, metric: str = schema.FINAL_TEST_LOSS,
             top: int | None = 5, descending: bool = False, front: dict[str, str] | None = None,
             then: dict[str, bool] | None = None):
    """A pandas frame of the top finished runs by ``metric`` (from mlflow.search_runs); all of them
    for ``top`` None. ``front``: only the runs on the Pareto front of these metrics ({metric: direction}).
    ``then``: runs equal in ``metric`` ranked by these ({metric: descending}), in order."""
    import mlflow

    from .tracking import filter_value

    where = ["attributes.status = 'FINISHED'"]
    if study:
        where.append(f"{schema.tag_filter(schema.STUDY_TAG)} = {filter_value(study)}")
        scope, experiment_ids = f"study {study!r}", None
    else:
        found = client.get_experiment_by_name(mlflow_experiment)
        if found is None:
            raise UsageError(f"unknown MLflow experiment {mlflow_experiment!r}")
        scope, experiment_ids = f"MLflow experiment {mlflow_experiment!r}", [found.experiment_id]
    with scoped_tracking_uri(client.tracking_uri):  # the fluent search reads the client's store (read-only or not)
        frame = mlflow.search_runs(experiment_ids=experiment_ids or [e.experiment_id for e in client.search_experiments()],
                                   filter_string=" and ".join(where), output_format="pandas",
                                   order_by=[f"metrics.{metric} {'DESC' if descending else 'ASC'}"])
    if ROLE_COLUMN in frame:
        frame = frame[frame[ROLE_COLUMN] != schema.ROLE_STUDY]
    column = f"metrics.{metric}"
    if frame.empty and study:
        raise UsageError(f"no finished run in study {study!r}{did_you_mean(study, _study_names(client))}")
    if frame.empty or column not in frame or frame[column].isna().all():
        known = sorted({c.removeprefix("metrics.") for c in frame.columns if c.startswith("metrics.")})
        raise UsageError(f"no finished run with metric {metric!r} in {scope}{did_you_mean(metric, known)}")
    # Ties are common where a metric counts (epochs): the next objective decides, not the store's order.
    keys = {column: descending, **{f"metrics.{m}": d for m, d in (then or {}).items() if f"metrics.{m}" in frame}}
    frame = frame[frame[column].notna()].sort_values(list(keys), ascending=[not d for d in keys.values()],
                                                     kind="stable")
    if front:
        frame = pareto_front(frame, front, scope)
    return frame if top is None else frame.head(top)


def pareto_front(frame, front: dict[str, str], scope: str):
    """The rows of ``frame`` that no other row betters in every metric of ``front`` ({metric: direction})
    and beats in one: the Pareto front, as Optuna's ``study.best_trials`` finds it."""
    import numpy as np

    columns = [f"metrics.{m}" for m in front]
    lacking = [m for m, c in zip(front, columns) if c not in frame]
    if lacking:
        raise UsageError(f"no finished run with metric {lacking[0]!r} in {scope}: not a study of these objectives")
    frame = frame.dropna(subset=columns)
    values = frame[columns].to_numpy(dtype=float) * np.array([1.0 if d == "minimize" else -1.0 for d in front.values()])
    dominated = [bool(((values <= row).all(axis=1) & (values < row).any(axis=1)).any()) for row in values]
    return frame[~np.array(dominated, dtype=bool)]


def study_objectives(client, study: str) -> dict[str, str]:
    """The study's objectives and their directions ({name: direction}), from its parent run's params."""
    parent = parent_run_id(client, study)
    if parent is None:
        raise UsageError(f"no study {study!r} with a parent run{did_you_mean(study, _study_names(client))}")
    params = client.get_run(parent).data.params
    names = params.get(schema.OBJECTIVES_PARAM, schema.TEST_LOSS).split()
    directions = params.get(schema.DIRECTION_PARAM, "minimize").split()
    return dict(zip(names, directions + ["minimize"] * (len(names) - len(directions))))


def _study_names(client) -> set[str]:
    """The studies the store has a parent run of (at most 1000 looked at)."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"{schema.tag_filter(schema.ROLE_TAG)} = '{schema.ROLE_STUDY}'", max_results=1000)
    return {r.data.tags[schema.STUDY_TAG] for r in runs if schema.STUDY_TAG in r.data.tags}


def table(frame):
    """The columns a user compares: run, trial, params, final metrics."""
    wanted = {"run_id": "run_id", f"tags.{schema.TRIAL_NUMBER_TAG}": "trial"}
    wanted.update({f"params.{p}": p for p in ("optimizer", "loss", "lr", "epochs")})
    # Any other param (a hyperparameter, batch_size, ...) that differs between the runs shown.
    # Sorted: mlflow.search_runs orders its columns differently from one call to the next.
    wanted.update({c: c.removeprefix("params.") for c in sorted(frame.columns) if c.startswith("params.")
                   and c.removeprefix("params.") not in BOOKKEEPING and frame[c].nunique(dropna=False) > 1})
    # Final metrics and the experiment's scalars; a per-epoch metric's latest value repeats a final one.
    # A study's own metrics (best_*, n_trials) are not a trial's.
    study_metrics = (schema.best(""), schema.N_TRIALS)
    wanted.update({c: c.removeprefix("metrics.") for c in sorted(frame.columns) if c.startswith("metrics.")
                   and not schema.is_curve(c.removeprefix("metrics.")) and not c.removeprefix("metrics.").startswith(study_metrics)})
    shown = frame[[c for c in wanted if c in frame]].rename(columns=wanted).dropna(axis=1, how="all")
    import pandas as pd

    for column in shown.columns:  # params are strings in MLflow; numbers print as numbers
        if column in wanted.values() and column not in ("run_id", "trial", "optimizer", "loss"):
            try:
                shown[column] = pd.to_numeric(shown[column])
            except (ValueError, TypeError):
                pass
    return shown.reset_index(drop=True)


def overlay(client, frame, title: str) -> Figure:
    """Train (dashed) and test (solid) loss of each run, from its metric history."""
    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    for colour, (_, row) in zip(_colours(), frame.iterrows()):
        history = curves(client, row["run_id"], (schema.TRAIN_LOSS, schema.TEST_LOSS))
        trial = row.get(f"tags.{schema.TRIAL_NUMBER_TAG}")
        label = f"trial {trial}" if isinstance(trial, str) else row["run_id"][:8]
        ax.plot(history[schema.TEST_LOSS], color=colour, label=f"{label} test")
        ax.plot(history[schema.TRAIN_LOSS], color=colour, linestyle="--", alpha=0.7, label=f"{label} train")
    ax.set(title=title, xlabel="Epochs", ylabel="Loss", yscale="log")
    ax.legend(fontsize=8, ncol=2)
    return fig


def _colours():
    import matplotlib

    return matplotlib.colormaps["tab10"].colors


def parent_run_id(client, study: str) -> str | None:
    from .tracking import filter_value

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1,
                              filter_string=f"{schema.tag_filter(schema.STUDY_TAG)} = {filter_value(study)} and "
                                            f"{schema.tag_filter(schema.ROLE_TAG)} = '{schema.ROLE_STUDY}'")
    return runs[0].info.run_id if runs else None
