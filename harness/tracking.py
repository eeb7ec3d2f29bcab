"""MLflow side of a run: what gets logged, under which names, through the client with explicit run ids.

Neither torch nor mlflow at import time: commands that need neither start fast.

Everything goes through ``MlflowClient`` with explicit run ids (never the fluent API's per-thread
active run), metrics in ``log_batch`` calls of at most 1000 entries.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from concurrent.futures import wait
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from . import store_template
from .errors import ExperimentCodeError, first_line, shown
from .launched import launched_id, refused_offline
from .numbers import natural
from .schema import (CONFIG, EARLY_STOP_TAG, EXPERIMENT_SHA_PARAM, FAIL_REASON_TAG, GIT_COMMIT_TAG, SOURCE_NAME_TAG,
                     SOURCE_TYPE_TAG, STATE_DICT, TORCH_THREADS_PARAM, TORCH_VERSION_PARAM, final)
from .urls import (engine_url, is_http, redact, scrub, sqlite_in_memory, sqlite_path, sqlite_unreadable, sqlite_unwritable,
                   sqlite_uri_url)


LIVE_SECONDS = 10.0  # a running run's curves reach MLflow at least this often, once it has trained this long


@dataclass
class RunRecord:
    """All a run logs, as plain data (picklable, so another process can write it)."""

    params: dict[str, str]
    history: dict[str, list[float]]
    finals: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    # The curves' steps before it are on the run already (sent while it trained, or by an earlier
    # attempt of a resumed run): written from this step on, so that no step is written twice.
    first_step: int = 0


@lru_cache(maxsize=4096)
def accepted_name(name) -> bool:
    """Whether MLflow takes ``name`` as a metric, param or tag name (one rule for the three)."""
    return refused_name(name) is None


def refused_name(name) -> str | None:
    """MLflow's reason for refusing ``name`` as a metric, param or tag name, or None: its own
    validators (characters, names that resolve to another path, length)."""
    from mlflow.exceptions import MlflowException

    try:
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, _validate_length_limit, _validate_metric_name
    except ImportError:  # an MLflow without them: its log_batch refuses such a name when the run is written
        return None
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    try:
        _validate_metric_name(name)
        _validate_length_limit("Metric name", MAX_ENTITY_KEY_LENGTH, name)
    except MlflowException as exc:
        return exc.message
    return None


def refused_metric(curves, finals, reserved=()) -> str | None:
    """Why MLflow would refuse the metrics of a run that logs the curves ``curves`` and the final
    values ``finals`` (its scalars), or None: a name MLflow refuses would fail the run's record
    after its training, and every later summary of its study. ``reserved``: other names the run
    logs itself (a search's objectives)."""
    curves, finals = list(curves), list(finals)
    taken = set(curves) | set(map(final, curves)) | set(reserved)
    clash = next((name for name in finals if name in taken), None)
    if clash is not None:  # logged twice under one name: the curve's points and the scalar would mix
        return (f"has a scalar named {shown([clash])}, a name the run logs itself ({shown(sorted(taken))}); "
                "rename the scalar")
    for name in [*curves, *map(final, curves), *finals]:
        refused = refused_name(name)
        if refused:
            reason = first_line(refused.replace(name, "the name"), 200)  # the name itself may be of any length
            return f"logs a metric named {shown([name])}, which MLflow refuses: {reason}"
    return None


def check_logged(experiment, curves, finals=(), reserved=()) -> None:
    """A run's curves and final values as it logs them, against MLflow's rule: a name it refuses is
    the experiment's error, which fails that run alone."""
    refused = refused_metric(curves, finals, reserved)
    if refused:
        raise ExperimentCodeError(f"experiment {experiment.name!r} {refused}")


class LiveCurves:
    """Loop observer: the curves a run has recorded so far, sent to its MLflow run at most every
    ``seconds`` from a thread of its own, so that `mlflow ui` shows a long run's curves growing.
    Training never waits for a write: an epoch that ends while one is in flight sends nothing, and
    a write that fails is left to the final record. ``close()`` waits for the write in flight and
    returns the step the final record starts at (the steps before it are on the run)."""

    def __init__(self, client, run_id, history, seconds: float | None = None, sent: int = 0, clock=time.monotonic):
        from concurrent.futures import ThreadPoolExecutor

        self.client, self.run_id, self.history, self.clock = client, run_id, history, clock
        self.seconds = LIVE_SECONDS if seconds is None else seconds
        self.sent = sent  # epochs on the run
        self.last = clock()
        self._future = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="harness-live-curves")

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self.clock() - self.last < self.seconds or (self._future is not None and not self._future.done()):
            return
        self.last, upto = self.clock(), epoch + 1
        if upto <= self.sent:
            return
        rows = {name: values[self.sent:upto] for name, values in self.history.values.items()}  # copied here
        self._future = self._pool.submit(self._send, rows, self.sent, upto)

    def _send(self, rows: dict[str, list[float]], start: int, upto: int) -> None:
        from mlflow.entities import Metric

        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        run_id = self.run_id() if callable(self.run_id) else self.run_id
        now = int(time.time() * 1000)
        chunk: list = []
        for step in range(start, upto):  # whole epochs a call: ``sent`` never counts an epoch half on the run
            epoch = [Metric(name, values[step - start], now, step) for name, values in rows.items()]
            if chunk and len(chunk) + len(epoch) > MAX_METRICS_PER_BATCH:
                self.client.log_batch(run_id, metrics=chunk)
                self.sent, chunk = step, []
            chunk += epoch
        if chunk:
            self.client.log_batch(run_id, metrics=chunk)
        self.sent = upto

    def close(self) -> int:
        if self._future is not None:
            wait([self._future])  # a write that failed: the final record writes its steps
        self._pool.shutdown()
        return self.sent


