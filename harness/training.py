"""One training run of an experiment from a resolved config: model, optimizer, loss, batches, loop."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from .config import TrainConfig, per_epoch
from .errors import ExperimentCodeError, UsageError, described
from .experiment import Data, Datasets, Experiment
from . import checkpoint, registry, signals, tracking
from .checkpoint import Checkpoints
from .loop import (Batches, EarlyStopping, History, NotKept, Observer, Preempted, Recipe, StepFn, StopTraining,
                   batch_length, evaluate, evaluate_batches, fit, map_tensors, train_epoch, train_step)
from .schema import BEST_EPOCH, TRAIN_LOSS, VALID_LOSS, final

# torch's default generator is process-wide: seeding and drawing the initial weights must happen
# as one step, and a model that draws random numbers while it trains (dropout) must not share the
# generator with another thread's trial, or two trials on two threads (--n-jobs) would get each
# other's numbers and no longer re-run bit for bit. So one run trains at a time per process;
# threads still overlap everything around training (sampling, tracking).
RNG_LOCK = threading.RLock()
# Test sets are evaluated in batches of at most this many samples.
EVAL_BATCH = 4096


@dataclass
class TrainResult:
    config: TrainConfig
    model: nn.Module
    data: Data | Datasets
    history: History
    predictions: torch.Tensor | None  # test-set predictions of the final model, on the host (None with an own step)
    scalars: dict[str, float]
    seconds: float | None = None  # wall time of the training loop (fit); None for a member of a stack

    @property
    def diverged(self) -> bool:
        return self.history.diverged_at is not None

    def final_metrics(self) -> dict[str, float]:
        """The values a finished run reports (with early stopping, its best epoch's, whose weights it
        keeps); empty for a diverged one (its last loss is not finite)."""
        if self.diverged or not self.history.epochs_run:
            return {}
        finals = {final(name): self.history.last(name) for name in self.history.values}
        if self.history.best_epoch is not None:
            finals[BEST_EPOCH] = float(self.history.best_epoch)
        return {**finals, **self.scalars}

    def value(self, name: str) -> float:
        """The run's final value of a metric: a per-epoch one's (its best epoch's, with early
        stopping), or a final value read off the trained model (one of the experiment's scalars)."""
        return self.history.last(name) if name in self.history.values else self.scalars[name]


def build_model(cfg: TrainConfig, experiment: Experiment) -> nn.Module:
    with RNG_LOCK:
        torch.manual_seed(cfg.seed)
        try:
            model = experiment.make_model(**experiment.model_arguments(cfg.hparams))
        except Exception as exc:
            raise UsageError(f"experiment {experiment.name!r} cannot build its model with {_hparams(cfg)}: "
                             f"{described(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"experiment {experiment.name!r}: make_model returned a {type(model).__name__}, "
                         "not a torch nn.Module")
    return model.to(cfg.device)


def _hparams(cfg: TrainConfig) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in cfg.hparams.items()) or "no hyperparameters"


def make_optimizer(cfg: TrainConfig, experiment: Experiment, params) -> torch.optim.Optimizer:
    return registry.build_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.settings,
                                    experiment.own_optimizers, cfg)


def make_loss(cfg: TrainConfig, experiment: Experiment):
    return registry.build_loss(cfg.loss, cfg.settings, experiment.own_losses, cfg)


def make_scheduler(cfg: TrainConfig, experiment: Experiment, optimizer, steps_per_epoch: int):
    """(per-epoch schedule, per-batch schedule), either or both None: torch steps OneCycleLR and
    CyclicLR after every batch, every other schedule after every epoch."""
    schedule = registry.build_scheduler(cfg.scheduler, optimizer, cfg.settings, cfg.epochs, steps_per_epoch,
                                        experiment.schedulers.get(cfg.scheduler), cfg)
    if isinstance(schedule, (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)):
        return None, schedule
    return schedule, None


def with_validation(data: Data | Datasets, cfg: TrainConfig) -> Data | Datasets:
    """The run's data: the experiment's, with ``valid_fraction`` of the training part held out for
    validation where the config asks for it."""
    if not cfg.valid_fraction:
        return data
    if data.has_valid:
        raise UsageError(f"valid_fraction {cfg.valid_fraction} with an experiment that gives its own validation "
                         "part: leave valid_fraction unset")
    return data.held_out(cfg.valid_fraction)


