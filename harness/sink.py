"""Where a run's writes go: create it, write its record (finished or partial), close it.

``MlflowSink`` is the one implementation: MLflow's client in this process. A finished record on an
SQLite store (MLflow's default) goes in one transaction through ``mlflow_sql`` (metrics, tags and the
run's status together, ~10x less CPU than MLflow's ORM path); anything else takes MLflow's public
path. MLflow's client and the SQL path open a session per call: threads may share one sink.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from . import mlflow_sql, tracking
from .schema import FAIL_REASON_TAG, INCOMPLETE_TAG, PARENT_TAG
from .tracking import RunRecord
from .urls import local_folder


class RunSink(Protocol):
    def create_run(self, experiment_id: str, name: str, tags: dict[str, str], params: dict[str, str]) -> str: ...

    def write(self, run_id: str, record: RunRecord, status: str | None) -> None: ...

    def close(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None: ...


class MlflowSink:
    def __init__(self, client):
        self.client = client
        self._direct = mlflow_sql.DirectWriter.for_client(client)
        self._folders: dict[str, Path] = {}  # run id -> its local artifact folder, until its record is written

    @property
    def direct(self) -> bool:
        """Whether finished records take the one-transaction SQL path."""
        return self._direct is not None

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        """A RUNNING run with its params from the start: a run whose worker dies still says what it ran."""
        info = self.client.create_run(experiment_id, run_name=name, tags=tags).info
        run_id = info.run_id
        folder = local_folder(info.artifact_uri)
        if folder is not None:
            self._folders[run_id] = folder
        if params:
            if self._direct is not None:
                self._direct.log_params(run_id, params)
            else:
                tracking.write(self.client, run_id, RunRecord(params=params, history={}))
        return run_id

    def write(self, run_id: str, record: RunRecord, status: str | None) -> None:
        """The record's artifacts, then its metrics, tags and params; then ``status`` (None: the run
        stays open). A failure part way leaves the run RUNNING: ``close_incomplete`` marks it."""
        folder = self._folders.pop(run_id, None)
        if record.artifacts and folder is not None:
            # MLflow's local artifact store is the folder itself: a file written there is what
            # log_artifacts would have copied there (a third of a trial's store CPU saved).
            folder.mkdir(parents=True, exist_ok=True)
            for name, content in record.artifacts.items():
                folder.joinpath(name).write_bytes(content)
        elif record.artifacts:  # first, as above: a run is never closed before its artifacts are in
            tracking.write(self.client, run_id, RunRecord(params={}, history={}, artifacts=record.artifacts))
        rows = [(name, value, step) for name, values in record.history.items() for step, value in enumerate(values)]
        rows += [(name, value, 0) for name, value in record.finals.items()]
        if self._direct is not None and self._direct.write(run_id, rows, record.tags, record.params, status):
            return
        tracking.write(self.client, run_id, RunRecord(params=record.params, history=record.history,
                                                      finals=record.finals, tags=record.tags))
        if status is not None:
            self.client.set_terminated(run_id, status)

    def close(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
        if tags:
            self.client.log_batch(run_id, tags=tracking.tag_list(tags))
        self.client.set_terminated(run_id, status)

    def reopen(self, run_id: str, tags: dict[str, str]) -> None:
        """A finished run made RUNNING again (a resumed study's parent), with ``tags`` added."""
        self.client.update_run(run_id, status="RUNNING")
        self.client.log_batch(run_id, tags=tracking.tag_list(tags))

    def child_runs(self, parent_id: str, experiment_id: str | None = None) -> list:
        """Every run under ``parent_id``, in one query."""
        experiment_id = experiment_id or self.client.get_run(parent_id).info.experiment_id
        return self.client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                       max_results=50000)


def close_incomplete(sink: RunSink, run_id: str, reason: str) -> None:
    """A run whose final write failed part way: FAILED, saying what it lacks."""
    sink.close(run_id, "FAILED", {INCOMPLETE_TAG: reason, FAIL_REASON_TAG: reason})