class LoggedNames:
    """Loop observer, first of a tracked run's: the names of its first epoch against MLflow's rule
    (the loop keeps them for every later epoch). The pre-flight saw a small batch's; an experiment
    may name its values after what it sees."""

    def __init__(self, experiment):
        self.experiment, self.checked = experiment, False

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if not self.checked:
            self.checked = True
            check_logged(self.experiment, logs)


@contextlib.contextmanager
def scoped_tracking_uri(uri: str):
    """MLflow's fluent API (and what reads its global tracking URI: log_model, the registry's lookup
    of a models:/ source) on ``uri`` for the block, and the caller's tracking URI as it was afterwards,
    set or not: set_tracking_uri would leave it set, ahead of MLFLOW_TRACKING_URI, for the rest of the
    process, and MLflow's own scoping helper (private: public calls cannot tell a set URI from the
    variable's) unsets MLFLOW_TRACKING_URI on the way out, which is put back here."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def default_tracking_uri() -> str:
    """MLflow's own resolution ($MLFLOW_TRACKING_URI, else the local default), without importing mlflow."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def source_params(experiment) -> dict[str, str]:
    """Where the run's experiment came from, beside its config (which names it)."""
    return {EXPERIMENT_SHA_PARAM: experiment.sha256} if experiment.sha256 else {}


def provenance_record(experiment, data, device: str, valid_fraction: float | None = None,
                      keep: dict[str, str] | None = None) -> RunRecord:
    """A run's provenance (harness.provenance) as a record: tags, and the big parts as artifacts.
    ``keep``: the tags the run has already; MLflow's own source tags there (`mlflow run`'s) stay."""
    from . import devices, provenance

    device = devices.resolve(device) or device if device == "auto" else device
    tags = provenance.run_tags(experiment, data, device, valid_fraction)
    kept = {k for k in (keep or {}) if k in (SOURCE_NAME_TAG, SOURCE_TYPE_TAG, GIT_COMMIT_TAG)}
    return RunRecord(params={}, history={}, tags={k: v for k, v in tags.items() if k not in kept},
                     artifacts=provenance.artifacts(experiment))


def log_provenance(client, run_id: str, experiment, data, device: str, valid_fraction: float | None = None) -> None:
    """provenance_record() logged to the run (a search's parent, a re-run): `mlflow run`'s own run
    keeps the source tags MLflow gave it."""
    keep = client.get_run(run_id).data.tags if run_id == launched_id() else None
    write(client, run_id, provenance_record(experiment, data, device, valid_fraction, keep=keep))


def params_of(config, extra_params: dict | None = None) -> dict[str, str]:
    """A run's params: the whole resolved config (hyperparameters included), the torch version and
    intra-op threads (the run trains in this thread, with this count: a CPU run's bits depend on it), extras."""
    import torch

    return {**{k: str(v) for k, v in config.to_dict().items()}, TORCH_VERSION_PARAM: str(torch.__version__),
            TORCH_THREADS_PARAM: str(torch.get_num_threads()), **{k: str(v) for k, v in (extra_params or {}).items()}}


