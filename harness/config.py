"""One typed run config, resolved from defaults < experiment < file < command line, validated here."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from . import devices
from .errors import UsageError
from .experiment import Experiment, load


@dataclass(frozen=True)
class TrainConfig:
    experiment: str = "linear_regression"
    optimizer: str = "sgd"
    loss: str = "l1"
    lr: float = 0.01
    epochs: int = 200
    seed: int = 42
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = tuple(f.name for f in fields(TrainConfig))


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping; JSON is YAML, so one parser reads both."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        loaded = yaml.safe_load(text) if path.suffix != ".json" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"config file {str(path)!r} is not valid YAML/JSON: {first}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def resolve(overrides: Mapping[str, Any] | None = None, file: str | Path | None = None,
            experiment: Experiment | None = None) -> tuple[TrainConfig, Experiment]:
    """Merge the layers, then validate once. Values of None in ``overrides`` mean "not given"."""
    layers = [read_file(file) if file else {}, {k: v for k, v in (overrides or {}).items() if v is not None}]
    for layer, origin in zip(layers, (f"config file {str(file)!r}", "overrides")):
        unknown = sorted(set(layer) - set(FIELDS))
        if unknown:
            raise UsageError(f"unknown config key {unknown[0]!r} in {origin}; allowed: {', '.join(FIELDS)}")
    name = layers[1].get("experiment", layers[0].get("experiment", TrainConfig.experiment))
    if experiment is None or experiment.name != name:
        experiment = load(str(name))
    merged: dict[str, Any] = {**TrainConfig().to_dict(), **experiment.defaults, **layers[0], **layers[1]}
    merged["experiment"] = experiment.name if "." not in str(name) else str(name)
    return validate(TrainConfig(**merged), experiment), experiment


def validate(cfg: TrainConfig, experiment: Experiment) -> TrainConfig:
    """Every rule a config must obey, in one place. Returns the config with types made exact."""
    lr = positive_float("lr", cfg.lr)
    epochs = positive_int("epochs", cfg.epochs)
    seed = nonnegative_int("seed", cfg.seed)
    one_of("optimizer", cfg.optimizer, experiment.optimizers)
    one_of("loss", cfg.loss, experiment.losses)
    one_of("device", cfg.device, devices.CHOICES)
    device = devices.resolve(cfg.device)
    if not device:
        raise UsageError(f"device {cfg.device!r} is not available on this machine; "
                         f"allowed here: auto, {', '.join(devices.available())}")
    return replace(cfg, lr=lr, epochs=epochs, seed=seed, device=device)


def one_of(name: str, value: Any, allowed) -> str:
    if value not in allowed:
        raise UsageError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


def positive_float(name: str, value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"{name} must be a positive number, got {value!r}")
    return number


def positive_int(name: str, value: Any) -> int:
    return _int(name, value, minimum=1)


def nonnegative_int(name: str, value: Any) -> int:
    return _int(name, value, minimum=0)


def _int(name: str, value: Any, minimum: int) -> int:
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value)
    if number is None or number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UsageError(f"{name} must be {kind}, got {value!r}")
    return number