def steps(cfg: TrainConfig, experiment: Experiment) -> tuple[StepFn | None, StepFn | None]:
    """The experiment's own training and evaluation steps, given the run's config; (None, None) for
    the plain step (loss_fn(model(inputs), targets))."""
    if experiment.step is None:
        return None, None
    own, own_eval = experiment.step, experiment.eval_step or experiment.step
    return (lambda model, batch, loss_fn: own(model, batch, loss_fn, cfg),
            lambda model, batch, loss_fn: own_eval(model, batch, loss_fn, cfg))


def selection_metric(cfg: TrainConfig, data: Data | Datasets) -> str:
    return cfg.objective or (VALID_LOSS if data.has_valid else TRAIN_LOSS)


def preflight(cfg: TrainConfig, experiment: Experiment, data: Data | Datasets, reserved=()) -> None:
    """Build the model, its optimizer, loss and schedule, and put one small batch through a training
    step and an evaluation, on a model that is then dropped: an experiment whose code cannot train
    with this config (a model with no parameters, inputs of the wrong shape, a loss that does not
    fit its outputs, a step that fails in training mode only, a metric the config selects on that
    the experiment does not compute) is refused in one line before any store is touched. The real
    run builds its own model from the seed, and the random state is put back."""
    model = build_model(cfg, experiment)
    state = torch.random.get_rng_state()
    try:
        run_data = with_validation(data, cfg).to(cfg.device)
        optimizer = make_optimizer(cfg, experiment, model.parameters())
        loss_fn = make_loss(cfg, experiment)
        make_scheduler(cfg, experiment, optimizer, 1)
        train_batches, test_batches, valid_batches = batches(run_data, cfg)
        batch = head(next(iter(test_batches)), 8)
        step, eval_step = steps(cfg, experiment)
        if step is None:
            X, y = (t.to(cfg.device) for t in batch)
            _, pred = evaluate(model, X, y, loss_fn)
            names = {"loss"} | set(_metrics(experiment, pred, y))
            model.train()
            train_step(model, X, y, loss_fn, optimizer)
            recorded = {"train": names, "valid": names}
        else:
            device = torch.device(cfg.device)
            recorded = {"valid": set(evaluate_batches(model, [batch], loss_fn, device, step=eval_step)[0]),
                        "train": set(train_epoch(model, [batch], loss_fn, optimizer, device, step=step))}
        finals = list(experiment.final_values(model))
        refused = tracking.refused_metric([f"{split}_{name}" for split, names in {**recorded, "test": recorded["valid"]}.items()
                                  for name in sorted(names)], finals, reserved)
        if refused:
            raise UsageError(f"experiment {experiment.name!r} {refused}")
        if valid_batches is None:
            del recorded["valid"]
        metric = selection_metric(cfg, run_data)
        split, _, name = metric.partition("_")
        if name not in recorded.get(split, ()) if per_epoch(metric) else metric not in finals:
            names = [f"{s}_{n}" for s in ("train", "valid") if s in recorded for n in sorted(recorded[s])]
            also = f", and the final values {', '.join(finals)}" if finals else ""
            raise UsageError(f"the run is selected on {metric!r}, which it does not record; it records "
                             f"{', '.join(names)}{also}")
    except UsageError:
        raise
    except Exception as exc:  # nothing is written yet: the input is refused. sys.exit() and the
        # experiment's own BaseException are its asking to stop (errors.asked_to_stop), said by the command
        raise UsageError(f"experiment {experiment.name!r} cannot train with {cfg.optimizer}+{cfg.loss}, "
                         f"{_hparams(cfg)}: {described(exc)}") from None
    finally:
        torch.random.set_rng_state(state)


def head(batch, n: int):
    """The first ``n`` samples of a batch: every tensor in it cut along its first dimension."""
    return map_tensors(batch, lambda t: t[:n] if t.dim() else t)