def record(result, extra_params: dict | None = None, tags: dict | None = None) -> RunRecord:
    """The record of a finished ``training.TrainResult``."""
    import torch

    cfg = result.config.to_dict()
    params = params_of(result.config, extra_params)
    buffer = io.BytesIO()
    torch.save(result.model.state_dict(), buffer)
    config = {**cfg, TORCH_VERSION_PARAM: str(torch.__version__),
              **{k: v for k, v in (extra_params or {}).items() if k == EXPERIMENT_SHA_PARAM}}
    tags = dict(tags or {})
    if result.history.stopped:
        tags.setdefault(FAIL_REASON_TAG, result.history.stopped)
    if result.history.early_stop:
        tags.setdefault(EARLY_STOP_TAG, result.history.early_stop)
    return RunRecord(params=params, history=result.history.values, finals=result.final_metrics(),
                     tags=tags, artifacts={STATE_DICT: buffer.getvalue(),
                                           CONFIG: json.dumps(config, indent=2).encode()})


def partial_record(config, history, reason: str, extra_params: dict | None = None,
                   tags: dict | None = None, first_step: int = 0) -> RunRecord:
    """What a run that raised or was interrupted keeps: its params and the curves recorded so far
    (those MLflow takes: a name it refuses may be why the run failed)."""
    curves = {name: values for name, values in history.values.items() if accepted_name(name)}
    return RunRecord(params=params_of(config, extra_params), history=curves, first_step=first_step,
                     tags={**(tags or {}), FAIL_REASON_TAG: reason})


def log_result(client, run_id: str, experiment, result, skip_params: set[str] = frozenset(),
               first_step: int = 0) -> str:
    """Everything a finished training run logs, figures included; returns the status it ends with.
    ``first_step``: the epochs before it are on the run already (see RunRecord.first_step)."""
    from . import plots

    check_logged(experiment, result.history.values, result.scalars)
    write(client, run_id, replace(record(result, source_params(experiment)), first_step=first_step),
          skip_params=skip_params)
    log_figures(client, run_id, plots.render(experiment, result.history.values, result.data, result.predictions))
    return "FAILED" if result.diverged else "FINISHED"


def batches(params: list, tags: list, metrics: list):
    """Split into log_batch calls that respect MLflow's per-call limits."""
    from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    params, tags, metrics = list(params), list(tags), list(metrics)
    while params or tags or metrics:
        p, params = params[:MAX_PARAMS_TAGS_PER_BATCH], params[MAX_PARAMS_TAGS_PER_BATCH:]
        t, tags = tags[:MAX_PARAMS_TAGS_PER_BATCH], tags[MAX_PARAMS_TAGS_PER_BATCH:]
        room = MAX_ENTITIES_PER_BATCH - len(p) - len(t)
        m, metrics = metrics[:room], metrics[room:]
        yield p, t, m


def metric_list(values: dict[str, float], step: int = 0) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(name, value, now, step) for name, value in values.items()]


def param_list(params: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in params.items()]


def tag_list(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]


def write(client, run_id: str, rec: RunRecord, skip_params: set[str] = frozenset()) -> None:
    """Log a record into an existing run (params already on the run are left as they are; so are
    the curves' steps before ``rec.first_step``)."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)  # one timestamp for the record: a value logged twice is stored once
    metrics = [Metric(name, value, now, step) for name, values in rec.history.items()
               for step, value in enumerate(values) if step >= rec.first_step]
    metrics += [Metric(name, value, now, 0) for name, value in rec.finals.items()]
    params = [Param(k, v) for k, v in rec.params.items() if k not in skip_params]
    tags = tag_list(rec.tags)
    for p, t, m in batches(params, tags, metrics):
        client.log_batch(run_id, metrics=m, params=p, tags=t)
    if rec.artifacts:
        with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
            for name, content in rec.artifacts.items():
                Path(tmp, name).parent.mkdir(parents=True, exist_ok=True)  # provenance/...
                Path(tmp, name).write_bytes(content)
            client.log_artifacts(run_id, tmp)


def log_figures(client, run_id: str, figures: dict) -> None:
    """The figures as PNG artifacts of the run; one that matplotlib cannot draw (a log axis over values
    it cannot scale, say) is left out with one line, and is never taken for the store failing."""
    import sys

    from .plots import SAVE_KWARGS  # matplotlib is loaded already: these are its figures

    for name, fig in figures.items():
        try:  # matplotlib's own errors: MLflow's are its MlflowException, or an OSError
            client.log_figure(run_id, fig, name, save_kwargs=SAVE_KWARGS)
        except (ValueError, OverflowError, ArithmeticError) as exc:
            print(f"harness: figure {name} of run {run_id} not drawn: {first_line(exc)}", file=sys.stderr)


def experiment_name(name: str | None, default: str | None = None) -> str | None:
    """The name of the MLflow experiment runs go to: ``name`` (--mlflow-experiment), else
    $MLFLOW_EXPERIMENT_NAME, else ``default`` (the harness experiment's name: each in an MLflow
    experiment of its own in `mlflow ui`) unless $MLFLOW_EXPERIMENT_ID names one. None: by that id."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return name or None
    return default


