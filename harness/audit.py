"""The invariants between a study's Optuna storage and its MLflow runs; ``fix`` repairs what it can.

Stale work (a trial or run left RUNNING by a worker that is gone) is what a crash leaves; repairing
it fails the trial, retries its configuration through Optuna's RetryHeartbeatStaleTrialCallback and
closes the run as FAILED.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from .search.tracker import PARENT_ATTR, RUN_ATTR
from .search.workers import WORKER_ATTR, abandoned, alive
from .tracking import FAIL_REASON_TAG

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


def stale_trials(study) -> list:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if alive(t.user_attrs.get(WORKER_ATTR)) is False]


def fail_and_retry(study, storage, trial) -> int:
    """What Optuna's heartbeat does to a stale trial: FAIL it and enqueue its params again."""
    storage.set_trial_user_attr(trial._trial_id, "fail_reason", "worker died")
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(trial._trial_id))
    return trial.number


def recover_stale(study, storage) -> tuple[list[int], list[int]]:
    """Fail and retry the trials that dead workers left RUNNING. Returns their numbers: those whose
    worker on this machine is gone (its pid), and those whose heartbeat went silent (Optuna's own
    check, RDB storages only: the way to know about a worker on another machine)."""
    by_pid = [fail_and_retry(study, storage, trial) for trial in stale_trials(study)]
    before = abandoned(study.get_trials(deepcopy=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        fail_stale_trials(study)
    by_heartbeat = sorted(abandoned(study.get_trials(deepcopy=False)) - before)
    return by_pid, by_heartbeat


def child_runs(client, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              max_results=50000)


def audit(study, storage, client, *, fix: bool = False) -> Report:
    report = Report()
    if fix:
        by_pid, by_heartbeat = recover_stale(study, storage)
        report.fixed += [f"trial {n}: RUNNING with its worker gone -> FAIL, configuration retried" for n in by_pid]
        report.fixed += [f"trial {n}: RUNNING with its heartbeat silent -> FAIL, configuration retried"
                         for n in by_heartbeat]
    trials = study.get_trials(deepcopy=False)
    report.checked_trials = len(trials)
    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id is None:
        if trials:
            report.violations.append("the study has no MLflow parent run (user attr mlflow_parent_run_id)")
        return report
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        report.violations.append(f"parent run {parent_id} does not exist in {client.tracking_uri}")
        return report
    runs = child_runs(client, parent_id)
    report.checked_runs = len(runs)
    by_number: dict[int, list] = {}
    for run in runs:
        number = run.data.tags.get("optuna.trial_number")
        by_number.setdefault(int(number) if number and number.isdigit() else -1, []).append(run)
    live_workers = False
    for trial in trials:
        _check_trial(trial, by_number.pop(trial.number, []), client, report, fix)
        live_workers |= trial.state == TrialState.RUNNING and alive(trial.user_attrs.get(WORKER_ATTR)) is not False
    for number, orphans in sorted(by_number.items()):
        for run in orphans:
            report.violations.append(f"run {run.info.run_id} claims trial {number}, which the study does not have")
    if parent.info.status == "RUNNING" and not live_workers:
        if fix:
            client.set_terminated(parent_id, "FINISHED")
            report.fixed.append(f"parent run {parent_id}: RUNNING with no live worker -> FINISHED")
        else:
            report.violations.append(f"parent run {parent_id} is RUNNING but no live worker owns the study")
    return report


def _check_trial(trial, runs: list, client, report: Report, fix: bool) -> None:
    n, state = trial.number, trial.state
    if state == TrialState.WAITING:
        return
    if state == TrialState.RUNNING:
        owner = alive(trial.user_attrs.get(WORKER_ATTR))
        if owner is False:
            report.violations.append(f"trial {n} is RUNNING but its worker {trial.user_attrs[WORKER_ATTR]} is gone")
        return  # a live worker owns it (or it runs elsewhere): nothing to compare yet
    if len(runs) != 1:
        report.violations.append(f"trial {n} ({state.name}) has {len(runs)} runs, not 1")
        return
    run = runs[0]
    run_id = run.info.run_id
    linked = trial.user_attrs.get(RUN_ATTR)
    if linked != run_id and (linked is not None or state != TrialState.FAIL):
        report.violations.append(f"trial {n}: user attr {RUN_ATTR}={linked!r} but its run is {run_id}")
    status = run.info.status
    if status == "RUNNING" and state == TrialState.FAIL and fix:
        client.set_tag(run_id, FAIL_REASON_TAG, trial.user_attrs.get("fail_reason", "worker died"))
        client.set_terminated(run_id, "FAILED")
        report.fixed.append(f"run {run_id} of trial {n}: RUNNING with its trial FAIL -> FAILED")
        status = "FAILED"
    if status not in EXPECTED_STATUS[state]:
        report.violations.append(f"trial {n} is {state.name} but run {run_id} is {status}")
    params = run.data.params
    # Every sampled param (hyperparameters too) as the run logged it: the config's str() of the value.
    expected = {name: str(value) for name, value in trial.params.items()}
    logged = {name: params.get(name) for name in trial.params}
    if "optimizer_loss" in trial.params:
        logged["optimizer_loss"] = f"{params.get('optimizer')}+{params.get('loss')}"
    if logged != expected:
        report.violations.append(f"trial {n}: run params {logged} differ from trial params {expected}")
    if state == TrialState.COMPLETE:
        _check_complete(n, run, trial.params.get("epochs"), client, report)


def _check_complete(n: int, run, epochs: int, client, report: Report) -> None:
    from .errors import HarnessError
    from .runs import load_state_dict

    run_id = run.info.run_id
    for key in ("train_loss", "test_loss"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        if steps != list(range(epochs)):
            report.violations.append(f"trial {n}: run {run_id} has {len(steps)} {key} points, "
                                     f"not steps 0..{epochs - 1} once each")
    missing = [k for k in ("final_train_loss", "final_test_loss") if k not in run.data.metrics]
    if missing:
        report.violations.append(f"trial {n}: run {run_id} lacks {', '.join(missing)}")
    try:
        load_state_dict(client, run_id)
    except HarnessError as exc:
        report.violations.append(f"trial {n}: {exc}")
    except Exception as exc:  # absent artifact
        report.violations.append(f"trial {n}: run {run_id} has no loadable state_dict.pt ({type(exc).__name__})")

