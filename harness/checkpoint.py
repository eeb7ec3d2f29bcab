"""A run's state at the end of an epoch: all it takes to continue it bit for bit.

What a run draws on besides its config is captured: the model, the optimizer, both kinds of schedule,
early stopping's best epoch and weights, the curves so far (as float64 tensors: exact, and outside
the pickle, whose size a reader bounds), and every random generator in play: torch's (CPU and every
CUDA device), the DataLoader's (where the next epoch's shuffle comes from), Python's and NumPy's (an
experiment's augmentation may draw from them). Neither mlflow nor optuna: where a checkpoint is kept is
the caller's business (``Checkpoints.write``).

A checkpoint is taken at an epoch's end, after every observer has seen the epoch (early stopping
included), so resuming at ``epochs_done`` replays nothing and skips nothing. A run asked to stop
(SIGTERM, Ctrl-C) takes one at its next batch boundary instead: format MID_EPOCH, which adds where
in epoch ``epochs_done`` it was (``partial``: the batches done, their values and sizes, the epoch's
learning rate) and keeps the DataLoader's generator as it was when that epoch began, so that the
epoch's batches come again in the same order and the ones done are skipped.
"""
from __future__ import annotations

import io
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import described
from .loop import Partial, overflowing

FORMAT = 1  # at an epoch's end
MID_EPOCH = 2  # at a batch boundary inside an epoch; a reader of format 1 only refuses it
# A bound on the batches of an epoch a checkpoint may say it has done (each is a few values in it).
MAX_BATCHES = 10_000_000


@dataclass
class Checkpoints:
    """When a run writes its checkpoints, and where (``write(state)``, the caller's). Due at the end of
    every ``every``-th epoch, and of the first epoch ``seconds`` after the last checkpoint (or the
    start); never after the last epoch (the run's own record follows)."""

    write: Callable[[dict], None]
    every: int | None = None
    seconds: float | None = None
    clock: Callable[[], float] = time.monotonic
    last: float = field(default=0.0)

    def __post_init__(self):
        self.last = self.clock()

    def due(self, epochs_done: int, epochs: int) -> bool:
        if epochs_done >= epochs:
            return False
        if self.every and epochs_done % self.every == 0:
            return True
        return bool(self.seconds) and self.clock() - self.last >= self.seconds

    def written(self) -> None:
        self.last = self.clock()


def capture(*, config: dict, experiment_sha256: str | None, epochs_done: int, model, optimizer,
            epoch_scheduler=None, batch_scheduler=None, stopper=None, loader_generator=None,
            history: dict[str, list[float]], partial: Partial | None = None, epoch_loader_state=None) -> dict:
    """The state (plain containers and tensors: ``torch.load(weights_only=True)`` reads it back).
    ``partial``: a Partial with batches done (a MID_EPOCH checkpoint), whose epoch began with
    the loader's generator at ``epoch_loader_state``."""
    mid_epoch = partial is not None and partial.batches_done > 0
    state = {
        "format": MID_EPOCH if mid_epoch else FORMAT, "config": config, "experiment_sha256": experiment_sha256, "epochs_done": epochs_done,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "epoch_scheduler": epoch_scheduler.state_dict() if epoch_scheduler is not None else None,
        "batch_scheduler": batch_scheduler.state_dict() if batch_scheduler is not None else None,
        "stopper": None if stopper is None else {"best": stopper.best, "best_state": stopper.best_state,
                                                 "epoch": stopper.history.best_epoch},
        "history": {name: torch.tensor(values, dtype=torch.float64) for name, values in history.items()},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                "loader": loader_generator.get_state() if loader_generator is not None else None,
                "python": _python_state(), "numpy": _numpy_state()},
    }
    if mid_epoch:
        state["rng"]["loader"] = epoch_loader_state
        state["partial"] = {"batches_done": partial.batches_done, "lr": partial.lr,
                            "sizes": torch.tensor(partial.sizes, dtype=torch.int64),
                            "values": {name: torch.stack(values).cpu() for name, values in partial.values.items()}}
    return state


def batches_done(state: dict) -> int:
    """The batches of epoch ``epochs_done`` a checkpoint had trained (0 at an epoch's end)."""
    return state["partial"]["batches_done"] if state.get("format") == MID_EPOCH else 0


def partial_of(state: dict) -> Partial | None:
    """Where in its epoch a checkpoint was taken, or None at an epoch's end."""
    saved = state.get("partial")
    if state.get("format") != MID_EPOCH:
        return None
    return Partial(state["epochs_done"], saved["batches_done"],
                   {name: list(values.unbind(0)) for name, values in saved["values"].items()},
                   saved["sizes"].tolist(), saved["lr"])