def experiment_id(client, name: str | None, default: str | None = None) -> str:
    """The MLflow experiment to log to: by name (experiment_name(); created if missing), else
    $MLFLOW_EXPERIMENT_ID, else MLflow's Default."""
    from mlflow.exceptions import MlflowException

    name = experiment_name(name, default)
    if not name:
        wanted = os.environ.get("MLFLOW_EXPERIMENT_ID")
        return (read_experiment_id(wanted) or wanted) if wanted else "0"  # as the store keeps it, in links too
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


def check_experiment(client, name: str | None, default: str | None = None) -> str | None:
    """Why runs cannot go to the MLflow experiment experiment_name() names (else the one of
    $MLFLOW_EXPERIMENT_ID), or None when they can. Reads only: a refused command writes nothing."""
    from mlflow.exceptions import MlflowException

    refused = check_experiment_offline(name, client.tracking_uri, default)
    if refused:
        return refused
    name = experiment_name(name, default)
    if name:
        found = client.get_experiment_by_name(name)
        shown = f"MLflow experiment {name!r}"
    else:
        wanted = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if not wanted:
            return None
        try:
            found = client.get_experiment(wanted)
        except MlflowException as exc:
            if not missing(exc):  # the store failed, not the lookup
                raise
            return f"MLFLOW_EXPERIMENT_ID={wanted!r}: no such experiment in {redact(client.tracking_uri)}; unset it or name one"
        shown = f"MLflow experiment {found.name!r} (MLFLOW_EXPERIMENT_ID={wanted})"
    if found is not None and found.lifecycle_stage != "active":
        return (f"{shown} is deleted; restore it (mlflow experiments restore --experiment-id "
                f"{found.experiment_id}) or use another name")
    return None


def missing(exc: BaseException) -> bool:
    """Whether an MlflowException says the run or experiment does not exist (not that the store failed)."""
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def read_experiment_id(value: str) -> str | None:
    """The experiment id MLflow's stores read ``value`` as (``' 01'`` is ``'1'``), or None where they
    would fail on it: ASCII digits, with the blanks and '+' int() and SQLite's integer affinity both
    drop. int() also reads '١' and '1_0', which SQLite keeps as text: MLflow finds the experiment,
    then fails its first run."""
    number = natural(value.strip(" \t\n\r\f\v").removeprefix("+"))
    return None if number is None else str(number)


def check_experiment_offline(name: str | None, tracking_uri: str, default: str | None = None) -> str | None:
    """What check_experiment can tell without opening the store, so that a refused search on a new
    SQLite store does not create it; a store URL a search or train cannot write a record to; and an
    $MLFLOW_RUN_ID no store there holds yet."""
    refused = unwritable_store(tracking_uri) or refused_offline(tracking_uri)
    if refused:
        return refused
    name = experiment_name(name, default)
    wanted = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not name and wanted and read_experiment_id(wanted) is None:
        return (f"MLFLOW_EXPERIMENT_ID={wanted!r} is not an experiment id: MLflow's are integers of ASCII digits "
                "(0 is Default); unset it or name one")
    if name:
        from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH  # mlflow only when a name is given
    if name and len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        return (f"MLflow experiment name of {len(name)} characters ({name[:40]!r}...); "
                f"at most {MAX_EXPERIMENT_NAME_LENGTH} allowed")
    store = sqlite_path(tracking_uri)
    if store is not None:
        # A new store's artifacts go to ./mlruns beside it: MLflow writes a run's figures to that path
        # with its %xx decoded and the harness's files to it as written, so a run's record is split.
        folder = Path(store).absolute().parent
        for place in {folder, Path.cwd()}:
            if "%" in str(place):
                return (f"folder {str(place)!r} holds a '%': MLflow reads a run's artifact path there two ways "
                        "(as written and %xx-decoded) and splits its record; use a folder without '%'")
    wanted = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not name and wanted and wanted != "0" and store is not None and not Path(store).exists():
        return f"MLFLOW_EXPERIMENT_ID={wanted!r}: no such experiment in {redact(tracking_uri)} (it does not exist yet)"
    return None


