"""The search space: lr (log-uniform), epochs (integer), ONE categorical over allowed optimizer+loss
pairs, and any declared hyperparameter given a range or choices.

Pairs are a single categorical so that only listed combinations are ever sampled; each run still
gets separate ``optimizer`` and ``loss`` params. A hyperparameter that names its optimizers (the
harness's ``momentum``: sgd, rmsprop) is sampled only in trials of those optimizers.

In a space file (or ``--tune NAME=VALUE``, VALUE in YAML) a hyperparameter is one of:
``true`` (its declared default range), ``[low, high]`` (a numeric range, log/step as declared),
a list of three or more values or any list for a categorical/bool (choices),
``{low: .., high: .., log: .., step: .., optimizers: [..]}`` or ``{choices: [..]}``;
``false`` leaves it out (to drop one from the experiment's default space).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..config import check_value, epochs_value, positive_float, positive_int, read_file
from ..errors import UsageError, did_you_mean
from ..schema import PAIR_TRIAL_PARAM
from ..experiment import Experiment, Hyperparameter

DEFAULT = {"lr": (1e-4, 1e-1), "epochs": (50, 400), "grid_points": 4}
KEYS = ("lr", "epochs", "pairs", "grid_points")
RANGE_KEYS = ("low", "high", "log", "step", "choices", "optimizers")
MAX_GRID_POINTS = 100
MAX_GRID_SIZE = 1_000_000  # Optuna's GridSampler holds every combination in memory


# A searched hyperparameter is its declaration with the range the space gives it: a Hyperparameter
# whose low/high (log, step) or choices, and optimizers, are those of the search.

def range_dict(param: Hyperparameter) -> dict[str, Any]:
    """A searched hyperparameter as a space file writes it."""
    out: dict[str, Any] = {"choices": list(param.choices)} if param.choices is not None else {
        "low": param.low, "high": param.high, "log": param.log}
    if param.step is not None and param.choices is None:
        out["step"] = param.step
    if param.optimizers is not None:
        out["optimizers"] = list(param.optimizers)
    return out


def suggest(trial, param: Hyperparameter) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(param.name, param.choices)
    if param.type == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high), step=int(param.step or 1),
                                 log=param.log)
    return trial.suggest_float(param.name, param.low, param.high, step=param.step, log=param.log)


def grid_values(param: Hyperparameter, n: int) -> list:
    if param.choices is not None:
        return list(param.choices)
    if n == 1:
        return [param.low]
    if param.log:
        points = [param.low * (param.high / param.low) ** (i / (n - 1)) for i in range(n)]
    else:
        points = [param.low + (param.high - param.low) * i / (n - 1) for i in range(n)]
    return sorted({round(p) for p in points}) if param.type == "int" else points


@dataclass(frozen=True)
class SearchSpace:
    lr: tuple[float, float]
    epochs: tuple[int, int]
    pairs: tuple[str, ...]
    grid_points: int = 4  # values per numeric axis when the grid sampler is used
    params: tuple[Hyperparameter, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A space file's content (so studies created before hyperparameters compare equal)."""
        out: dict[str, Any] = {"lr": list(self.lr), "epochs": list(self.epochs), "pairs": list(self.pairs),
                               "grid_points": self.grid_points}
        out.update({p.name: range_dict(p) for p in self.params})
        return out

    def grid(self) -> dict[str, list]:
        """A finite grid over the space, for optuna's GridSampler."""
        n = self.grid_points
        lr = Hyperparameter("lr", "float", None, *self.lr, log=True)
        epochs = Hyperparameter("epochs", "int", None, *self.epochs)
        grid = {"lr": grid_values(lr, n), "epochs": grid_values(epochs, n), PAIR_TRIAL_PARAM: list(self.pairs)}
        grid.update({p.name: grid_values(p, n) for p in self.params})
        size = math.prod(len(values) for values in grid.values())
        if size > MAX_GRID_SIZE:
            raise UsageError(f"the grid over this space has {size} points; at most {MAX_GRID_SIZE} allowed "
                             "(lower grid_points, or search fewer hyperparameters)")
        return grid


REPORTS_PER_TRIAL = 20


