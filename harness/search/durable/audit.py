"""The invariants between a study's Optuna storage and its MLflow runs; ``fix`` repairs what it can.

Stale work (a trial or run left RUNNING by a worker that is gone) is what a crash leaves; repairing
it fails the trial, retries its configuration through Optuna's retry callback (retries.Retry) and
closes the run as FAILED.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from ...errors import HarnessError, first_line
from ...numbers import natural
from ... import schema, tracking
from ...schema import FAIL_REASON_ATTR, INCOMPLETE_TAG, PAIR_TRIAL_PARAM as PAIR, PARENT_ATTR, RUN_ATTR, WORKER_ATTR
from ...sink import DirectWriter, MlflowSink, close_incomplete
from ...config import per_epoch
from ..objectives import LEGACY, of_study
from ..experimental import experimental_ok
from ..space import logged_params
from ..recorder import fail_run
from .optuna_private import trial_id
from .retries import Retry
from .workers import (WORKER_DIED, abandoned, alive, earlier_attempts, gone, owner_gone, process_record,
                      retried_numbers, retry, unfinished)
from ...tracking import missing
from ...urls import redact

EXPECTED_STATUS = {TrialState.COMPLETE: ("FINISHED",), TrialState.PRUNED: ("KILLED",),
                   TrialState.FAIL: ("FAILED", "KILLED")}  # KILLED: interrupted by the user


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    checked_trials: int = 0
    checked_runs: int = 0

    @property
    def clean(self) -> bool:
        return not self.violations


def _shown(worker, at_most: int = 200) -> str:
    """A worker record as the audit prints it: the journal is anyone's to write, so at most ``at_most`` characters."""
    text = repr(worker)
    return text if len(text) <= at_most else f"{text[:at_most]}... ({len(text)} characters)"


def stale_trials(study) -> list:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if gone(t)]


def fail_and_retry(study, storage, trial) -> int:
    """What Optuna's heartbeat does to a stale trial: FAIL it and enqueue its params again. A link to
    an earlier attempt's run that it inherited (retries of older versions copied it) is dropped while
    it can be: the trial gets a run of its own from the audit."""
    if inherited_run(trial, {t.number: t for t in study.get_trials(deepcopy=False)}):
        storage.set_trial_user_attr(trial_id(trial), RUN_ATTR, None)
    storage.set_trial_user_attr(trial_id(trial), FAIL_REASON_ATTR, WORKER_DIED)
    storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)
    with experimental_ok():
        Retry()(study, storage.get_trial(trial_id(trial)))
    return trial.number


def inherited_run(trial, by_number: dict) -> bool:
    """Whether ``trial``'s run attr names the run of one of its earlier attempts: copied by a retry
    of a harness before retries.Retry, not a run of its own."""
    linked = trial.user_attrs.get(RUN_ATTR)
    return linked is not None and any(by_number[n].user_attrs.get(RUN_ATTR) == linked
                                      for n in earlier_attempts(trial) if n in by_number)


def recover_stale(study, storage) -> tuple[list[int], list[int]]:
    """Fail and retry the trials that dead workers left RUNNING. Returns their numbers: those whose
    worker on this machine is gone (its pid), and those whose heartbeat went silent (Optuna's own
    check, RDB storages only: the way to know about a worker on another machine)."""
    by_pid = [fail_and_retry(study, storage, trial) for trial in stale_trials(study)]
    before = abandoned(study.get_trials(deepcopy=False))
    with experimental_ok():
        fail_stale_trials(study)
    by_heartbeat = sorted(abandoned(study.get_trials(deepcopy=False)) - before)
    return by_pid, by_heartbeat


def recover_unfinished(study) -> list[tuple[int, str]]:
    """Queue again the configuration of every FAIL trial that was stopped from outside (an
    interrupt, a failed write; see workers.UNFINISHED_REASONS) and is not queued yet."""
    queued = []
    for trial in unfinished(study.get_trials(deepcopy=False)):
        retry(study, trial)
        queued.append((trial.number, trial.user_attrs.get(FAIL_REASON_ATTR) or "no reason recorded"))
    return queued


