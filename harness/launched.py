"""The run `mlflow run` made for this invocation, handed over in $MLFLOW_RUN_ID.

The variable outlives the invocation it was meant for (a shell's export, a job script's leftover):
a run is adopted only when it is what `mlflow run` makes, RUNNING and with nothing of another run's
record, so that a stray id never renames, retags or rewrites a run someone logged."""
from __future__ import annotations

import os

from .errors import UsageError, shown
from .schema import HARNESS_TAG_PREFIXES, SOURCE_TYPE_TAG
from .store_files import not_made
from .urls import redact, sqlite_path

VARIABLE = "MLFLOW_RUN_ID"


def launched_id() -> str | None:
    """The id in $MLFLOW_RUN_ID; an empty one is no id (MLflow's own start_run reads it so)."""
    return os.environ.get(VARIABLE) or None


def _refusal(value: str, why: str) -> UsageError:
    return UsageError(f"{VARIABLE}={shown([value])}: {why}; it is how `mlflow run` hands its command the run it "
                      f"made: unset it to log a new run")


def refused_offline(tracking_uri: str) -> str | None:
    """What can be told without opening the store: a SQLite store not made yet holds no run (so that
    refusing the id does not create the store)."""
    value, path = launched_id(), sqlite_path(tracking_uri)
    if value and path is not None and not_made(path):
        return str(_refusal(value, f"no such run: the MLflow store {redact(tracking_uri)} does not exist yet"))
    return None


def launched_run(client, own: str | None = None):
    """The run $MLFLOW_RUN_ID names, once it is `mlflow run`'s fresh run; None where the variable is
    unset. ``own``: the run the command logs into anyway (a study's parent run), taken as it is.
    Else a UsageError naming the variable, its value and why, before anything is written."""
    from mlflow.entities import SourceType
    from mlflow.exceptions import MlflowException

    value = launched_id()
    if not value:
        return None
    try:
        run = client.get_run(value)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise  # the store failed: said as such by the caller
        raise _refusal(value, f"no such run in the MLflow store {redact(client.tracking_uri)}") from None
    if run.info.run_id == own:
        return run
    why = _not_fresh(run, SourceType.to_string(SourceType.PROJECT))
    if why:
        raise _refusal(value, why)
    return run


def _not_fresh(run, project: str) -> str | None:
    """Why ``run`` is not a run `mlflow run` has just made for its command (its source type ``project``), or None."""
    info, data = run.info, run.data
    named = f"run {info.run_id} ({shown([info.run_name])})"  # a run's name may be anything
    if info.lifecycle_stage != "active":
        return f"{named} is deleted"
    if info.status != "RUNNING":
        return f"{named} is {info.status}, not the RUNNING run `mlflow run` makes"
    logged = sorted(k for k in data.tags if k.startswith(HARNESS_TAG_PREFIXES))
    if logged:
        return f"{named} holds a record of the harness already (tag {shown(logged[:1])})"
    if data.metrics:
        return f"{named} holds metrics already ({shown(sorted(data.metrics), 3)})"
    source = data.tags.get(SOURCE_TYPE_TAG)
    if source != project:
        return f"{named} was not made by `mlflow run` ({SOURCE_TYPE_TAG} is {shown([source]) if source else 'unset'}, not {project!r})"
    return None