def unwritable_store(uri: str) -> str | None:
    """Why no command can keep a record in the MLflow store at ``uri``, or None: the one check of a
    store URL for every command that writes, before anything is made (opening a store for writing
    makes it, and a lock file beside it)."""
    unkept = sqlite_unwritable(uri)
    return f"MLflow store {redact(uri)} is {unkept}; use sqlite:///PATH (a file) or a server" if unkept else None


def missing_run_offline(run_id: str, uri: str) -> str | None:
    """Why run ``run_id`` cannot be in the MLflow store at ``uri``, told without opening it: an id
    MLflow refuses, or an SQLite store not made yet (which opening would make), or None."""
    from .store_files import not_made, run_id_refused

    refused = run_id_refused(run_id)
    if refused:
        return refused
    path = sqlite_path(uri)
    if path is not None and not_made(path):
        return f"run {run_id!r} does not exist: there is no MLflow store at {redact(uri)} yet"
    return None


def filter_value(value: str) -> str:
    """``value`` as a string literal of an MLflow filter string (the one place they are quoted).
    MLflow's parser takes '...' or "..." and knows no escapes: a value with both marks has no literal."""
    from .errors import UsageError

    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UsageError(f"{value[:80]!r} holds both ' and \": MLflow filter strings cannot name it")


def unreachable(what: str, url: str, seconds: float, exc: BaseException):
    """The one-line error for a store that did not answer: exit 2 (the URL is the user's input), or
    exit 1 for a local store this process may not write (a read-only place: the store fails, the
    URL is right)."""
    import errno

    from .errors import HarnessError, UsageError

    first = first_line(exc)
    cause, hops = exc, 0
    while cause is not None and not isinstance(cause, OSError) and hops < 20:  # a chain may loop
        cause, hops = cause.__cause__ or cause.__context__, hops + 1
    if isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return HarnessError(f"cannot write {what} {redact(url)}: {scrub(first, url)}")
    return UsageError(f"cannot reach {what} {redact(url)} (gave up after {seconds:.0f}s): "
                        f"{scrub(first, url)}")


@contextlib.contextmanager
def store_failures(error):
    """The one rule for an MLflow store failing under a check or an open (a search's store, its
    $MLFLOW_RUN_ID check, its parent run): a UsageError (the user's input) passes as it is; anything
    else is raised as ``error(exc, seconds since the block began)`` makes it, one line, no traceback."""
    from .errors import UsageError

    started = time.time()
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:
        raise error(exc, time.time() - started) from None


DB_SCHEMES = ("postgresql", "mysql", "mssql", "oracle")


def read_client(tracking_uri: str | None = None):
    """An MlflowClient for a command that reads runs (compare, predict, reproduce, audit): a store
    that does not exist is not created (a one-line UsageError instead), and one that cannot be read
    (unreachable, read-only and in need of a migration, corrupted) is a one-line HarnessError."""
    from .errors import HarnessError, UsageError

    uri = tracking_uri or default_tracking_uri()
    check_readable_uri(uri)
    store = sqlite_path(uri)
    if store is not None:
        from .store_files import empty_file, stranded_wal

        if not Path(store).is_file() or empty_file(store):
            raise UsageError(f"no MLflow store at {redact(uri)}: nothing to read there "
                             "(run a search or train first, or set MLFLOW_TRACKING_URI)")
        stranded = stranded_wal(Path(store))
        if stranded:
            raise HarnessError(f"cannot read the MLflow store {redact(uri)}: {stranded}")
    started = time.time()
    try:
        _probe_database(uri)
        from mlflow import MlflowClient

        read_only = read_only_uri(uri)
        if read_only:
            _no_folder_for_uri_filenames()
        client = MlflowClient(read_only or uri)
        client.search_experiments(max_results=1)
    except Exception as exc:
        if is_http(uri) or uri.split(":", 1)[0].split("+")[0] in DB_SCHEMES:
            raise unreachable("the MLflow tracking store", uri, time.time() - started, exc) from None
        first = first_line(exc)
        raise HarnessError(f"cannot read the MLflow store {redact(uri)}: {scrub(first, uri)}") from None
    return client