@dataclass
class _Fix:
    """What --fix needs to repair runs: the store (read and written), the study and its parent run."""

    client: object
    sink: MlflowSink
    study: object
    parent_id: str
    experiment_id: str


def audit(study, storage, client, *, fix: bool = False, direct: DirectWriter | None = None) -> Report:
    """The study against its runs in ``client``'s store; ``fix`` repairs what it can (``direct``: the
    sink's faster writer, as a command hands it in)."""
    report = Report()
    if fix:
        by_pid, by_heartbeat = recover_stale(study, storage)
        report.fixed += [f"trial {n}: RUNNING with its worker gone -> FAIL, configuration retried" for n in by_pid]
        report.fixed += [f"trial {n}: RUNNING with its heartbeat silent -> FAIL, configuration retried"
                         for n in by_heartbeat]
        report.fixed += [f"trial {n}: FAIL ({reason}) -> configuration retried" for n, reason in recover_unfinished(study)]
    trials = study.get_trials(deepcopy=False)
    report.checked_trials = len(trials)
    retried = retried_numbers(trials)
    report.violations += [f"trial {t.number}: FAIL ({t.user_attrs.get(FAIL_REASON_ATTR) or 'no reason recorded'}) "
                          "was stopped from outside and its configuration is not queued again; --fix queues it"
                          for t in unfinished(trials)]
    report.violations += [f"trial {t.number} is RUNNING but its worker {_shown(t.user_attrs[WORKER_ATTR])} is gone"
                          if t.user_attrs.get(WORKER_ATTR) is not None else
                          f"trial {t.number} is RUNNING with no worker recorded since {t.datetime_start}"
                          for t in trials if t.state == TrialState.RUNNING and gone(t)]
    from mlflow.exceptions import MlflowException

    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id is None:
        if not trials:
            return report
        if not fix:
            report.violations.append("the study has no MLflow parent run (user attr mlflow_parent_run_id); "
                                     "--fix creates one")
            return report
        parent_id = _create_parent(client, study, direct)
        report.fixed.append(f"the study had no MLflow parent run -> created {parent_id}")
    try:
        parent = client.get_run(parent_id)
    except MlflowException as exc:
        if not missing(exc):
            raise HarnessError(f"cannot read the MLflow store {redact(client.tracking_uri)}: "
                               f"{first_line(exc)}") from None
        report.violations.append(f"parent run {parent_id} does not exist in {redact(client.tracking_uri)}")
        return report
    sink = MlflowSink(client, direct)
    runs = sink.child_runs(parent_id, parent.info.experiment_id)
    report.checked_runs = len(runs)
    by_number: dict[int, list] = {}
    for run in runs:
        number = natural(run.data.tags.get(schema.TRIAL_NUMBER_TAG))
        by_number.setdefault(-1 if number is None else number, []).append(run)
    fixer = _Fix(client, sink, study, parent_id, parent.info.experiment_id) if fix else None
    live_workers = False
    objectives = of_study(study)
    deleted = _Deleted(client, parent_id, parent.info.experiment_id)
    trials_by_number = {t.number: t for t in trials}
    for trial in trials:
        _check_trial(trial, by_number.pop(trial.number, []), client, report, fixer, trial.number in retried,
                     objectives, deleted, inherited_run(trial, trials_by_number))
        live_workers |= trial.state == TrialState.RUNNING and not gone(trial)
    for number, orphans in sorted(by_number.items()):
        for run in orphans:
            report.violations.append(f"run {run.info.run_id} claims trial {number}, which the study does not have")
    _check_models(client, parent.info.experiment_id, {parent_id, *(r.info.run_id for r in runs)}, report, fix)
    if parent.info.status == "RUNNING" and not live_workers:
        if fix:
            client.set_terminated(parent_id, "FINISHED")
            report.fixed.append(f"parent run {parent_id}: RUNNING with no live worker -> FINISHED")
        else:
            report.violations.append(f"parent run {parent_id} is RUNNING but no live worker owns the study")
    return report


