"""One invocation of a search: open or resume the study, recover what earlier ones left, run the
trials, close the record, and say how it went (an ``Outcome``)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from .. import signals
from ..errors import ExperimentExit, UsageError, asked_to_stop
from ..launched import launched_run
from ..schema import PARENT_ATTR
from ..tracking import check_experiment, default_tracking_uri, open_client, store_failures, unreachable
from . import loop
from . import study as study_module
from .durable.audit import recover_stale, recover_unfinished
from .durable.journal import JournalWriteError
from .durable.workers import identity
from .objective import Objective
from .options import SearchOptions
from .publish import NotPublished, publish
from .recorder import TrackingFailed
from .durable.storages import study_lock


@dataclass(frozen=True)
class Outcome:
    """What the command reports: the study, its parent run, how long this invocation took and how it ended."""
    study: optuna.Study
    ran: bool  # False: --max-trials left nothing to run (said on stdout)
    parent_run_id: str | None = None
    seconds: float = 0.0
    failure: BaseException | None = None  # the store failure (or the ExperimentExit) that stopped the search
    interrupted: bool = False
    published: tuple[str, ...] = ()  # the MLflow Models logged and registered at its end (search.publish)
    not_published: NotPublished | None = None  # why --register registered nothing at the end


def run_search(options: SearchOptions) -> Outcome:
    """The search ``options`` describe, from opening its study to closing its record."""
    # Optuna would log each failed trial with a traceback (an interrupt too); the summary says what failed.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study, storage, client = _open_study(options)
    recover_stale_trials(study, storage)
    n_trials = _trials_to_run(study, options)
    if n_trials == 0:
        return Outcome(study, ran=False)
    objective = Objective.from_options(options.trials, client=client)
    started = time.time()
    interrupted, stopped_by = _optimize(study, objective, n_trials, options)
    # Closing the study's record is held against a second Ctrl-C or a SIGTERM (they are acted on
    # once it is written): the parent run is never left RUNNING.
    with signals.deferred(on_signal=lambda: None):
        parent_run_id = objective.tracker.parent.run_id if objective.tracker is not None else None
        errors = objective.close()
        # A KeyboardInterrupt among them was raised by the experiment's plot: an interrupt, as Ctrl-C's.
        interrupted = interrupted or signals.interrupted() or any(isinstance(e, KeyboardInterrupt) for e in errors)
        failure = stopped_by or next((e for e in errors if not isinstance(e, KeyboardInterrupt)), None)
        published, not_published = [], None
        if parent_run_id is not None and failure is None and not interrupted:
            try:
                published = publish(study, client, options.trials, options.models, options.register, identity())
            except NotPublished as exc:  # the trials stand: the report is printed, then this line
                not_published = exc
            except BaseException as exc:  # the experiment's code (its model, its data, torch.export's trace)
                failure, interrupted = _stopped_publishing(exc, options.register)  # asking to stop: the same
        return Outcome(study, ran=True, parent_run_id=parent_run_id, seconds=time.time() - started,
                       failure=failure, interrupted=interrupted or signals.interrupted(), published=tuple(published),
                       not_published=not_published)


def _open_study(options: SearchOptions):
    """The study, resumed or created, its storage, and the MLflow client; the MLflow store is checked
    (and created) before a new study is written."""
    url, trials = options.storage_url, options.trials
    study_args = dict(direction=options.direction, space=trials.space, experiment=trials.experiment.name,
                      sampler=options.sampler, pruner=options.pruner, objectives=trials.objectives,
                      experiment_sha256=trials.experiment.sha256,
                      allow_changed_experiment=options.allow_changed_experiment)
    storage_args = dict(heartbeat=options.heartbeat, checked=True)  # the options checked the URL
    # Opening a journal creates its file, and an SQLite storage its database and tables: one that holds
    # none yet already says there is no study, and is made once every check passed.
    tables = study_module.tables_of(url)  # an SQLite database's engine made and inspected once, not twice
    storage = None if study_module.holds_no_study(url, tables) else \
        study_module.open_storage(url, tables=tables, **storage_args)
    # A worker creating the study writes what resuming checks (its objectives, space, experiment) after
    # Optuna makes it, holding the study's lock: a study caught in between is read once it is whole. A
    # lock file that is not there is held by no worker (a plain Optuna script made the study): not made.
    study = None
    if storage is not None and study_module.being_created(options.study_name, storage):
        with study_lock(storage, options.study_name, create=False):
            study = study_module.existing_study(options.study_name, storage, **study_args)
    elif storage is not None:  # read as it is: a refused resume writes nothing, not even a lock file
        study = study_module.existing_study(options.study_name, storage, **study_args)
    client = _open_client(trials.mlflow_experiment, trials.experiment.name)
    _check_registry(client, options)
    _check_launched(client, study)
    if storage is not None:  # every check passed: damage a crash left in the journal is cut now
        study_module.repair_journal(storage)
    if study is None:
        storage = storage or study_module.open_storage(url, **storage_args)
        with study_lock(storage, options.study_name):  # another worker's may have come meanwhile: checked
            study = study_module.existing_study(options.study_name, storage, **study_args) or \
                study_module.create_study(options.study_name, storage, **study_args)
    study_module.record_source(study, trials.experiment.sha256)  # nothing to do for a study just made
    return study, storage, client


def _open_client(mlflow_experiment: str | None, default: str):
    """The MLflow store opened (created or migrated) in bounded time, once runs can go to their
    MLflow experiment; else a one-line UsageError."""
    uri = default_tracking_uri()
    with store_failures(_unreachable(uri)):
        client = open_client(uri)
        refused = check_experiment(client, mlflow_experiment, default)
    if refused:
        raise UsageError(refused)
    return client


def _check_launched(client, study) -> None:
    """Before the study is written: $MLFLOW_RUN_ID names `mlflow run`'s fresh run, or this study's parent."""
    with store_failures(_unreachable(default_tracking_uri())):
        launched_run(client, own=study.user_attrs.get(PARENT_ATTR) if study is not None else None)


def _unreachable(uri: str):
    return lambda exc, seconds: unreachable("the MLflow tracking store", uri, seconds, exc)


def _check_registry(client, options: SearchOptions) -> None:
    if options.register:  # before the study is written: a search whose end cannot register does not start
        from ..models import check_registry

        check_registry(client)


def recover_stale_trials(study, storage) -> None:
    """Trials a dead worker left RUNNING, or that an interrupt or a failed write stopped: fail them
    and queue their configurations again (the tracker closes their runs)."""
    by_pid, by_heartbeat = recover_stale(study, storage)
    if by_pid or by_heartbeat:
        print(f"harness: trial(s) {', '.join(map(str, by_pid + by_heartbeat))} were left RUNNING by a worker that "
              "is gone: failed them and queued their configurations again", file=sys.stderr)
    queued = recover_unfinished(study)
    if queued:
        print(f"harness: trial(s) {', '.join(str(n) for n, _ in queued)} were stopped before they finished "
              f"({queued[0][1]}): queued their configurations again", file=sys.stderr)


def _trials_to_run(study, options: SearchOptions) -> int:
    """--n-trials, within what --max-trials leaves (queued trials run without being created)."""
    if not options.max_trials:
        return options.n_trials
    counted = study.get_trials(deepcopy=False, states=loop.COUNTED)
    waiting = sum(t.state == TrialState.WAITING for t in counted)
    left = max(options.max_trials - len(counted), 0) + waiting
    if left <= 0:
        print(f"study {study.study_name!r} already has {len(counted)} trials that count toward "
              f"--max-trials {options.max_trials}; nothing to run")
    return min(options.n_trials, max(left, 0))


def _optimize(study, objective, n_trials: int, options: SearchOptions) -> tuple[bool, BaseException | None]:
    """Run the trials. Returns (interrupted, the store failure that stopped them)."""
    try:
        # Signals are held while Optuna records a trial (one landing inside its tell would leave the
        # trial half-told); the objective lets them interrupt training, and a held one stops the
        # search once the trials in hand are recorded.
        with signals.deferred(on_signal=lambda: None):
            loop.optimize(study, objective, n_trials, options.trials.batch, n_jobs=options.n_jobs,
                          timeout=options.timeout, max_trials=options.max_trials, progress=options.progress)
    except KeyboardInterrupt:
        return True, None
    except Exception as exc:
        # A store that stopped taking writes ends the search; Optuna may have wrapped the error in
        # its own while closing the trial (an AssertionError when the journal refused the FAIL).
        stopped_by = _store_failure(exc)
        if stopped_by is None:
            raise
        return signals.interrupted(), stopped_by
    return signals.interrupted(), None


def _stopped_publishing(exc: BaseException, register: str | None) -> tuple[ExperimentExit | None, bool]:
    """The experiment's code asking to stop while the models were logged (signals are held there:
    a KeyboardInterrupt is its own) as (the ExperimentExit, interrupted); anything else raises on."""
    if isinstance(exc, KeyboardInterrupt):
        return None, True
    also = f", nothing registered as {register!r}" if register else ""
    stop = asked_to_stop(exc, f"no MLflow Model logged{also}: the experiment's code raised")
    if stop is None:
        raise exc
    return stop, False


def _store_failure(exc: BaseException):
    """The journal or tracking failure, or the experiment's sys.exit(), behind ``exc`` (following
    Optuna's wrapping), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (JournalWriteError, TrackingFailed, ExperimentExit)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
