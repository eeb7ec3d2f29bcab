"""The acceleration wing (harness/fast/) for a Python caller no command hands it to: ``Objective``,
and ``runs.load_model``/``predict`` without a client. Each fast path where the wing is installed,
else None: the public paths then do the same work (the same records, slower)."""
from __future__ import annotations


def sql_writer():
    """What opens the one-transaction SQL writer for an MLflow client (None from it: the public path)."""
    try:
        from .fast.mlflow_sql import DirectWriter
    except ModuleNotFoundError as exc:
        return _absent(exc)
    return DirectWriter.for_client


def stacker():
    """What trains several trials as one stacked model (harness.fast.batched)."""
    try:
        from .fast import batched
    except ModuleNotFoundError as exc:
        return _absent(exc)
    return batched


def read_client(run_id: str, tracking_uri: str | None = None):
    """A reader of ``run_id``'s store for loading its model: the stdlib ``sqlite3`` reader where it
    applies, else tracking.read_client()."""
    try:
        from .fast.local_store import read_client as fast
    except ModuleNotFoundError as exc:
        _absent(exc)
        from .tracking import read_client as public

        return public(tracking_uri)
    return fast(run_id, tracking_uri)


def _absent(exc: ModuleNotFoundError) -> None:
    """None for the wing missing; anything else it lacks is a broken install, said as it is."""
    if not (exc.name or "").startswith("harness.fast"):
        raise exc
    return None