def _check_models(client, experiment_id: str, run_ids: set[str], report: Report, fix: bool) -> None:
    """The study's runs' logged models left PENDING by a process that is gone (killed while it logged
    one): MLflow lists them beside the run as being logged, for good. --fix fails them."""
    from datetime import datetime, timezone

    from mlflow.entities import LoggedModelStatus

    pending, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)  # its status filter matches none
        pending += [m for m in page if m.status == LoggedModelStatus.PENDING and m.source_run_id in run_ids]
        token = page.token
        if not token:
            break
    for model in pending:
        started = datetime.fromtimestamp(model.creation_timestamp / 1000, timezone.utc)
        if not owner_gone(process_record(model.tags), started):
            continue
        what = f"logged model {model.model_id} of run {model.source_run_id}"
        if fix:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            report.fixed.append(f"{what}: PENDING with the process logging it gone -> FAILED")
        else:
            report.violations.append(f"{what} is PENDING but the process logging it is gone; --fix fails it")


def _create_parent(client, study, direct: DirectWriter | None) -> str:
    """The parent run a crashed first search never created, where the search would have put it."""
    from ...tracking import experiment_id

    sink = MlflowSink(client, direct)
    name = study.user_attrs.get(schema.STUDY_EXPERIMENT_ATTR)
    run_id = sink.create_run(experiment_id(client, None, name if isinstance(name, str) else None), study.study_name,
                             {schema.ROLE_TAG: schema.ROLE_STUDY, schema.STUDY_TAG: study.study_name}, {})
    sink.close(run_id, "FINISHED")
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


class _Deleted:
    """The study's child runs in MLflow's trash (deleted, not yet garbage-collected), read once if needed."""

    def __init__(self, client, parent_id: str, experiment_id: str) -> None:
        self._args, self._by_number = (client, parent_id, experiment_id), None

    def run_of(self, number: int):
        if self._by_number is None:
            from mlflow.entities import ViewType

            client, parent_id, experiment_id = self._args
            runs = client.search_runs([experiment_id], filter_string=f"tags.`{schema.PARENT_TAG}` = '{parent_id}'",
                                      run_view_type=ViewType.DELETED_ONLY, max_results=50000)
            self._by_number = {run.data.tags.get(schema.TRIAL_NUMBER_TAG): run for run in runs}
        return self._by_number.get(str(number))


