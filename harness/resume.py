"""A run's checkpoints in MLflow: written among its artifacts as it trains, found and checked to resume it.

Two slots, written in turn: a write cut short (a crash, a full disk) tears one, and the other still
holds the checkpoint before it. A checkpoint is untrusted input when read back: its size is checked
before it is read, it must be a plain ``torch.save`` archive, it is loaded with ``weights_only=True``
(nothing in it chooses code), and it must be of this run's config and experiment file.
"""
from __future__ import annotations

import posixpath
import sys
import tempfile
from pathlib import Path

from . import checkpoint
from .checkpoint import Checkpoints
from .errors import UsageError, described
from .runs import MAX_STATE_DICT_BYTES, ArtifactRefused, read_archive
from .schema import checkpoint_name

SLOTS = (0, 1)
# The model, the optimizer's state (Adam: two tensors a parameter) and early stopping's best weights.
MAX_CHECKPOINT_BYTES = 4 * MAX_STATE_DICT_BYTES


def say(line: str) -> None:
    print(f"harness: {line}", file=sys.stderr)


def run_checkpoints(client, run_id, every: int | None, seconds: float | None, after_slot: int | None = None,
                    notify=say) -> Checkpoints:
    """Checkpoints written into the run's artifacts, the first into the slot after ``after_slot``
    (the one a resumed run was read from stays whole until the next is written). ``run_id``: the
    run's id, or a function giving it (a trial's run is created in the background)."""
    slots = {"next": SLOTS[0] if after_slot is None else SLOTS[(after_slot + 1) % len(SLOTS)], "failed": False}

    def write(state: dict) -> None:
        slot = slots["next"]
        folder, name = posixpath.split(checkpoint_name(slot))
        run = run_id() if callable(run_id) else run_id
        try:
            with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
                path = Path(tmp, name)
                path.write_bytes(checkpoint.to_bytes(state))
                client.log_artifact(run, str(path), folder)
        except Exception as exc:  # a full disk, a store gone: training goes on, the other slot stays whole
            if not slots["failed"]:
                notify(f"a checkpoint of run {run} could not be written ({described(exc)}); training goes on, "
                       "and the previous checkpoint stays usable")
            slots["failed"] = True
            return
        slots["next"] = SLOTS[(slot + 1) % len(SLOTS)]

    return Checkpoints(write=write, every=every, seconds=seconds)


def latest(client, run_id: str, config: dict, experiment_sha256: str | None,
           notify=say) -> tuple[dict | None, int | None]:
    """The run's latest usable checkpoint and its slot, or (None, None). Each one refused (torn,
    tampered with, too large) is said in one line; one of another config or experiment file is the
    caller's input: a UsageError, before anything is written."""
    found: list[tuple[int, int, dict]] = []
    others: list[str] = []
    for slot in SLOTS:
        name = checkpoint_name(slot)
        state = _read(client, run_id, name, notify)
        if state is None:
            continue
        why = checkpoint.damage(state, config)
        if why:
            notify(f"checkpoint {name} of run {run_id} refused: {why}")
            continue
        other = checkpoint.another_run(state, config, experiment_sha256)
        if other:
            others.append(f"run {run_id}'s checkpoint {name} was {other}")
            continue
        found.append((state["epochs_done"], slot, state))
    if not found and others:  # none of this run's: the flags or the file given are not the ones that started it
        raise UsageError(f"{others[0]}; resume it with the experiment file and flags that started it")
    for other in others:  # one slot another run's, the other this one's: that one is used
        notify(f"{other}: refused, the other slot is used")
    if not found:
        return None, None
    _, slot, state = max(found, key=lambda f: f[0])
    return state, slot


def _read(client, run_id: str, name: str, notify) -> dict | None:
    try:
        return read_archive(client, run_id, name, MAX_CHECKPOINT_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None  # never written
    except ArtifactRefused as exc:
        notify(f"checkpoint {name} of run {run_id} refused: {exc}")
    except Exception as exc:  # a link out of the run's folder, a store that refuses, a file it cannot open
        notify(f"checkpoint {name} of run {run_id} unreadable: {described(exc)}")
    return None
