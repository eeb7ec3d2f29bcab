"""One training run of an experiment from a resolved config: model, optimizer, loss, batches, loop."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from .config import TrainConfig
from .errors import UsageError
from .experiment import Data, Datasets, Experiment, first_line
from .loop import Batches, History, Observer, evaluate, evaluate_batches, fit
from .registry import build_loss, build_optimizer
from .schema import final

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
    predictions: torch.Tensor  # test-set predictions of the final model, on the host
    scalars: dict[str, float]
    seconds: float | None = None  # wall time of the training loop (fit); None for a member of a stack

    @property
    def diverged(self) -> bool:
        return self.history.diverged_at is not None

    def final_metrics(self) -> dict[str, float]:
        """The values a finished run reports; empty for a diverged one (its last loss is not finite)."""
        if self.diverged or not self.history.epochs_run:
            return {}
        finals = {final(name): values[-1] for name, values in self.history.values.items()}
        return {**finals, **self.scalars}


def build_model(cfg: TrainConfig, experiment: Experiment) -> nn.Module:
    with RNG_LOCK:
        torch.manual_seed(cfg.seed)
        try:
            model = experiment.make_model(**cfg.hparams)
        except Exception as exc:
            raise UsageError(f"experiment {experiment.name!r} cannot build its model with {_hparams(cfg)}: "
                             f"{first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"experiment {experiment.name!r}: make_model returned a {type(model).__name__}, "
                         "not a torch nn.Module")
    return model.to(cfg.device)


def _hparams(cfg: TrainConfig) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in cfg.hparams.items()) or "no hyperparameters"


def preflight(cfg: TrainConfig, experiment: Experiment, data: Data | Datasets) -> None:
    """Build the model and its optimizer and put one test batch through them, on a model that is then
    dropped: an experiment whose code cannot train with this config (a model with no parameters,
    inputs of the wrong shape, a loss that does not fit its outputs) is refused in one line before
    any store is touched. The real run builds its own model from the seed."""
    model = build_model(cfg, experiment)
    try:
        build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
        _, test_batches = batches(data.to(cfg.device), cfg)
        X, y = next(iter(test_batches))
        evaluate(model, X[:8].to(cfg.device), y[:8].to(cfg.device), build_loss(cfg.loss))
    except Exception as exc:
        raise UsageError(f"experiment {experiment.name!r} cannot train with {cfg.optimizer}+{cfg.loss}, "
                         f"{_hparams(cfg)}: {first_line(exc)}") from None


def batches(data: Data | Datasets, cfg: TrainConfig) -> tuple[Batches, Batches]:
    """What the loop iterates each epoch: training batches and test batches.

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
        return train, test
    generator = torch.Generator().manual_seed(cfg.seed)
    size = cfg.batch_size or len(data.train)
    train = DataLoader(data.train, batch_size=size, shuffle=cfg.batch_size is not None, generator=generator,
                       pin_memory=pin)
    test = DataLoader(data.test, batch_size=max(size, EVAL_BATCH), shuffle=False, pin_memory=pin)
    return train, test


def train(cfg: TrainConfig, experiment: Experiment, data: Data | Datasets | None = None,
          observers: Iterable[Observer] = (), sync_every: int | None = None,
          history: History | None = None) -> TrainResult:
    if torch.device(cfg.device).type == "cuda":
        # Bit-for-bit re-runs on a GPU need deterministic kernels (cuBLAS needs its workspace set
        # before its first use); a kernel that has no deterministic version raises instead of drifting.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    data = (data if data is not None else experiment.load_data()).to(cfg.device)
    with RNG_LOCK:
        model = build_model(cfg, experiment)
        loss_fn = build_loss(cfg.loss)
        optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
        train_batches, test_batches = batches(data, cfg)
        started = time.perf_counter()  # inside the lock: a thread waiting for it is not training
        history = fit(model, train_batches, test_batches, loss_fn, optimizer, cfg.epochs,
                      metrics_fn=experiment.metrics, observers=observers, sync_every=sync_every, history=history)
        seconds = time.perf_counter() - started  # fit ends with its values on the host: the device is done
        _, predictions = evaluate_batches(model, test_batches, loss_fn, model_device(model), keep_predictions=True)
    scalars = experiment.scalars(model)
    return TrainResult(cfg, model, data, history, predictions.cpu(), {**scalars, **experiment.errors(scalars)},
                       seconds)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
