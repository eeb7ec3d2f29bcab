"""Optimizers, losses and learning-rate schedules by name, and their settings as hyperparameters.

Every optimizer of ``torch.optim`` that steps without a closure and every loss of ``torch.nn`` that
takes ``(input, target)`` is here by its lower-case name (``Adadelta`` -> ``adadelta``,
``NLLLoss`` -> ``nll``, ``KLDivLoss`` -> ``kl_div``), found in torch itself so that a new torch
brings its new ones. Their scalar constructor arguments are settings: hyperparameters that default
to torch's own value (``None``: not passed) and apply only to the classes that take them. An
experiment adds its own optimizers and losses as factories (``Experiment(optimizers={name: f})``).
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .hyperparameter import Hyperparameter


def _snake(name: str) -> str:
    """``KLDiv`` -> ``kl_div``, ``BCEWithLogits`` -> ``bce_with_logits``, ``SmoothL1`` -> ``smooth_l1``."""
    name = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _init_args(cls) -> list[inspect.Parameter]:
    return list(inspect.signature(cls.__init__).parameters.values())[1:]


# torch.optim: the class name in lower case. LBFGS needs a closure to step, which a loop of plain
# train steps does not pass.
NEEDS_CLOSURE = ("LBFGS",)
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    name.lower(): cls for name, cls in sorted(vars(torch.optim).items())
    if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    and name not in NEEDS_CLOSURE}


def _takes_input_target(cls) -> bool:
    forward = [p for p in inspect.signature(cls.forward).parameters.values()][1:]
    required = [p for p in _init_args(cls) if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return len(forward) == 2 and not required


# torch.nn: the class name without "Loss", in snake case. Deprecated aliases are left out.
DEPRECATED_LOSSES = ("NLLLoss2d",)
LOSSES: dict[str, type[nn.Module]] = {
    _snake(name[:-len("Loss")]): cls for name, cls in sorted(vars(nn).items())
    if inspect.isclass(cls) and issubclass(cls, nn.modules.loss._Loss) and name.endswith("Loss")
    and name not in DEPRECATED_LOSSES and _takes_input_target(cls)}

# Optimizers that take the harness's momentum and weight_decay (harness.experiment.HARNESS_HYPERPARAMETERS).
WITH_MOMENTUM = tuple(name for name, cls in OPTIMIZERS.items() if "momentum" in inspect.signature(cls).parameters)
WITH_WEIGHT_DECAY = tuple(name for name, cls in OPTIMIZERS.items()
                          if "weight_decay" in inspect.signature(cls).parameters)

# Arguments that are not settings: the harness passes them itself (lr, weight_decay, momentum), they
# choose an implementation rather than a result (foreach, fused, capturable, differentiable), they
# would break the loop's sample-weighted means (reduction) or are tensors (weight, pos_weight).
NOT_SETTINGS = {"params", "lr", "weight_decay", "momentum", "foreach", "fused", "capturable", "differentiable",
                "maximize", "size_average", "reduce", "reduction", "weight", "pos_weight"}
# Default search ranges for the settings whose sensible range is known (a setting's range also bounds
# the values it takes, so these are wide where torch takes more).
RANGES: dict[str, dict[str, Any]] = {
    "beta1": {"low": 0.0, "high": 0.999}, "beta2": {"low": 0.9, "high": 0.99999},
    "eps": {"low": 1e-12, "high": 1e-2, "log": True}, "rho": {"low": 0.5, "high": 0.99},
    "dampening": {"low": 0.0, "high": 1.0}, "label_smoothing": {"low": 0.0, "high": 0.3},
    "lr_decay": {"low": 0.0, "high": 0.1}, "delta": {"low": 1e-3, "high": 1e3, "log": True},
    "beta": {"low": 1e-3, "high": 1e3, "log": True}, "gamma": {"low": 0.05, "high": 0.99},
    "step_size": {"low": 1, "high": 100}, "warmup_epochs": {"low": 1, "high": 50},
    "pct_start": {"low": 0.1, "high": 0.5}, "plateau_patience": {"low": 1, "high": 20},
}


def _setting(name: str, kind: str, default_types: set[type], holders: list[str], help: str) -> Hyperparameter:
    typ = "bool" if bool in default_types else "int" if default_types == {int} and name in INT_SETTINGS else "float"
    if name in STR_SETTINGS:
        typ = "str"
    return Hyperparameter(name, typ, None, **RANGES.get(name, {}), help=help, **{kind: tuple(holders)})


INT_SETTINGS = {"ignore_index", "p", "ns_steps", "step_size", "t_max", "warmup_epochs", "plateau_patience"}
STR_SETTINGS = {"milestones"}
LOSS_PREFIX = "loss_"  # a loss setting named like an optimizer's (eps) takes this prefix


def _collect(classes: Mapping[str, type], kind: str) -> dict[str, tuple[str, str, list[str], set[type]]]:
    """{setting: (torch argument, index in a tuple argument or "", holders, default types)}."""
    found: dict[str, tuple[str, str, list[str], set[type]]] = {}
    for holder, cls in classes.items():
        for arg in _init_args(cls):
            if arg.name in NOT_SETTINGS or arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD):
                continue
            default = arg.default
            if arg.name == "betas" and isinstance(default, tuple) and len(default) == 2:
                for i, part in enumerate(default):  # betas=(beta1, beta2): two searchable numbers
                    entry = found.setdefault(f"beta{i + 1}", ("betas", str(i), [], set()))
                    entry[2].append(holder)
                    entry[3].add(type(part))
                continue
            if isinstance(default, bool) or (isinstance(default, (int, float)) and math.isfinite(default)):
                entry = found.setdefault(arg.name, (arg.name, "", [], set()))
                entry[2].append(holder)
                entry[3].add(type(default))
    return found


_OPTIMIZER_ARGS = _collect(OPTIMIZERS, "optimizers")
_LOSS_ARGS = {(LOSS_PREFIX + name if name in _OPTIMIZER_ARGS else name): entry
              for name, entry in _collect(LOSSES, "losses").items()}

# ---- learning-rate schedules ----------------------------------------------------------------------
# Each is stepped as torch documents it: onecycle after every batch, the others after every epoch
# (plateau with the run's selection metric).
SCHEDULERS = ("none", "step", "multistep", "exponential", "cosine", "warmup_cosine", "onecycle", "plateau")
PER_BATCH = ("onecycle",)
_SCHEDULE_ARGS: dict[str, tuple[tuple[str, ...], str]] = {
    "step_size": (("step",), "epochs between two decays (default: a third of the epochs)"),
    "gamma": (("step", "multistep", "exponential", "plateau"),
              "the factor the lr is multiplied by at each decay (default: 0.1; exponential 0.95, per epoch)"),
    "milestones": (("multistep",), "epochs at which the lr decays, e.g. '30,60' (default: half and three quarters "
                                   "of the epochs)"),
    "t_max": (("cosine",), "epochs of the cosine's half period (default: the run's epochs)"),
    "eta_min": (("cosine", "warmup_cosine"), "the lr at the end of the cosine (default: 0)"),
    "warmup_epochs": (("warmup_cosine",), "epochs of linear warm-up from lr/(warmup_epochs+1) (default: a tenth)"),
    "pct_start": (("onecycle",), "share of the steps spent raising the lr to its peak, which is lr (default: 0.3)"),
    "plateau_patience": (("plateau",), "epochs without improvement of the selection metric before a decay "
                                       "(default: 10)"),
}
SETTINGS: tuple[Hyperparameter, ...] = (
    *(_setting(name, "optimizers", types, holders, f"{'/'.join(holders)}: torch's {arg}"
               + (f"[{index}]" if index else "")) for name, (arg, index, holders, types) in _OPTIMIZER_ARGS.items()),
    *(_setting(name, "losses", types, holders, f"{'/'.join(holders)} loss: torch's {arg}")
      for name, (arg, index, holders, types) in _LOSS_ARGS.items()),
    *(_setting(name, "schedulers", {int} if name in INT_SETTINGS else {float}, list(holders), help)
      for name, (holders, help) in _SCHEDULE_ARGS.items()),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)

Factory = Callable[..., Any]


def optimizer_names(own: Mapping[str, Factory] | None = None) -> tuple[str, ...]:
    return tuple(sorted({*OPTIMIZERS, *(own or {})}))


def loss_names(own: Mapping[str, Factory] | None = None) -> tuple[str, ...]:
    return tuple(sorted({*LOSSES, *(own or {})}))


def _arguments(table: dict, settings: Mapping[str, Any], holder: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, (arg, index, holders, _) in table.items():
        value = settings.get(name)
        if value is None or holder not in holders:
            continue
        if index:
            kwargs.setdefault(arg, list(inspect.signature(OPTIMIZERS[holder]).parameters[arg].default))
            kwargs[arg][int(index)] = value
        else:
            kwargs[arg] = value
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
                    settings: Mapping[str, Any] | None = None, own: Mapping[str, Factory] | None = None,
                    cfg=None) -> torch.optim.Optimizer:
    """``own[name](params, cfg)`` for an experiment's own optimizer; else torch's, with only the
    arguments that differ from its defaults: a config without them builds exactly the optimizer the
    reference builds."""
    if own and name in own:
        return own[name](params, cfg)
    kwargs = _arguments(_OPTIMIZER_ARGS, settings or {}, name)
    if weight_decay:
        kwargs["weight_decay"] = weight_decay
    if momentum:
        kwargs["momentum"] = momentum
    return OPTIMIZERS[name](params, lr=lr, **kwargs)


def build_loss(name: str, settings: Mapping[str, Any] | None = None, own: Mapping[str, Factory] | None = None,
               cfg=None) -> nn.Module:
    if own and name in own:
        return own[name](cfg)
    return LOSSES[name](**_arguments(_LOSS_ARGS, settings or {}, name))


def milestones(text: Any, epochs: int) -> list[int]:
    """``'30,60'`` (or a list) as increasing epochs in [1, epochs]; a ValueError names what is wrong."""
    parts = text if isinstance(text, (list, tuple)) else str(text).replace(",", " ").split()
    try:
        values = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"milestones must be epochs separated by commas, e.g. '30,60', got {text!r}") from None
    if not values or values != sorted(set(values)) or values[0] < 1:
        raise ValueError(f"milestones must be increasing epochs >= 1, e.g. '30,60', got {text!r}")
    return values


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, settings: Mapping[str, Any], epochs: int,
                    steps_per_epoch: int, own: Callable | None = None, cfg=None):
    """The schedule for a run of ``epochs`` epochs of ``steps_per_epoch`` steps; None for ``none``.
    ``own``: an experiment's ``make_scheduler(optimizer, cfg, steps_per_epoch)``, used for every name."""
    if own is not None and name != "none":
        return own(optimizer, cfg, steps_per_epoch)
    s = {k: v for k, v in settings.items() if v is not None}
    lr_s = torch.optim.lr_scheduler
    if name == "none":
        return None
    if name == "step":
        return lr_s.StepLR(optimizer, s.get("step_size", max(1, epochs // 3)), s.get("gamma", 0.1))
    if name == "multistep":
        marks = milestones(s["milestones"], epochs) if "milestones" in s else [max(1, epochs // 2),
                                                                               max(2, 3 * epochs // 4)]
        return lr_s.MultiStepLR(optimizer, marks, s.get("gamma", 0.1))
    if name == "exponential":
        return lr_s.ExponentialLR(optimizer, s.get("gamma", 0.95))
    if name == "cosine":
        return lr_s.CosineAnnealingLR(optimizer, s.get("t_max", epochs), s.get("eta_min", 0.0))
    if name == "warmup_cosine":
        return lr_s.LambdaLR(optimizer, _WarmupCosine(optimizer.defaults["lr"], epochs,
                                                      s.get("warmup_epochs", max(1, epochs // 10)),
                                                      s.get("eta_min", 0.0)))
    if name == "onecycle":
        return lr_s.OneCycleLR(optimizer, max_lr=optimizer.defaults["lr"], total_steps=epochs * steps_per_epoch,
                               pct_start=s.get("pct_start", 0.3))
    if name == "plateau":
        return lr_s.ReduceLROnPlateau(optimizer, factor=s.get("gamma", 0.1), patience=s.get("plateau_patience", 10))
    raise ValueError(f"unknown scheduler {name!r}")


class _WarmupCosine:
    """The lr factor at an epoch: linear from 1/(w+1) to 1 over the ``warmup`` epochs, then a cosine
    down to ``eta_min`` at the last epoch. A class, not a closure: LambdaLR's state_dict keeps it."""

    def __init__(self, lr: float, epochs: int, warmup: int, eta_min: float):
        self.floor, self.epochs, self.warmup = eta_min / lr, epochs, warmup

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        span = max(1, self.epochs - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(epoch - self.warmup, span) / span))