def check_readable_uri(uri: str) -> None:
    """Refuse an MLflow store URL that no store could be read from, whatever is there: for a command
    to say so before it reads or writes anything else (read_client says it too)."""
    from .errors import UsageError

    if sqlite_in_memory(uri):
        raise UsageError(f"no MLflow store at {redact(uri)}: an in-memory SQLite database holds nothing to read")
    unreadable = sqlite_unreadable(uri)
    if unreadable:
        raise UsageError(f"MLflow store {redact(uri)} is {unreadable}")


def read_only_uri(uri: str) -> str | None:
    """``uri`` as SQLAlchemy opens a store that ``read_only_flags`` says to open read-only, else None."""
    if sqlite_path(uri) is None:
        return None
    from .store_files import read_only_flags

    path = Path(sqlite_path(uri))
    flags = read_only_flags(path) if path.is_file() else None
    return sqlite_uri_url(path, flags) if flags else None


def _no_folder_for_uri_filenames() -> None:
    """MLflow makes the parent folder of an SQLite store's path before it opens it, and takes the
    ``file:/abs/...`` of a read-only URI for a relative path: it made a folder ``file:`` in the working
    directory (and failed where that is read-only too). A store opened read-only exists: nothing is
    to be made. (``_make_parent_dirs_if_sqlite`` is MLflow's private helper in 3.17; where an MLflow
    has none, there is nothing to guard.)"""
    from mlflow.store.db import utils as db_utils

    make = getattr(db_utils, "_make_parent_dirs_if_sqlite", None)
    if make is None or getattr(make, "skips_uri_filenames", False):
        return

    def guarded(db_uri: str) -> None:
        if not db_uri.startswith("sqlite:///file:"):
            make(db_uri)

    guarded.skips_uri_filenames = True
    db_utils._make_parent_dirs_if_sqlite = guarded


def read_only(client) -> bool:
    """Whether ``client`` was opened on a store it cannot write (``read_only_uri``)."""
    return client.tracking_uri.startswith("sqlite:///file:") and "mode=ro" in client.tracking_uri


def _probe_database(uri: str) -> None:
    """One connection attempt, bounded in time, to a database tracking store: MLflow itself retries
    an unreachable one ten times over almost two minutes."""
    if uri.split(":", 1)[0].split("+")[0] not in DB_SCHEMES:
        return
    from sqlalchemy import create_engine

    args = {"connect_timeout": 10} if uri.startswith("postgresql") else {}
    engine = create_engine(engine_url(uri), connect_args=args)
    try:
        if args:  # the URL's own timeout, which this replaces, read as psycopg reads it for MLflow's connections
            from psycopg.conninfo import timeout_from_conninfo

            timeout_from_conninfo(engine.dialect.create_connect_args(engine.url)[1])
        with engine.connect():
            pass
    finally:
        engine.dispose()


def open_client(tracking_uri: str | None = None):
    """An MlflowClient whose store is ready: created or migrated one process at a time, since
    MLflow's schema set-up is not safe to run from several processes at once on a new SQLite file."""
    import mlflow
    from mlflow import MlflowClient

    from .filelock import LOCK_SUFFIX, file_lock
    from .store_files import empty_file

    uri = tracking_uri or mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    _probe_database(uri)
    # A store that is there was made under the lock (its maker created the lock file first): where no
    # lock file is beside it, no one is making it, and a command that may yet be refused makes none.
    made = path is not None and Path(path).is_file() and not empty_file(path)
    with file_lock(path + LOCK_SUFFIX if path else None, create=not made):
        new = path is not None and store_template.usable(path)
        copied = new and store_template.start_from_template(path)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        use_wal(uri)
        if new and not copied:
            store_template.keep_as_template(path)
    return client


def use_wal(tracking_uri: str) -> None:
    """Put an MLflow SQLite store in write-ahead-log mode (a lasting property of the file).

    One sync per commit instead of several, and readers no longer block the writer: a search's
    writer process then disturbs the training process far less, and workers sharing the store wait
    less on each other.
    """
    path = sqlite_path(tracking_uri)
    if path is None:
        return
    import sqlite3

    with sqlite3.connect(path, timeout=30) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
    connection.close()


def ui_hint(client, experiment: str, run_id: str) -> str:
    uri = redact(client.tracking_uri)
    if is_http(uri):
        return f"open {uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"{ui_command(uri)}   then open http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"


def ui_command(uri: str) -> str:
    """How to look at the (redacted) store ``uri`` in MLflow's UI, as a line a shell takes as it is
    (``sqlite:///mlflow.db?timeout=30`` holds a glob character)."""
    import shlex

    return f"open {uri}" if is_http(uri) else f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
