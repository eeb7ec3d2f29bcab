"""The search space: lr (log-uniform), epochs (integer) and ONE categorical over allowed optimizer+loss pairs.

Pairs are a single categorical so that only listed combinations are ever sampled; each run still
gets separate ``optimizer`` and ``loss`` params.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..config import positive_float, positive_int, read_file
from ..errors import UsageError
from ..experiment import Experiment

PAIR_PARAM = "optimizer_loss"
DEFAULT = {"lr": (1e-4, 1e-1), "epochs": (50, 400), "grid_points": 4}
KEYS = ("lr", "epochs", "pairs", "grid_points")


@dataclass(frozen=True)
class SearchSpace:
    lr: tuple[float, float]
    epochs: tuple[int, int]
    pairs: tuple[str, ...]
    grid_points: int = 4  # values per numeric axis when the grid sampler is used

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def grid(self) -> dict[str, list]:
        """A finite grid over the space, for optuna's GridSampler."""
        n = self.grid_points
        lo, hi = self.lr
        lrs = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if n > 1 else [lo]
        elo, ehi = self.epochs
        epochs = sorted({round(elo + (ehi - elo) * i / (n - 1)) for i in range(n)}) if n > 1 else [elo]
        return {"lr": lrs, "epochs": epochs, PAIR_PARAM: list(self.pairs)}


def sample(trial, space: SearchSpace) -> dict[str, Any]:
    """Draw one config from the space. Works with any optuna trial, including FixedTrial."""
    lr = trial.suggest_float("lr", *space.lr, log=True)
    epochs = trial.suggest_int("epochs", *space.epochs)
    optimizer, loss = trial.suggest_categorical(PAIR_PARAM, space.pairs).split("+")
    return {"lr": lr, "epochs": epochs, "optimizer": optimizer, "loss": loss}


def resolve(experiment: Experiment, file: str | None = None,
            overrides: Mapping[str, Any] | None = None) -> SearchSpace:
    """Defaults < the experiment's space < a YAML/JSON file < command-line values; then validated."""
    layers = [dict(DEFAULT), dict(experiment.search_space)]
    origins = ["defaults", f"experiment {experiment.name!r}"]
    if file:
        layers.append(read_file(file))
        origins.append(f"space file {file!r}")
    layers.append({k: v for k, v in (overrides or {}).items() if v is not None})
    origins.append("command line")
    merged: dict[str, Any] = {}
    for layer, origin in zip(layers, origins):
        unknown = sorted(set(layer) - set(KEYS))
        if unknown:
            raise UsageError(f"unknown search-space key {unknown[0]!r} in {origin}; allowed: {', '.join(KEYS)}")
        merged.update(layer)
    return validate(merged, experiment)


def validate(raw: Mapping[str, Any], experiment: Experiment) -> SearchSpace:
    lr_low, lr_high = _range("lr", raw.get("lr"), positive_float)
    ep_low, ep_high = _range("epochs", raw.get("epochs"), positive_int)
    pairs = raw.get("pairs")
    if isinstance(pairs, str):
        pairs = [p for p in pairs.replace(",", " ").split() if p]
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise UsageError(f"search space needs a non-empty list of optimizer+loss pairs, got {pairs!r}")
    for pair in pairs:
        parts = str(pair).split("+")
        if len(parts) != 2:
            raise UsageError(f"pair {pair!r} must be written optimizer+loss, e.g. sgd+l1")
        if parts[0] not in experiment.optimizers:
            raise UsageError(f"unknown optimizer {parts[0]!r} in pair {pair!r}; "
                             f"allowed: {', '.join(experiment.optimizers)}")
        if parts[1] not in experiment.losses:
            raise UsageError(f"unknown loss {parts[1]!r} in pair {pair!r}; allowed: {', '.join(experiment.losses)}")
    if len(set(pairs)) != len(pairs):
        raise UsageError(f"pairs must be listed once each, got {list(pairs)!r}")
    grid_points = positive_int("grid_points", raw.get("grid_points", 4))
    return SearchSpace((lr_low, lr_high), (ep_low, ep_high), tuple(map(str, pairs)), grid_points)


def _range(name: str, value: Any, convert) -> tuple:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise UsageError(f"search-space {name} must be a [low, high] pair, got {value!r}")
    low, high = (convert(f"{name} bound", v) for v in value)
    if not low < high:
        raise UsageError(f"search-space {name} needs low < high, got low={low!r} high={high!r}")
    return low, high
