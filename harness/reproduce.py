"""Re-run a logged run from its logged config and seed, and say whether the result is the same bit for bit."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from . import provenance, tracking, training
from .loop import History
from .schema import (COMMAND_TAG, FAIL_REASON_TAG, PACKAGES_TAG, PARENT_TAG, REPRODUCES_TAG,
                     TORCH_THREADS_PARAM, TORCH_VERSION_PARAM)
from .errors import UsageError, experiment_exit
from .runs import curves, fetch_artifact, fitted_model, get_run, load_state_dict, logged_config


def reproduce(client, run_id: str, experiment: str | None = None) -> tuple[str | None, list[str], int, list[str]]:
    """Returns (new run id, differences, epochs compared, provenance); no differences means reproduced
    exactly. Provenance: one line per way the re-run's code, packages, data or machine differ from
    the run's (or one saying the run recorded none). The re-run is compared but not logged (new run
    id None) on a store opened read-only.

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
    threads = recorded_threads(source.data.params)
    origin = tracking.provenance_record(found, data, cfg.device, cfg.valid_fraction)
    history = History()
    try:
        with intra_op_threads(threads, run_id):  # the re-run's record says the count it trained with
            result = training.train(cfg, found, data, history=history)
            new_run = None if tracking.read_only(client) else _log(client, source, found, result, origin)
    except BaseException as exc:  # sys.exit() in the experiment's code: said as train says it
        stop = experiment_exit(exc, history.epochs_run)
        if stop is None:
            raise
        raise stop from None
    logged = curves(client, run_id, result.history.values.keys())
    diffs = differences(old_state, result.model.state_dict(), logged, result.history.values)
    if diffs and threads is None:
        given = source.data.params.get(TORCH_THREADS_PARAM)
        what = "no thread count" if given in (None, "") else \
            f"thread count {str(given)[:40]!r}, not a count from 1 to {MAX_THREADS}"
        diffs.append(f"run {run_id} recorded {what}; it was re-run with {torch.get_num_threads()} "
                     "intra-op threads, and a CPU run's bits depend on that count")
    return new_run, diffs, result.history.epochs_run, provenance_lines(client, source, origin.tags)


def provenance_lines(client, source, now: dict[str, str]) -> list[str]:
    """How the re-run's provenance ``now`` differs from what ``source`` recorded, one line each."""
    then = source.data.tags
    if not provenance.recorded(then):
        return [f"run {source.info.run_id} recorded no provenance (logged before the harness recorded it): "
                "its code, packages, data and machine are not compared"]
    import torch

    packages = provenance.requirements()
    then_packages = None
    if then[PACKAGES_TAG] != now[PACKAGES_TAG]:
        then_packages = recorded_requirements(client, source)
    return provenance.differences({**then, TORCH_VERSION_PARAM: source.data.params.get(TORCH_VERSION_PARAM)},
                                  {**now, TORCH_VERSION_PARAM: str(torch.__version__)}, then_packages,
                                  packages.decode())


MAX_REQUIREMENTS_BYTES = 1 << 22  # a run's artifact is untrusted


def recorded_requirements(client, source) -> str | None:
    """The requirements list a run recorded: among its artifacts, or its study's parent run's."""
    import tempfile

    name = provenance.requirements_artifact(source.data.tags[PACKAGES_TAG])
    for run_id in (source.info.run_id, source.data.tags.get(PARENT_TAG)):
        if not run_id or not name:
            continue
        with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
            try:
                return fetch_artifact(client, run_id, name, MAX_REQUIREMENTS_BYTES, tmp).read_text(errors="replace")
            except Exception:  # not there (an older run, another store): the next place, else unknown
                continue
    return None


def _log(client, source, found, result, origin) -> str:
    new_run = client.create_run(source.info.experiment_id, run_name=f"reproduce-{source.info.run_name}",
                                tags={REPRODUCES_TAG: source.info.run_id, COMMAND_TAG: "reproduce"})
    status = "FAILED"
    try:
        tracking.write(client, new_run.info.run_id, origin)
        status = tracking.log_result(client, new_run.info.run_id, found, result)
    except BaseException as exc:  # its plot_predictions' sys.exit(): the re-run FAILED says why
        stop = experiment_exit(exc, result.history.epochs_run)
        if stop is not None:
            client.set_tag(new_run.info.run_id, FAIL_REASON_TAG, str(stop))
        raise
    finally:
        client.set_terminated(new_run.info.run_id, status)
    return new_run.info.run_id


MAX_THREADS = 1024  # a run's record is untrusted: it does not start a million threads


def recorded_threads(params) -> int | None:
    """The intra-op thread count a run trained with; None where it recorded none (or not a usable one)."""
    text = str(params.get(TORCH_THREADS_PARAM, ""))
    return int(text) if text.isascii() and text.isdecimal() and 1 <= int(text) <= MAX_THREADS else None


@contextlib.contextmanager
def intra_op_threads(count: int | None, run_id: str):
    """torch's intra-op threads set to ``count`` while the block runs, then set back: a CPU run's
    reductions are split between threads, so the count decides its bits (OMP_NUM_THREADS=1 gives
    other weights than the default). Said on stderr when it is not this process's."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    cores = os.cpu_count() or 1
    more = f"; that is more than the {cores} cores here: slower, the same bits" if count > cores else ""
    print(f"harness: run {run_id} trained with {count} intra-op threads; re-running with {count}, not this "
          f"process's {before}{more}", file=sys.stderr)
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