def _metrics(experiment: Experiment, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The experiment's metrics of a batch, checked: a mapping of names to numbers."""
    if experiment.metrics is None:
        return {}
    values = experiment.metrics(pred, y)
    if not isinstance(values, dict):
        raise TypeError(f"metrics() must return a dict of names to tensors, got {type(values).__name__}")
    bad = next((k for k in values if not (isinstance(k, str) and k.isidentifier())), None)
    if bad is not None:
        raise TypeError(f"metrics() gave a value named {bad!r}; names must be Python identifiers (letters, "
                        "digits and _, not starting with a digit)")
    if "loss" in values:  # the run's own loss has that name: one would silently replace the other
        raise TypeError("metrics() gave a value named 'loss', the name of the run's own loss; name it "
                        "otherwise")
    for name, value in values.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"metrics() must give each value as a one-element tensor; {name!r} is "
                            f"{type(value).__name__}")
    return values


def batches(data: Data | Datasets, cfg: TrainConfig) -> tuple[Batches, Batches, Batches | None]:
    """What the loop iterates each epoch: training, test and validation batches (None without).

    Full batch (no ``batch_size``) on tensors is one (inputs, targets) pair, exactly the reference.
    Mini-batches come from a DataLoader whose shuffling draws from a generator seeded with the
    run's seed, so a re-run sees the same batches in the same order.
    """
    pin = torch.device(cfg.device).type == "cuda"
    if isinstance(data, Data):
        if cfg.batch_size is None:
            train: Batches = [(data.X_train, data.y_train)]
        else:
            dataset = TensorDataset(data.X_train, data.y_train)
            generator = torch.Generator().manual_seed(cfg.seed)
            # Whole batches at once (TensorDataset indexes with a list): the same batches as
            # DataLoader(dataset, batch_size, shuffle=True, generator=generator), without
            # collating one sample at a time.
            sampler = BatchSampler(RandomSampler(dataset, generator=generator), cfg.batch_size, drop_last=False)
            train = DataLoader(dataset, sampler=sampler, batch_size=None, generator=generator,
                               pin_memory=pin and data.X_train.device.type == "cpu")
        test: Batches = list(zip(data.X_test.split(EVAL_BATCH), data.y_test.split(EVAL_BATCH)))
        valid = list(zip(data.X_valid.split(EVAL_BATCH), data.y_valid.split(EVAL_BATCH))) if data.has_valid else None
        return train, test, valid
    generator = torch.Generator().manual_seed(cfg.seed)
    size = cfg.batch_size or len(data.train)
    train = DataLoader(data.train, batch_size=size, shuffle=cfg.batch_size is not None, generator=generator,
                       pin_memory=pin)
    test = DataLoader(data.test, batch_size=max(size, EVAL_BATCH), shuffle=False, pin_memory=pin)
    valid = DataLoader(data.valid, batch_size=max(size, EVAL_BATCH), shuffle=False, pin_memory=pin) \
        if data.has_valid else None
    return train, test, valid


