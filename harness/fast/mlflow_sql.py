"""The one place the harness writes through MLflow internals: a run's record in one SQL transaction.

MLflow's public ``log_batch`` on an SQL store builds an ORM object per metric value and checks each
against the latest one: ~0.1 ms of CPU a value, as much as training a reference trial for a
225-epoch record. The same rows inserted with one ``executemany`` cost ~10x less. This module does
that for the store MLflow's own client opened (its engine and table models), and only:

- on an SQLite store, the MLflow releases and the schema revision in ``harness.compat``
  (tests/test_mlflow_conformance.py reads back every value through the public API, histories, latest
  metrics, ``search_runs`` and the UI's REST endpoints, beside the same record written by
  ``log_batch``); on any other this path is off and MLflow's client writes;
- on a run that is active and has none of the record's metrics, params or tags yet, with names
  MLflow's own validators accept and values it stores without a change. Anything else returns False
  and the caller takes the public path, which validates and explains.

Several workers may share one SQLite store: SQLite has one writer at a time and a waiting one gives
up after MLflow's busy timeout. Callers keep each transaction to about ``TRANSACTION_ROWS`` metric
values (``groups``), and a transaction that finds the store locked is tried again (``LOCKED_FOR``).
"""
from __future__ import annotations

import math
import random
import re
import sqlite3
import time
from contextlib import contextmanager

from .. import compat
from ..schema import RUN_NAME_TAG, USER_TAG
from ..store_files import RUN_ID
from ..tracking import accepted_name

# Run names: a plain subset of what MLflow takes (anything else is created by MLflow's create_run).
_RUN_NAME = re.compile(r"^[A-Za-z0-9_\-. /]{1,250}$")
_MAX_DOUBLE = 1.7976931348623157e308  # what MLflow stores for +-inf
_STEPS = range(-2 ** 63, 2 ** 63)  # MLflow's step column: a 64-bit integer
CACHE_KB = 65536  # SQLite page cache of the connection that writes records
# Metric values per transaction: ~0.2 s of SQLite's write lock here (a 256-trial batch of 400 epochs
# is 400k values, 4 s in one transaction), far below the 20 s another worker waits for it.
TRANSACTION_ROWS = 20_000
LOCKED_FOR = 300.0  # seconds a transaction is tried again while another process holds the lock
BUSY_TIMEOUT_MS = 20_000  # what MLflow's own sessions wait for SQLite's lock


def _revision(engine) -> str | None:
    """The store's alembic revision (None where it has none to read)."""
    from sqlalchemy import text

    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT version_num FROM alembic_version")).fetchall()
    except Exception:  # not a store MLflow migrated: the public path says what is wrong
        return None
    return rows[0][0] if len(rows) == 1 else None


