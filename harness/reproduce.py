"""Re-run a logged run from its logged config and seed, and say whether the result is the same bit for bit."""
from __future__ import annotations

import torch

from . import tracking, training
from .schema import COMMAND_TAG, REPRODUCES_TAG
from .errors import UsageError
from .runs import curves, fitted_model, get_run, load_state_dict, logged_config


def reproduce(client, run_id: str, experiment: str | None = None) -> tuple[str | None, list[str], int]:
    """Returns (new run id, differences, epochs compared); no differences means reproduced exactly.
    The re-run is compared but not logged (new run id None) on a store opened read-only.

    ``experiment``: the run's experiment module or file, when it is not one of the ``experiments`` package.
    """
    source = get_run(client, run_id)
    if source.info.status not in ("FINISHED", "FAILED"):
        raise UsageError(f"run {run_id} is {source.info.status}; only FINISHED or FAILED runs can be "
                         "re-run and compared (a pruned or interrupted run stopped early)")
    cfg, found = logged_config(client, run_id, experiment=experiment)
    data = found.load_data()
    training.preflight(cfg, found, data)  # the experiment's code may have changed since
    # The run's own state_dict is checked before anything is trained or logged: a refused one
    # leaves no re-run behind.
    old_state = load_state_dict(client, run_id)
    fitted_model(client, run_id, cfg, found, old_state)
    result = training.train(cfg, found, data)
    new_run = None if tracking.read_only(client) else _log(client, source, found, result)
    logged = curves(client, run_id, result.history.values.keys())
    return new_run, differences(old_state, result.model.state_dict(),
                                            logged, result.history.values), result.history.epochs_run


def _log(client, source, found, result) -> str:
    new_run = client.create_run(source.info.experiment_id, run_name=f"reproduce-{source.info.run_name}",
                                tags={REPRODUCES_TAG: source.info.run_id, COMMAND_TAG: "reproduce"})
    status = "FAILED"
    try:
        status = tracking.log_result(client, new_run.info.run_id, found, result)
    finally:
        client.set_terminated(new_run.info.run_id, status)
    return new_run.info.run_id


def differences(old_state: dict, new_state: dict, old_curves: dict, new_curves: dict) -> list[str]:
    diffs = []
    if list(old_state) != list(new_state):
        diffs.append(f"state_dict keys differ: {list(old_state)} vs {list(new_state)}")
    for key in old_state.keys() & new_state.keys():
        old, new = old_state[key], new_state[key].cpu()
        if old.shape != new.shape or old.dtype != new.dtype:
            diffs.append(f"state_dict[{key!r}]: {old.dtype}{list(old.shape)} vs {new.dtype}{list(new.shape)}")
        elif not torch.equal(old, new):
            diffs.append(f"state_dict[{key!r}]: max abs difference {(old - new).abs().max().item():.3g}")
    for key in sorted(old_curves.keys() | new_curves.keys()):
        old, new = old_curves.get(key, []), new_curves.get(key, [])
        if len(old) != len(new):
            diffs.append(f"{key}: logged run has {len(old)} epochs, re-run {len(new)}")
            continue
        differing = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        if differing:
            i = differing[0]
            diffs.append(f"{key}: {len(differing)} of {len(old)} epochs differ, first at epoch {i} "
                         f"({old[i]!r} vs {new[i]!r})")
    return diffs