def report_cadence(space: SearchSpace) -> int:
    """Epochs between the reports a pruner sees: about 20 in the longest trial the space allows.

    One cadence for the whole study, not one per trial: a pruner compares trials at equal steps.
    benchmarks/pruning_cadence.py measured every epoch at 1.9x (journal) and 17x (SQLite) an
    in-memory search; this rule at 0.89x and 2.0x, with the same best trial and 3% more epochs
    trained (most pruning happens at the first report, epoch 0)."""
    return max(1, space.epochs[1] // REPORTS_PER_TRIAL)


def sample(trial, space: SearchSpace, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Draw one config from the space. Works with any optuna trial, including FixedTrial.
    A setting is drawn only where it applies to the trial's optimizer, loss and schedule (the
    schedule drawn before it, or ``base``'s when the space does not search one)."""
    lr = trial.suggest_float("lr", *space.lr, log=True)
    epochs = trial.suggest_int("epochs", *space.epochs)
    optimizer, loss = trial.suggest_categorical(PAIR_TRIAL_PARAM, space.pairs).split("+")
    values = {"lr": lr, "epochs": epochs, "optimizer": optimizer, "loss": loss}
    chosen = {"scheduler": (base or {}).get("scheduler", "none"), **values}
    for param in space.params:
        if param.applies(chosen):
            values[param.name] = suggest(trial, param)
            if param.name in chosen:
                chosen[param.name] = values[param.name]
    return values


def logged_params(params: Mapping[str, Any]) -> dict[str, str]:
    """A trial's sampled values as its run logs them: the pair as optimizer and loss."""
    logged = {k: str(v) for k, v in params.items() if k != PAIR_TRIAL_PARAM}
    if PAIR_TRIAL_PARAM in params:
        logged["optimizer"], logged["loss"] = str(params[PAIR_TRIAL_PARAM]).split("+", 1)
    return logged


def resolve(experiment: Experiment, file: str | None = None, overrides: Mapping[str, Any] | None = None,
            n_train: int | None = None) -> SearchSpace:
    """Defaults < the experiment's space < a YAML/JSON file < command-line values; then validated.

    ``n_train`` (the training set's size) bounds a ``batch_size`` range.
    """
    # Without pairs of its own, an experiment searches each optimizer it lists with each loss it lists.
    layers = [{**DEFAULT, "pairs": experiment.default_pairs()}, dict(experiment.search_space)]
    origins = ["defaults", f"experiment {experiment.name!r}"]
    if file:
        layers.append(read_file(file, "space file"))
        origins.append(f"space file {file!r}")
    layers.append({k: v for k, v in (overrides or {}).items() if v is not None})
    origins.append("command line")
    allowed = KEYS + tuple(h.name for h in experiment.all_hyperparameters())
    merged: dict[str, Any] = {}
    explicit = {k for layer in layers[2:] for k in layer}  # named by the user, not by a default
    for layer, origin in zip(layers, origins):
        unknown = sorted(set(layer) - set(allowed))
        if unknown:
            raise UsageError(f"unknown search-space key {unknown[0]!r} in {origin}; allowed: {', '.join(allowed)}"
                             f"{did_you_mean(unknown[0], allowed)}")
        merged.update(layer)
    return validate(merged, experiment, n_train, explicit)


def validate(raw: Mapping[str, Any], experiment: Experiment, n_train: int | None = None,
             explicit=frozenset()) -> SearchSpace:
    """``explicit``: the keys the user gave; a hyperparameter of the experiment's default space that
    applies to none of the pairs is left out, one the user asked for is refused."""
    lr_low, lr_high = _range("lr", raw.get("lr"), positive_float)
    ep_low, ep_high = _range("epochs", raw.get("epochs"), epochs_value)
    pairs = raw.get("pairs")
    if isinstance(pairs, str):
        pairs = [p for p in pairs.replace(",", " ").split() if p]
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise UsageError(f"search space needs a non-empty list of optimizer+loss pairs, got {pairs!r}")
    for pair in pairs:
        parts = str(pair).split("+")
        if len(parts) != 2:
            raise UsageError(f"pair {pair!r} must be written optimizer+loss, e.g. sgd+l1")
        for kind, part, allowed in (("optimizer", parts[0], experiment.optimizer_names()),
                                    ("loss", parts[1], experiment.loss_names())):
            if part not in allowed:
                raise UsageError(f"unknown {kind} {part!r} in pair {pair!r}; allowed: {', '.join(allowed)}"
                                 f"{did_you_mean(part, allowed)}")
    if len(set(pairs)) != len(pairs):
        raise UsageError(f"pairs must be listed once each, got {list(pairs)!r}")
    grid_points = positive_int("grid_points", raw.get("grid_points", 4))
    if grid_points > MAX_GRID_POINTS:
        raise UsageError(f"grid_points must be at most {MAX_GRID_POINTS}, got {grid_points}")
    params = []
    for hp in experiment.all_hyperparameters():
        value = raw.get(hp.name)
        if value is None or value is False:
            continue
        params.append(param_range(hp, value, experiment, n_train))
    in_pairs = {"optimizers": {str(p).split("+")[0] for p in pairs}, "losses": {str(p).split("+")[1] for p in pairs}}
    kept = []
    for param in params:
        for kind, found in in_pairs.items():
            limit = getattr(param, kind)
            if limit is None:
                continue
            if found <= set(limit):  # it applies to every pair of this space: no limit to show
                param = replace(param, **{kind: None})
            elif not found & set(limit):
                if param.name in explicit:
                    raise UsageError(f"search-space {param.name} applies to {kind} {', '.join(limit)}, "
                                     f"none of which is in the pairs {', '.join(map(str, pairs))}")
                param = None  # a default's setting for none of these pairs: left out
                break
        if param is not None:
            kept.append(param)
    params = kept
    return SearchSpace((lr_low, lr_high), (ep_low, ep_high), tuple(map(str, pairs)), grid_points, tuple(params))


def param_range(hp: Hyperparameter, value: Any, experiment: Experiment, n_train: int | None) -> Hyperparameter:
    """A hyperparameter's search range from a space entry; every bound and choice checked as a value."""
    name = hp.name
    if value is True or value == "default":
        if not hp.has_range:
            raise UsageError(f"search-space {name} has no declared default range; give one, e.g. "
                             f"{name}: [low, high] or {name}: {{choices: [a, b, c]}}")
        spec: dict[str, Any] = ({"choices": list(hp.choices)} if hp.choices is not None
                                else {"low": hp.low, "high": hp.high})
    elif isinstance(value, (list, tuple)):
        numeric = hp.type in ("int", "float") and hp.choices is None
        spec = {"low": value[0], "high": value[1]} if numeric and len(value) == 2 else {"choices": list(value)}
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(RANGE_KEYS))
        if unknown:
            raise UsageError(f"search-space {name}: unknown key {unknown[0]!r}; allowed: {', '.join(RANGE_KEYS)}")
        spec = dict(value)
    else:
        raise UsageError(f"search-space {name} must be true, [low, high], a list of choices or a mapping "
                         f"({', '.join(RANGE_KEYS)}), got {value!r}")
    optimizers = spec.get("optimizers")
    if optimizers is None and hp.optimizers is not None:  # the declared ones
        optimizers = hp.optimizers
    if optimizers is not None:
        if not isinstance(optimizers, (list, tuple)) or not optimizers:
            raise UsageError(f"search-space {name}: optimizers must be a non-empty list, got {optimizers!r}")
        bad = [o for o in optimizers if o not in experiment.optimizer_names() or not hp.applies_to(o)]
        if bad:
            allowed = [o for o in experiment.optimizer_names() if hp.applies_to(o)]
            raise UsageError(f"search-space {name}: unknown optimizer {bad[0]!r}; allowed: {', '.join(allowed)}")
        optimizers = tuple(optimizers)
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            raise UsageError(f"search-space {name}: choices must be a non-empty list, got {choices!r}")
        checked = tuple(check_value(name, c, experiment, n_train) for c in choices)
        if any(c is None for c in checked):
            raise UsageError(f"search-space {name}: choices must be values, got {list(choices)!r}")
        if len(set(checked)) != len(checked):
            raise UsageError(f"search-space {name}: choices must be listed once each, got {list(choices)!r}")
        return replace(hp, low=None, high=None, log=False, step=None, choices=checked, optimizers=optimizers)
    if hp.type in ("categorical", "bool"):
        raise UsageError(f"search-space {name} is {hp.type}: give choices, e.g. {name}: [a, b]")
    if "low" not in spec or "high" not in spec:
        raise UsageError(f"search-space {name} needs low and high, got {value!r}")
    low, high = (check_value(name, spec[k], experiment, n_train) for k in ("low", "high"))
    if low is None or high is None or not low < high:
        raise UsageError(f"search-space {name} needs low < high, got low={spec['low']!r} high={spec['high']!r}")
    log = spec.get("log", hp.log if value is True or value == "default" or isinstance(value, (list, tuple))
                   else False)
    if not isinstance(log, bool):
        raise UsageError(f"search-space {name}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise UsageError(f"search-space {name}: a log range needs low > 0, got low={low!r}")
    step = spec.get("step", hp.step)
    if step is not None:
        step = positive_int(f"{name} step", step) if hp.type == "int" else positive_float(f"{name} step", step)
        if log:
            raise UsageError(f"search-space {name}: step and log cannot be combined (Optuna samples either)")
    return replace(hp, low=low, high=high, log=log, step=step, choices=None, optimizers=optimizers)


def _range(name: str, value: Any, convert) -> tuple:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise UsageError(f"search-space {name} must be a [low, high] pair, got {value!r}")
    low, high = (convert(f"{name} bound", v) for v in value)
    if not low < high:
        raise UsageError(f"search-space {name} needs low < high, got low={low!r} high={high!r}")
    return low, high