class DirectWriter:
    def __init__(self, store):
        self.store = store

    @classmethod
    def for_client(cls, client) -> "DirectWriter | None":
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        # SQLite only: the conformance test runs there. PostgreSQL named directly as the tracking
        # store takes the public path until a test compares it too.
        if not isinstance(store, SqlAlchemyStore) or store.engine.dialect.name != "sqlite":
            return None
        if not compat.mlflow_tested() or not compat.schema_tested(_revision(store.engine)):
            return None
        return cls(store)

    def log_params(self, run_id: str, params: dict[str, str]) -> bool:
        return self.write(run_id, [], {}, params, None)

    @staticmethod
    def groups(records: list):
        return groups(records)

    def create_runs(self, experiment_id: str,
                    runs: list[tuple[str, dict[str, str], dict[str, str]]]) -> list[tuple[str, str]] | None:
        """Runs (name, tags, params) made RUNNING in one transaction, each as MLflow's create_run
        makes one (the same runs row and tags, its name also as the mlflow.runName tag), with its
        params; their (run id, artifact URI). None, with nothing written, when one is not a run
        this path takes."""
        import uuid

        from mlflow.entities import LifecycleStage, RunStatus, SourceType
        from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
        from mlflow.utils.uri import append_to_uri_path
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        for name, tags, params in runs:
            if RUN_NAME_TAG in tags or not _RUN_NAME.match(name) or not _plain([], tags, params, MAX_TAG_VAL_LENGTH,
                                                                                MAX_PARAM_VAL_LENGTH):
                return None
        experiment = self.store.get_experiment(experiment_id)  # MLflow's error for a missing one
        if experiment.lifecycle_stage != LifecycleStage.ACTIVE:
            return None  # the public path says why
        now = int(time.time() * 1000)
        rows, param_rows = [], []
        for name, tags, params in runs:
            run_id = uuid.uuid4().hex
            run = SqlRun(name=name, artifact_uri=append_to_uri_path(experiment.artifact_location, run_id,
                                                                     self.store.ARTIFACTS_FOLDER_NAME),
                         run_uuid=run_id, experiment_id=experiment_id,
                         source_type=SourceType.to_string(SourceType.UNKNOWN), source_name="", entry_point_name="",
                         user_id=tags.get(USER_TAG, "unknown"), status=RunStatus.to_string(RunStatus.RUNNING),
                         start_time=now, end_time=None, deleted_time=None, source_version="",
                         lifecycle_stage=LifecycleStage.ACTIVE)
            run.tags = [SqlTag(key=k, value=v) for k, v in {**tags, RUN_NAME_TAG: name}.items()]
            rows.append(run)
            param_rows += [(k, v, run_id) for k, v in params.items()]
        made = [(run.run_uuid, run.artifact_uri) for run in rows]

        def create(session) -> None:
            session.add_all(rows)
            session.flush()  # the runs rows before their params (foreign key)
            _insert(session, SqlParam.__table__, ("key", "value", "run_uuid"), param_rows)
        self._transaction(create)
        return made

    def write(self, run_id: str, metrics: list[tuple[str, float, int]], tags: dict[str, str],
              params: dict[str, str], status: str | None) -> bool:
        """Insert ``metrics`` (key, value, step), ``tags`` and ``params`` and set ``status`` in one
        transaction. False, with nothing written, when the record is not one this path takes."""
        return self.write_many([(run_id, metrics, tags, params, status)])

    def write_many(self, records: list[tuple[str, list[tuple[str, float, int]], dict, dict, str | None]]) -> bool:
        """``write`` for several runs' records (run id, metrics, tags, params, status) in one
        transaction. False, with nothing written, when any of them is not one this path takes."""
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        ids = [record[0] for record in records]
        if len(set(ids)) != len(ids) or not all(RUN_ID.match(run_id) and _plain(m, t, p, MAX_TAG_VAL_LENGTH,
                                                                                  MAX_PARAM_VAL_LENGTH)
                                                for run_id, m, t, p, _ in records):
            return False
        now = int(time.time() * 1000)
        metric_rows, latest_rows, param_rows, tag_rows, names, ended = [], [], [], [], {}, {}
        wanted: dict[type, set] = {SqlLatestMetric: set(), SqlParam: set(), SqlTag: set()}
        for run_id, metrics, tags, params, status in records:
            tags = dict(tags)
            # MLflow keeps a run's name twice, the runs row and its tag: a rename sets both, as MLflow's set_tag does.
            if RUN_NAME_TAG in tags:
                names[run_id] = tags.pop(RUN_NAME_TAG)
            latest, seen = {}, set()
            for key, value, step in metrics:
                value = float(value)
                is_nan = math.isnan(value)
                stored = 0.0 if is_nan else max(-_MAX_DOUBLE, min(_MAX_DOUBLE, value))
                # The same (key, value, step) twice is one row, the first, as log_batch keeps it
                # (its primary key; inf and the largest double, 0.0 and -0.0 included).
                if (key, stored, step, is_nan) in seen:
                    continue
                seen.add((key, stored, step, is_nan))
                row = (key, stored, now, step, is_nan, run_id)
                metric_rows.append(row)
                # MLflow's latest value: the largest (step, timestamp, value).
                if key not in latest or (step, stored) > (latest[key][3], latest[key][1]):
                    latest[key] = row
            latest_rows += latest.values()
            param_rows += [(k, v, run_id) for k, v in params.items()]
            tag_rows += [(k, v, run_id) for k, v in tags.items()]
            for model, keys in ((SqlLatestMetric, latest), (SqlParam, params), (SqlTag, tags)):
                wanted[model].update((run_id, key) for key in keys)
            if status is not None:
                ended.setdefault(status, []).append(run_id)
        return self._transaction(lambda session: self._write_rows(
            session, ids, wanted, metric_rows, latest_rows, param_rows, tag_rows, names, ended, now))

    def _write_rows(self, session, ids, wanted, metric_rows, latest_rows, param_rows, tag_rows, names, ended,
                    now) -> bool:
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
        from sqlalchemy import insert, select, text, update

        # A cache that holds the metrics table's indexes: each value goes into four B-trees, and
        # SQLite's default 2 MB cache re-reads their pages from the file (~30% of an insert).
        session.execute(text(f"PRAGMA cache_size = -{CACHE_KB}"))
        for chunk in _chunks(ids):
            found = session.execute(select(SqlRun.run_uuid, SqlRun.lifecycle_stage)
                                    .where(SqlRun.run_uuid.in_(chunk))).all()
            if len(found) != len(chunk) or any(stage != "active" for _, stage in found):
                return False
            for model, keys in wanted.items():
                there = session.execute(select(model.run_uuid, model.key).where(model.run_uuid.in_(chunk))).all()
                if keys.intersection(map(tuple, there)):
                    return False  # already there: MLflow's merge and conflict rules apply
        columns = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")
        _insert(session, SqlMetric.__table__, columns, metric_rows)
        _insert(session, SqlLatestMetric.__table__, columns, latest_rows)
        _insert(session, SqlParam.__table__, ("key", "value", "run_uuid"), param_rows)
        _insert(session, SqlTag.__table__, ("key", "value", "run_uuid"), tag_rows)
        for run_id, name in names.items():
            session.execute(update(SqlRun).where(SqlRun.run_uuid == run_id).values(name=name))
            renamed = session.execute(update(SqlTag).where(SqlTag.run_uuid == run_id, SqlTag.key == RUN_NAME_TAG)
                                      .values(value=name))
            if renamed.rowcount == 0:
                session.execute(insert(SqlTag.__table__), [{"key": RUN_NAME_TAG, "value": name, "run_uuid": run_id}])
        for status, runs in ended.items():
            for chunk in _chunks(runs):
                session.execute(update(SqlRun).where(SqlRun.run_uuid.in_(chunk)).values(status=status, end_time=now))
        return True

    def _transaction(self, work):
        """``work(session)`` in one transaction on MLflow's engine, tried again while another
        process holds SQLite's write lock: a rolled-back attempt wrote nothing."""
        from sqlalchemy import text
        from sqlalchemy.orm import Session

        deadline = time.monotonic() + LOCKED_FOR
        while True:
            try:
                with Session(self.store.engine) as session:
                    # The settings of MLflow's own sessions (ManagedSessionMaker), whose error
                    # handling logs a traceback for every locked attempt.
                    session.execute(text("PRAGMA foreign_keys = ON"))
                    session.execute(text(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"))
                    done = work(session)
                    session.commit()  # leaving the block without it rolls back
                return done
            except Exception as exc:
                if not _locked(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(random.uniform(0.05, 0.5))  # apart from the other waiting writers


def groups(records: list):
    """``write_many``'s records (run id, metrics, ...) in groups of about ``TRANSACTION_ROWS``
    metric values, each for a transaction of its own; a record is never split."""
    rows, group, size = TRANSACTION_ROWS, [], 0
    for record in records:
        if group and size + len(record[1]) > rows:
            yield group
            group, size = [], 0
        group.append(record)
        size += len(record[1])
    if group:
        yield group


def _locked(exc: BaseException | None) -> bool:
    """Whether SQLite refused because another connection holds its lock ("database is locked")."""
    while exc is not None:
        cause = getattr(exc, "orig", None) or exc
        if isinstance(cause, sqlite3.OperationalError) and ("locked" in str(cause) or "busy" in str(cause)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _chunks(items: list, size: int = 500):
    """Pieces small enough for one SQL statement's variables."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _insert(session, table, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """Rows into ``table`` with one executemany of the driver: SQLAlchemy's own executemany spends
    more CPU building each row's parameters than SQLite spends storing it."""
    if not rows:
        return
    preparer = session.get_bind().dialect.identifier_preparer
    sql = (f"INSERT INTO {preparer.format_table(table)} ({', '.join(preparer.quote(c) for c in columns)}) "
           f"VALUES ({', '.join('?' for _ in columns)})")
    session.connection().exec_driver_sql(sql, rows)


def _plain(metrics, tags, params, max_tag: int, max_param: int) -> bool:
    """Names MLflow's validators take, and values it stores as they are."""
    for key, value, step in metrics:
        if not accepted_name(key) or type(value) not in (float, int) or type(step) is not int or step not in _STEPS:
            return False
        if type(value) is int and not -_MAX_DOUBLE <= value <= _MAX_DOUBLE:
            return False  # no double holds it: MLflow fails on it, and says so
    return (all(accepted_name(k) and isinstance(v, str) and len(v) <= max_tag for k, v in tags.items())
            and all(accepted_name(k) and isinstance(v, str) and len(v) <= max_param for k, v in params.items()))


def sink_for(client):
    """An MlflowSink over ``client`` with this writer handed in where it applies (benchmarks, tests)."""
    from ..sink import MlflowSink

    return MlflowSink(client, DirectWriter.for_client(client))