def train(cfg: TrainConfig, experiment: Experiment, data: Data | Datasets | None = None,
          observers: Iterable[Observer] = (), sync_every: int | None = None,
          history: History | None = None, checkpoints: Checkpoints | None = None,
          resume: dict | None = None) -> TrainResult:
    """Train a run of ``cfg``. ``checkpoints``: when and where its state is written (see
    checkpoint.py); ``resume``: a checkpoint of a run of this config to continue from (checked by
    the caller with ``checkpoint.matches``): the result is bit for bit that of a run never stopped."""
    if torch.device(cfg.device).type == "cuda":
        # Bit-for-bit re-runs on a GPU need deterministic kernels (cuBLAS needs its workspace set
        # before its first use); a kernel that has no deterministic version raises instead of drifting.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    data = with_validation(data if data is not None else experiment.load_data(), cfg).to(cfg.device)
    history = history if history is not None else History()
    with RNG_LOCK:
        model = build_model(cfg, experiment)
        loss_fn = make_loss(cfg, experiment)
        optimizer = make_optimizer(cfg, experiment, model.parameters())
        train_batches, test_batches, valid_batches = batches(data, cfg)
        epoch_schedule, batch_schedule = make_scheduler(cfg, experiment, optimizer, len(train_batches))
        metric = selection_metric(cfg, data)
        step, eval_step = steps(cfg, experiment)
        observers = list(observers)
        stopper = None
        if cfg.patience is not None:
            # Last: the observers before it (a pruner, tracking) see the epoch it stops at. It
            # copies the weights of the best epoch as it happens, so it reads every epoch.
            stopper = EarlyStopping(model, history, metric, cfg.patience, cfg.min_delta, cfg.direction == "maximize")
            observers.append(stopper)
            sync_every = 1
        loader_generator = getattr(train_batches, "generator", None)  # a DataLoader's: the shuffles to come
        parts = dict(model=model, optimizer=optimizer, epoch_scheduler=epoch_schedule, batch_scheduler=batch_schedule,
                     stopper=stopper, loader_generator=loader_generator)
        start_epoch, partial = 0, None
        if resume is not None:
            start_epoch = checkpoint.restore(resume, history=history, **parts)
            partial = checkpoint.partial_of(resume)
            if partial is not None and (loader_generator is None or partial.batches_done >= len(train_batches)):
                raise checkpoint.Unusable(f"it was taken after batch {partial.batches_done} of an epoch of "
                                          f"{len(train_batches)}")
        if loader_generator is not None and (checkpoints is not None or partial is not None):
            train_batches = _Positioned(train_batches, loader_generator,
                                        partial.sizes if partial else [], resume["rng"] if partial else None)
        if checkpoints is not None:
            # After every other observer (early stopping included): the state is the epoch's whole end.
            # The state is read where the epoch ends, so every epoch is synced (one copy an epoch on a device).
            observers.append(_Checkpointing(checkpoints, cfg, experiment, history, parts))
            sync_every = 1
        started = time.perf_counter()  # inside the lock: a thread waiting for it is not training
        # With checkpoints, an interrupt first asks for one at the next batch boundary (signals.preemptible).
        with signals.preemptible() if checkpoints is not None else contextlib.nullcontext() as preemption:
            try:
                history = fit(model, train_batches, test_batches, loss_fn, optimizer, cfg.epochs,
                              metrics_fn=experiment.metrics, observers=observers, sync_every=sync_every,
                              history=history, valid_batches=valid_batches, scheduler=epoch_schedule, monitor=metric,
                              recipe=Recipe(cfg.grad_clip_norm, cfg.grad_clip_value, batch_schedule),
                              step=step, eval_step=eval_step, start_epoch=start_epoch, partial=partial,
                              stop_requested=preemption.requested if preemption is not None else None)
            except Preempted as cut:
                preemption.reached()
                _stopped_at(cut.partial, checkpoints, cfg, experiment, history, parts, train_batches,
                            resumed_at=(start_epoch, partial.batches_done if partial else 0) if resume else None)
                raise KeyboardInterrupt(str(cut)) from None
            except Exception as exc:
                _raise_refused(exc, resume, history.epochs_run == start_epoch)
                error = experiment_code_error(exc, history.epochs_run)
                if error is None or error is exc:
                    raise
                raise error from exc
        seconds = time.perf_counter() - started  # fit ends with its values on the host: the device is done
        if stopper is not None:
            stopper.restore()
        predictions = None
        if step is None:  # an own step's batches need not be (inputs, targets): no predictions to plot
            _, predictions = evaluate_batches(model, test_batches, loss_fn, model_device(model),
                                              keep_predictions=True)
            predictions = predictions.cpu()
    return TrainResult(cfg, model, data, history, predictions, experiment.final_values(model), seconds)


def _raise_refused(exc: Exception, resume: dict | None, at_start: bool) -> None:
    """Unusable where a continued run's first epoch refuses what its checkpoint held (its curves, or
    its batches' values, are not the ones this run records): the checkpoint's fault, not the experiment's."""
    if resume is not None and isinstance(exc, NotKept):
        raise checkpoint.Unusable(str(exc)) from None
    if resume is not None and at_start and isinstance(exc, TypeError) \
            and ("same names every epoch" in str(exc) or "same values for every batch" in str(exc)):
        raise checkpoint.Unusable("its curves are not the ones this run records") from None