def _check_trial(trial, runs: list, client, report: Report, fix: _Fix | None, retried: bool,
                 objectives: tuple[str, ...] | None = None, deleted: _Deleted | None = None,
                 inherited: bool = False) -> None:
    n, state = trial.number, trial.state
    if state == TrialState.WAITING:
        return
    owner = alive(trial.user_attrs.get(WORKER_ATTR))
    if state == TrialState.RUNNING:
        return  # a live worker owns it (or it runs elsewhere; a dead one's is reported above): nothing to compare yet
    trashed = deleted.run_of(n) if not runs and deleted is not None else None
    if trashed is not None:
        # Deleting a run only moves it to MLflow's trash: the trial's record is whole there.
        if not fix:
            report.violations.append(f"trial {n} ({state.name}): its run {trashed.info.run_id} is deleted (in "
                                     "MLflow's trash); --fix restores it")
            return
        client.restore_run(trashed.info.run_id)
        runs = [client.get_run(trashed.info.run_id)]
        report.fixed.append(f"run {trashed.info.run_id} of trial {n}: deleted -> restored")
    if not runs and state == TrialState.FAIL and fix and owner is not True:
        runs = [_placeholder_run(fix, trial)]
        report.fixed.append(f"trial {n}: FAIL with no run (it failed before its run was created) -> "
                            f"created FAILED run {runs[0].info.run_id} with its params")
    if len(runs) != 1:
        report.violations.append(f"trial {n} ({state.name}) has {len(runs)} runs, not 1")
        return
    run = runs[0]
    run_id = run.info.run_id
    linked = trial.user_attrs.get(RUN_ATTR)
    if state == TrialState.FAIL and inherited:
        linked = None  # its earlier attempt's, copied before it had a run: its own run is the one tagged with it
    if linked != run_id and (linked is not None or state != TrialState.FAIL):
        report.violations.append(f"trial {n}: user attr {RUN_ATTR}={linked!r} but its run is {run_id}")
    status = run.info.status
    if status in ("RUNNING", "FINISHED") and state == TrialState.FAIL and fix:
        # FINISHED: the worker wrote the run, then died before Optuna recorded the trial's end (or
        # a torn journal lost it); the trial was failed and retried, so the run says so too.
        fail_run(fix.sink, run_id, trial.user_attrs.get(FAIL_REASON_ATTR, WORKER_DIED))
        report.fixed.append(f"run {run_id} of trial {n}: {status} with its trial FAIL -> FAILED")
        status = "FAILED"
    if status == "RUNNING" and state != TrialState.FAIL and fix and owner is False:
        # The worker ended (a full disk, a killed writer) before its last write landed.
        status = _close_unwritten_run(fix, trial, run, report, retried)
        retried = retried or (state == TrialState.COMPLETE and status == "FAILED")  # it queued the configuration
    incomplete = run.data.tags.get(INCOMPLETE_TAG)
    if status == "FAILED" and incomplete and state in (TrialState.COMPLETE, TrialState.PRUNED):
        if state == TrialState.COMPLETE and not retried and fix:  # its worker's own retry failed (a full disk)
            retry(fix.study, trial)
            report.fixed.append(f"trial {n}: run {run_id} is incomplete ({incomplete}) -> configuration retried")
        elif state == TrialState.COMPLETE and not retried:
            report.violations.append(f"trial {n}: run {run_id} is incomplete ({incomplete}) and its configuration "
                                     "is not queued again; --fix queues it")
        return  # marked as such; the configuration's record comes from its retry
    if status not in EXPECTED_STATUS[state]:
        report.violations.append(f"trial {n} is {state.name} but run {run_id} is {status}")
    params = run.data.params
    # Every sampled param (hyperparameters too) as the run logged it: the config's str() of the value.
    expected = {name: str(value) for name, value in trial.params.items()}
    logged = {name: params.get(name) for name in trial.params}
    if PAIR in trial.params:
        logged[PAIR] = f"{params.get('optimizer')}+{params.get('loss')}"
    if logged != expected and fix and all(params.get(k) is None for k in logged_params(trial.params)):
        # The run was created but its first write (its params) failed: written now from the trial.
        client.log_batch(run_id, params=tracking.param_list(logged_params(trial.params)))
        report.fixed.append(f"run {run_id} of trial {n}: params missing -> logged from the trial")
        logged = expected
    if logged != expected:
        report.violations.append(f"trial {n}: run params {logged} differ from trial params {expected}")
    lost = [name for name in ("lr", "epochs", PAIR) if name not in trial.params and state != TrialState.FAIL]
    if lost:  # every trial of a harness search draws these: the study lost them (a cut journal line)
        report.violations.append(f"trial {n} ({state.name}) has no {', '.join(lost)} in the study, which every "
                                 f"trial draws; its run says {', '.join(f'{k}={params.get(k)}' for k in lost)}; "
                                 "--fix cannot restore a trial's params")
    if state == TrialState.COMPLETE:
        _check_complete(n, run, _epochs(trial, run), client, report)
        if objectives:
            _check_values(trial, run, objectives, report)


def _value_metrics(objectives: tuple[str, ...]) -> list[str]:
    """The run's metrics that hold a completed trial's values: with one objective its final value
    (what the trial returned), with two the objective_* metrics."""
    if len(objectives) > 1:
        return [schema.objective(name) for name in objectives]
    first = objectives[0]
    return [schema.final(first) if per_epoch(first) or first in LEGACY else first]


def _check_values(trial, run, objectives: tuple[str, ...], report: Report) -> None:
    """A completed trial's values are exactly what its run logged (the same float64 is written to both)."""
    names = _value_metrics(objectives)
    logged = [run.data.metrics.get(name) for name in names]
    if logged != list(trial.values):
        shown = ", ".join(f"{name}={value}" for name, value in zip(names, logged))
        report.violations.append(f"trial {trial.number}: run {run.info.run_id} logs {shown}, but the trial's "
                                 f"values are {list(trial.values)}; --fix cannot tell which is right and "
                                 "changes neither")


