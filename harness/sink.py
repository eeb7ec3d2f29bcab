"""Where a run's writes go: create it, write its record (finished or partial), close it.

``MlflowSink`` is the one implementation: MLflow's client in this process. Given a ``DirectWriter``
(harness.fast.mlflow_sql's, handed in by the command: on an SQLite store, MLflow's default), a
finished record goes in one transaction (metrics, tags and the run's status together, ~10x less CPU
than MLflow's ORM path), and a batch's runs and records take one transaction each; anything it does
not take, and everything without one, takes MLflow's public path. MLflow's client and the SQL path
open a session per call: threads may share one sink.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

from . import tracking
from .schema import FAIL_REASON_TAG, INCOMPLETE_TAG, PARENT_TAG
from .tracking import RunRecord
from .urls import local_folder


class WriteFailed(Exception):
    """The records of ``run_ids`` were not written (the others of the same ``write_many`` were)."""

    def __init__(self, run_ids: list[str], cause: BaseException):
        super().__init__(str(cause))
        self.run_ids = run_ids


class RunSink(Protocol):
    def create_run(self, experiment_id: str, name: str, tags: dict[str, str], params: dict[str, str]) -> str: ...

    def create_runs(self, experiment_id: str, runs: list[tuple[str, dict[str, str], dict[str, str]]]) -> list[str]: ...

    def write(self, run_id: str, record: RunRecord, status: str | None) -> None: ...

    def write_many(self, records: list[tuple[str, RunRecord, str | None]]) -> None: ...

    def close(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None: ...


class DirectWriter(Protocol):
    """A faster writer of the same rows: each call says whether it took them (else the public path
    writes them); ``groups`` cuts records into the transactions ``write_many`` takes."""

    def log_params(self, run_id: str, params: dict[str, str]) -> bool: ...

    def create_runs(self, experiment_id: str,
                    runs: list[tuple[str, dict[str, str], dict[str, str]]]) -> list[tuple[str, str]] | None: ...

    def groups(self, records: list) -> Iterable[list]: ...

    def write_many(self, records: list) -> bool: ...


class MlflowSink:
    def __init__(self, client, direct: DirectWriter | None = None):
        self.client = client
        self._direct = direct
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

    def create_runs(self, experiment_id: str, runs: list[tuple[str, dict[str, str], dict[str, str]]]) -> list[str]:
        """Runs (name, tags, params) as ``create_run`` makes each; one transaction on the SQL path."""
        made = self._direct.create_runs(experiment_id, runs) if self._direct is not None and runs else None
        if made is None:
            return [self.create_run(experiment_id, *run) for run in runs]
        for run_id, artifact_uri in made:
            folder = local_folder(artifact_uri)
            if folder is not None:
                self._folders[run_id] = folder
        return [run_id for run_id, _ in made]

    def write(self, run_id: str, record: RunRecord, status: str | None) -> None:
        """The record's artifacts, then its metrics, tags and params; then ``status`` (None: the run
        stays open). A failure part way leaves the run RUNNING: ``close_incomplete`` marks it."""
        try:
            self.write_many([(run_id, record, status)])
        except WriteFailed as exc:
            raise exc.__cause__ from None

    def write_many(self, records: list[tuple[str, RunRecord, str | None]]) -> None:
        """``write`` for several runs (run id, record, status): every run's artifacts first, then
        the rest on the SQL path in transactions of a bounded size (each all or none written), else
        run by run (WriteFailed names the runs whose record failed)."""
        for run_id, record, _ in records:
            self._write_artifacts(run_id, record)
        rows = [(run_id, [(name, value, step) for name, values in record.history.items()
                          for step, value in enumerate(values) if step >= record.first_step]
                 + [(name, value, 0) for name, value in record.finals.items()],
                 record.tags, record.params, status) for run_id, record, status in records]
        if self._direct is not None:
            public = self._write_direct(rows)
            records = [one for one in records if one[0] in public]
        failed, first = [], None
        for run_id, record, status in records:
            try:
                tracking.write(self.client, run_id, RunRecord(params=record.params, history=record.history,
                                                              finals=record.finals, tags=record.tags,
                                                              first_step=record.first_step))
                if status is not None:
                    self.client.set_terminated(run_id, status)
            except Exception as exc:  # the others are still written: only these runs lack their record
                failed.append(run_id)
                first = first or exc
        if failed:
            raise WriteFailed(failed, first) from first

    def _write_direct(self, rows: list[tuple]) -> set[str]:
        """The SQL path's share of ``write_many``: the ids of the runs it did not take."""
        groups = list(self._direct.groups(rows))
        public: set[str] = set()
        for n, group in enumerate(groups):
            try:
                taken = self._direct.write_many(group)
            except Exception as exc:  # the groups before are in the store; this one and the rest are not
                raise WriteFailed([row[0] for rest in groups[n:] for row in rest], exc) from exc
            if not taken:
                public.update(row[0] for row in group)
        return public

    def _write_artifacts(self, run_id: str, record: RunRecord) -> None:
        folder = self._folders.pop(run_id, None)
        if record.artifacts and folder is not None:
            # MLflow's local artifact store is the folder itself: a file written there is what
            # log_artifacts would have copied there (a third of a trial's store CPU saved).
            folder.mkdir(parents=True, exist_ok=True)
            for name, content in record.artifacts.items():
                folder.joinpath(name).write_bytes(content)
        elif record.artifacts:  # first, as above: a run is never closed before its artifacts are in
            tracking.write(self.client, run_id, RunRecord(params={}, history={}, artifacts=record.artifacts))

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