def _stopped_at(partial, checkpoints: Checkpoints, cfg: TrainConfig, experiment: Experiment, history: History,
                parts: dict, train_batches, resumed_at: tuple[int, int] | None) -> None:
    """The checkpoint of a run stopped at a batch boundary (none where it has trained nothing yet, or
    nothing since the checkpoint it went on from), and one line on stderr saying where it stopped."""
    where = (partial.epoch, partial.batches_done)
    if where == (0, 0) or where == resumed_at:
        return
    epoch_start = getattr(train_batches, "epoch_start", None)
    checkpoints.write(checkpoint.capture(config=cfg.to_dict(), experiment_sha256=experiment.sha256,
                                         epochs_done=partial.epoch, history=history.values, partial=partial,
                                         epoch_loader_state=epoch_start, **parts))
    checkpoints.written()
    inside = f", batch {partial.batches_done} of {len(train_batches)}" if partial.batches_done else ""
    print(f"harness: stopped at epoch {partial.epoch}{inside}: checkpoint written", file=sys.stderr, flush=True)


class _Positioned:
    """A DataLoader whose generator's state at the start of each pass is kept (a checkpoint inside an
    epoch holds it, to draw that epoch's order again). For a run continued inside an epoch, its first
    pass skips the batches done (NotKept where one's size is not the one the checkpoint kept for it:
    the kept values would be weighed wrong), then puts every other generator back as the checkpoint
    had them (drawing those batches again may have moved them: an augmentation's random draws)."""

    def __init__(self, loader, generator: torch.Generator, skip: tuple[int, ...] | list[int] = (), rng: dict | None = None):
        self.loader, self.generator, self.skip, self.rng = loader, generator, list(skip), rng
        self.epoch_start = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.epoch_start = self.generator.get_state()
        batches = iter(self.loader)
        if self.skip:
            for number, kept in enumerate(self.skip):
                size = batch_length(next(batches))
                if size != kept:
                    raise NotKept(f"its batch {number} holds {kept} samples, this run's holds {size}")
            self.skip = []
            checkpoint.set_generators(self.rng)
        return batches


class _Checkpointing:
    """Loop observer: the run's state written at the end of each epoch ``checkpoints`` finds due."""

    def __init__(self, checkpoints: Checkpoints, cfg: TrainConfig, experiment: Experiment, history: History,
                 parts: dict):
        self.checkpoints, self.cfg, self.experiment, self.history, self.parts = checkpoints, cfg, experiment, history, parts

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self.checkpoints.due(epoch + 1, self.cfg.epochs):
            self.checkpoints.write(checkpoint.capture(config=self.cfg.to_dict(), experiment_sha256=self.experiment.sha256,
                                                      epochs_done=epoch + 1, history=self.history.values, **self.parts))
            self.checkpoints.written()


def train_from(cfg: TrainConfig, experiment: Experiment, data, observers: list, history: History,
               checkpoints: Checkpoints | None, resume: dict | None, refused: Callable[[str], None]) -> TrainResult:
    """``train`` going on from ``resume``; a checkpoint whose content does not restore into the run
    (checkpoint.Unusable: what it set is of no use) is told to ``refused`` and the run trains again
    from epoch 0."""
    try:
        return train(cfg, experiment, data, observers, history=history, checkpoints=checkpoints, resume=resume)
    except checkpoint.Unusable as exc:
        if resume is None:
            raise
        refused(str(exc))
        history.__init__()
        return train(cfg, experiment, data, observers, history=history, checkpoints=checkpoints)


def experiment_code_error(exc: BaseException, epoch: int) -> ExperimentCodeError | None:
    """What an exception raised while training says as the failure of the experiment's own code
    (one line, with the epoch), or None for the harness's own failures (tracking, the journal, a
    pruner's stop), which keep their handling."""
    if isinstance(exc, ExperimentCodeError):
        return exc
    if isinstance(exc, StopTraining) or not isinstance(exc, Exception) \
            or type(exc).__module__.startswith(("harness.", "optuna", "mlflow")):
        return None
    return ExperimentCodeError(f"the experiment's code raised at epoch {epoch}: {described(exc)}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