def restore(state: dict, *, model, optimizer, epoch_scheduler=None, batch_scheduler=None, stopper=None,
            loader_generator=None, history) -> int:
    """Put ``state`` back into a run built from the same config; returns the epochs it had done.
    Content that does not restore (a tampered checkpoint that passed ``damage``) raises Unusable: the
    parts set so far are of no use, and the caller trains the run again from its start."""
    try:
        return _restore(state, model=model, optimizer=optimizer, epoch_scheduler=epoch_scheduler,
                        batch_scheduler=batch_scheduler, stopper=stopper, loader_generator=loader_generator,
                        history=history)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise Unusable(described(exc, 200)) from None


def _restore(state: dict, *, model, optimizer, epoch_scheduler, batch_scheduler, stopper, loader_generator,
             history) -> int:
    model.load_state_dict(state["model"])
    built = _settings(optimizer, epoch_scheduler, batch_scheduler)
    optimizer.load_state_dict(state["optimizer"])
    for scheduler, saved in ((epoch_scheduler, state["epoch_scheduler"]), (batch_scheduler, state["batch_scheduler"])):
        if (scheduler is None) != (saved is None):
            raise ValueError("the checkpoint's schedule is not this run's")
        if scheduler is not None:
            scheduler.load_state_dict(saved)
    _check_settings(built, optimizer, epoch_scheduler, batch_scheduler)
    if (stopper is None) != (state["stopper"] is None):
        raise ValueError("the checkpoint's early stopping is not this run's")
    if stopper is not None:
        stopper.best, stopper.best_state = state["stopper"]["best"], state["stopper"]["best_state"]
    history.values = {name: values.tolist() for name, values in state["history"].items()}
    if stopper is not None:
        history.best_epoch = state["stopper"]["epoch"]
    rng = state["rng"]
    if (loader_generator is None) != (rng["loader"] is None):
        raise ValueError("the checkpoint's data loader is not this run's")
    if loader_generator is not None:
        loader_generator.set_state(rng["loader"])
    set_generators(rng)
    return state["epochs_done"]