def _epochs(trial, run) -> int:
    epochs = natural(str(trial.params.get("epochs", run.data.params.get("epochs"))))
    return epochs or 0


def _placeholder_run(fix: _Fix, trial):
    """A FAILED run for a trial that failed before its run existed: the trial-run contract holds."""
    tags = {schema.PARENT_TAG: fix.parent_id, schema.TRIAL_NUMBER_TAG: str(trial.number),
            schema.STUDY_TAG: fix.study.study_name, schema.TRIAL_STATE_TAG: "FAIL",
            schema.FAIL_REASON_TAG: trial.user_attrs.get(FAIL_REASON_ATTR) or "failed before its run was created"}
    run_id = fix.sink.create_run(fix.experiment_id, schema.trial_run_name(trial.number), tags, logged_params(trial.params))
    fix.sink.close(run_id, "FAILED")
    return fix.client.get_run(run_id)


def _close_unwritten_run(fix: _Fix, trial, run, report: Report, retried: bool) -> str:
    """A COMPLETE or PRUNED trial whose run its dead worker left RUNNING: closed with the trial's
    status if its record is whole, else marked incomplete (a COMPLETE one's configuration queued again)."""
    run_id, n = run.info.run_id, trial.number
    if trial.state == TrialState.COMPLETE:
        check = Report()
        _check_complete(n, run, _epochs(trial, run), fix.client, check)
        missing = "; ".join(v.split(": ", 1)[-1] for v in check.violations)
    else:  # PRUNED: the curves up to the epoch it was pruned at
        last = max(trial.intermediate_values, default=-1)
        steps = sorted(m.step for m in fix.client.get_metric_history(run_id, schema.TRAIN_LOSS))
        missing = "" if _each_step_once(steps, last + 1) else f"{len(steps)} {schema.TRAIN_LOSS} points, not {last + 1}"
    if not missing:
        status = EXPECTED_STATUS[trial.state][0]
        fix.client.set_terminated(run_id, status)
        report.fixed.append(f"run {run_id} of trial {n}: RUNNING with its record whole -> {status}")
        return status
    reason = f"its worker stopped before the record was written in full: {missing}"
    close_incomplete(fix.sink, run_id, reason)
    run.data.tags[INCOMPLETE_TAG] = reason
    queued = ""
    if trial.state == TrialState.COMPLETE and not retried:
        retry(fix.study, trial)
        queued = ", configuration retried"
    report.fixed.append(f"run {run_id} of trial {n}: RUNNING with an incomplete record ({missing}) -> "
                        f"FAILED, tagged {INCOMPLETE_TAG}{queued}")
    return "FAILED"


def _each_step_once(steps: list[int], count: int) -> bool:
    """Whether sorted ``steps`` are 0..count-1 once each. ``count`` comes from the journal or a run's
    params, which anyone may have edited: only the steps that exist are ever put in a list."""
    return len(steps) == count and steps == list(range(len(steps)))


def _check_complete(n: int, run, epochs: int, client, report: Report) -> None:
    from ...errors import UsageError
    from ...experiment import is_builtin
    from ...runs import fitted_model, load_state_dict, logged_config

    run_id = run.info.run_id
    for key in (schema.TRAIN_LOSS, schema.TEST_LOSS):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        if not _each_step_once(steps, epochs):
            report.violations.append(f"trial {n}: run {run_id} has {len(steps)} {key} points, "
                                     f"not steps 0..{epochs - 1} once each")
    missing = [k for k in map(schema.final, (schema.TRAIN_LOSS, schema.TEST_LOSS)) if k not in run.data.metrics]
    if missing:
        report.violations.append(f"trial {n}: run {run_id} lacks {', '.join(missing)}")
    try:
        state = load_state_dict(client, run_id)
        if is_builtin(run.data.params.get("experiment", "")):  # its model can be built to check the fit
            cfg, found = logged_config(client, run_id, device="cpu")
            fitted_model(client, run_id, cfg, found, state)
    except (HarnessError, UsageError) as exc:
        report.violations.append(f"trial {n}: {exc}")

