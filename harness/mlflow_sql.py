"""The one place the harness writes through MLflow internals: a run's record in one SQL transaction.

MLflow's public ``log_batch`` on an SQL store builds an ORM object per metric value and checks each
against the latest one: ~0.1 ms of CPU a value, as much as training a reference trial for a
225-epoch record. The same rows inserted with one ``executemany`` cost ~10x less. This module does
that for the store MLflow's own client opened (its engine and table models), and only:

- on an SQLite store and the MLflow versions in ``TESTED`` (tests/test_mlflow_conformance.py reads back every value
  through the public API, histories, latest metrics, ``search_runs`` and the UI's REST endpoints,
  beside the same record written by ``log_batch``; on another version it fails and this path is off);
- on a run that is active and has none of the record's metrics, params or tags yet, with names and
  values MLflow's own validation would accept without a change. Anything else returns False and
  the caller takes the public path, which validates and explains.
"""
from __future__ import annotations

import math
import re
import time

from .schema import RUN_NAME_TAG

TESTED = ("3.17.",)  # MLflow versions whose tables and semantics the conformance test checked
_NAME = re.compile(r"^[A-Za-z0-9_\-. /]{1,250}$")  # a subset of what MLflow's validation allows
_MAX_DOUBLE = 1.7976931348623157e308  # what MLflow stores for +-inf


class DirectWriter:
    def __init__(self, store):
        self.store = store

    @classmethod
    def for_client(cls, client) -> "DirectWriter | None":
        import mlflow
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        if not mlflow.__version__.startswith(TESTED):
            return None
        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        # SQLite only: the conformance test runs there. PostgreSQL named directly as the tracking
        # store takes the public path until a test compares it too.
        if not isinstance(store, SqlAlchemyStore) or store.engine.dialect.name != "sqlite":
            return None
        return cls(store)

    def log_params(self, run_id: str, params: dict[str, str]) -> bool:
        return self.write(run_id, [], {}, params, None)

    def write(self, run_id: str, metrics: list[tuple[str, float, int]], tags: dict[str, str],
              params: dict[str, str], status: str | None) -> bool:
        """Insert ``metrics`` (key, value, step), ``tags`` and ``params`` and set ``status`` in one
        transaction. False, with nothing written, when the record is not one this path takes."""
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
        from sqlalchemy import insert, select, update

        if not _plain(metrics, tags, params, MAX_TAG_VAL_LENGTH, MAX_PARAM_VAL_LENGTH):
            return False
        tags = dict(tags)
        # MLflow keeps a run's name twice, the runs row and its tag: a rename sets both, as MLflow's set_tag does.
        name = tags.pop(RUN_NAME_TAG, None)
        now = int(time.time() * 1000)
        rows, latest = [], {}
        for key, value, step in metrics:
            value = float(value)
            is_nan = math.isnan(value)
            stored = 0.0 if is_nan else max(-_MAX_DOUBLE, min(_MAX_DOUBLE, value))
            row = {"key": key, "value": stored, "timestamp": now, "step": step, "is_nan": is_nan, "run_uuid": run_id}
            rows.append(row)
            # MLflow's latest value: the largest (step, timestamp, value).
            if key not in latest or (step, stored) > (latest[key]["step"], latest[key]["value"]):
                latest[key] = row
        with self.store.ManagedSessionMaker() as session:
            run = session.execute(select(SqlRun.status, SqlRun.lifecycle_stage).where(SqlRun.run_uuid == run_id)).first()
            if run is None or run.lifecycle_stage != "active":
                return False
            for model, keys in ((SqlLatestMetric, list(latest)), (SqlParam, list(params)), (SqlTag, list(tags))):
                if keys and session.execute(select(model.key).where(model.run_uuid == run_id, model.key.in_(keys))).first():
                    return False  # already there: MLflow's merge and conflict rules apply
            if rows:
                session.execute(insert(SqlMetric.__table__), rows)
                session.execute(insert(SqlLatestMetric.__table__), list(latest.values()))
            if params:
                session.execute(insert(SqlParam.__table__), [{"key": k, "value": v, "run_uuid": run_id}
                                                             for k, v in params.items()])
            if tags:
                session.execute(insert(SqlTag.__table__), [{"key": k, "value": v, "run_uuid": run_id}
                                                           for k, v in tags.items()])
            if name is not None:
                session.execute(update(SqlRun).where(SqlRun.run_uuid == run_id).values(name=name))
                renamed = session.execute(update(SqlTag).where(SqlTag.run_uuid == run_id, SqlTag.key == RUN_NAME_TAG)
                                          .values(value=name))
                if renamed.rowcount == 0:
                    session.execute(insert(SqlTag.__table__), [{"key": RUN_NAME_TAG, "value": name, "run_uuid": run_id}])
            if status is not None:
                session.execute(update(SqlRun).where(SqlRun.run_uuid == run_id).values(status=status, end_time=now))
        return True


def _plain(metrics, tags, params, max_tag: int, max_param: int) -> bool:
    """Names and values that MLflow's validation takes as they are."""
    for key, value, step in metrics:
        if not _NAME.match(key) or type(value) not in (float, int) or type(step) is not int or step < 0:
            return False
    return (all(_NAME.match(k) and isinstance(v, str) and len(v) <= max_tag for k, v in tags.items())
            and all(_NAME.match(k) and isinstance(v, str) and len(v) <= max_param for k, v in params.items()))