def set_generators(rng: dict) -> None:
    """Every generator but the DataLoader's back to a checkpoint's (``state["rng"]``)."""
    try:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_python_state(rng["python"])
        _set_numpy_state(rng["numpy"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise Unusable(described(exc, 200)) from None


# The optimizer's settings (probe 6): those the run's config builds, not whatever a checkpoint says.
# load_state_dict takes every setting of a param group from the checkpoint (an lr of 0.5 for a run
# of 0.01 trains on with it, under the run's params); only what a schedule moves may differ.

def _settings(optimizer, *schedulers) -> tuple[list[dict], list]:
    """Each param group's settings (lr, momentum, betas, weight_decay, ...) and each schedule's base_lrs."""
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return groups, [list(getattr(s, "base_lrs", [])) for s in schedulers if s is not None]


def _check_settings(built: tuple[list[dict], list], optimizer, *schedulers) -> None:
    """ValueError where the restored optimizer's settings are not those of the freshly built one: with
    a schedule the lr is the one the schedule's restored state last set (its base_lrs and each
    group's initial_lr the built ones), a cycled momentum the schedule's too."""
    schedulers = [s for s in schedulers if s is not None]
    groups, base_lrs = _settings(optimizer, *schedulers)
    moved = {"lr"} if schedulers else set()
    if any(getattr(s, "cycle_momentum", False) for s in schedulers):
        moved |= {"momentum", "betas"}
    if base_lrs != built[1]:
        raise ValueError("the checkpoint's schedule starts from another learning rate than this run's")
    for number, (restored, fresh) in enumerate(zip(groups, built[0])):
        for key in sorted(set(restored) | set(fresh)):
            if key not in moved and not _same(restored.get(key), fresh.get(key)):
                raise ValueError(f"the checkpoint's optimizer has {key}={str(restored.get(key))[:40]} in param "
                                 f"group {number}, this run's config builds {str(fresh.get(key))[:40]}")
    for scheduler in schedulers:
        if not _same([g["lr"] for g in optimizer.param_groups], list(scheduler.get_last_lr())):
            raise ValueError("the checkpoint's optimizer lr is not the one its schedule last set")
        if getattr(scheduler, "cycle_momentum", False):
            # OneCycleLR and CyclicLR keep no last momentum: get_lr computes it afresh from the step
            # count, and sets it in the groups (the same value for an untouched checkpoint).
            restored = [(g.get("momentum"), g.get("betas")) for g in optimizer.param_groups]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "use get_last_lr()": the side effect is what is wanted
                scheduler.get_lr()
            if not _same(restored, [(g.get("momentum"), g.get("betas")) for g in optimizer.param_groups]):
                raise ValueError("the checkpoint's optimizer momentum is not the one its schedule sets")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
# (end of the optimizer's settings)


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _python_state():
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _set_python_state(saved) -> None:
    version, internal, gauss = saved
    random.setstate((version, tuple(internal.tolist()), gauss))


def _numpy_state():
    try:
        import numpy
    except ImportError:
        return None
    kind, keys, pos, has_gauss, cached = numpy.random.get_state()
    return [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]


def _set_numpy_state(saved) -> None:
    if saved is None:
        return
    import numpy

    kind, keys, pos, has_gauss, cached = saved
    numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def matches(state: Any, config: dict, experiment_sha256: str | None) -> str | None:
    """Why ``state`` cannot continue a run of ``config`` (the config as ``TrainConfig.to_dict`` gives
    it) and this experiment file, or None: ``damage``'s reason, or ``another_run``'s."""
    return damage(state, config) or another_run(state, config, experiment_sha256)


class Unusable(Exception):
    """A checkpoint whose content does not restore into this run (tampered with, or damaged inside)."""


def damage(state: Any, config: dict) -> str | None:
    """Why ``state`` is no checkpoint a run of ``config``'s epochs can read, or None: its shape is
    checked whole (a checkpoint is untrusted input), so that what it holds is bounded by the run's
    own epochs before anything is restored or written from it."""
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, MID_EPOCH):
        return "not a checkpoint of this harness's format"
    mid_epoch = state["format"] == MID_EPOCH
    done = state.get("epochs_done")
    if type(done) is not int or not (0 if mid_epoch else 1) <= done < config.get("epochs", 0):
        return f"its epoch count {str(done)[:40]!r} is not within this run's {config.get('epochs')} epochs"
    history = state.get("history")
    if not isinstance(history, dict) or not (history or mid_epoch and done == 0):
        return "it holds no curves"
    for name, values in history.items():
        if not (isinstance(name, str) and 0 < len(name) <= 250 and isinstance(values, torch.Tensor)
                and values.dtype == torch.float64 and values.dim() == 1 and values.numel() == done
                and values.stride() == (1,)):
            return f"its curve {str(name)[:40]!r} is not {done} values, one an epoch"
    for key, kind in (("model", dict), ("optimizer", dict), ("rng", dict)):
        if not isinstance(state.get(key), kind):
            return f"it holds no {key} state"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        return "its model state is not a mapping of names to tensors"
    return _partial_damage(state.get("partial")) if mid_epoch else None


def _partial_damage(partial: Any) -> str | None:
    """Why a MID_EPOCH checkpoint's place in its epoch is unreadable, or None."""
    if not isinstance(partial, dict):
        return "it says it was taken inside an epoch and holds no place in it"
    done, sizes, values = partial.get("batches_done"), partial.get("sizes"), partial.get("values")
    if type(done) is not int or not 0 < done <= MAX_BATCHES:
        return f"its batch count {str(done)[:40]!r} is not a count of batches"
    if not (isinstance(sizes, torch.Tensor) and sizes.dtype == torch.int64 and sizes.shape == (done,)
            and sizes.is_contiguous() and bool((sizes > 0).all())):
        return f"its batch sizes are not {done} counts"
    if not isinstance(values, dict) or "loss" not in values:
        return "it holds no per-batch losses"
    for name, kept in values.items():
        # One real number a batch, on the CPU, as capture stores them, none so large that the epoch's
        # mean (loop.sample_mean, in float32) could overflow in any order of its sum, even in the
        # shortest epoch that goes on after them (loop.overflowing; the loop checks again with the
        # epoch's real batch count): anything else would fail the user's run at the epoch's end (a
        # stack, a meta tensor, a NaN or an overflow read as divergence). Their shape and dtype are
        # compared with the first new batch's, their sizes with the batches skipped (loop.NotKept).
        if not (isinstance(name, str) and 0 < len(name) <= 250 and isinstance(kept, torch.Tensor)
                and kept.dim() >= 1 and len(kept) == done and kept.numel() == done and kept.is_contiguous()
                and kept.device.type == "cpu" and kept.is_floating_point() and not overflowing(kept, sizes)):
            return (f"its per-batch values {str(name)[:40]!r} are not {done} finite numbers, one a batch, "
                    "small enough for the epoch's float32 mean")
    if partial.get("lr") is not None and type(partial["lr"]) is not float:
        return "its learning rate is not a number"
    return None


def another_run(state: dict, config: dict, experiment_sha256: str | None) -> str | None:
    """Why a readable checkpoint is of another run than one of ``config`` and this experiment file, or None."""
    if state.get("experiment_sha256") != experiment_sha256:
        return "written by another version of the experiment file (its sha256 differs)"
    saved = state.get("config")
    if not isinstance(saved, dict):
        return "it holds no config"
    differs = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if differs:
        return f"written by a run of another config ({', '.join(differs[:5])} differ)"
    return None
