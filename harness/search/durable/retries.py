"""Queueing a trial's configuration again, as Optuna's retry callback does, minus what was its own."""
from __future__ import annotations

import copy

from optuna.storages import RetryHeartbeatStaleTrialCallback

from ...schema import ATTEMPT_ATTRS


class Retry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry (its ``failed_trial`` and ``retry_history`` system attrs, so that its
    ``retried_trial_number`` and ``retry_history`` find the chain), with the user attrs of the
    attempt (ATTEMPT_ATTRS) left behind: a retry killed before its own run was created would name
    the run of the trial it retries, a link no later fix can take back once the trial has finished
    (Optuna refuses to change a finished trial's attrs). The earlier attempts' runs stay reachable
    through the retry history (recorder.resumable)."""

    def __call__(self, study, trial) -> None:
        own = copy.copy(trial)
        own.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}
        super().__call__(study, own)
