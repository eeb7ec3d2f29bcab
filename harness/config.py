"""One typed run config, resolved from defaults < experiment < file < command line, validated here.

The config is flat to everything outside this module (a file, ``--set``, MLflow params,
``config.json``): the harness's own keys and the experiment's hyperparameters side by side.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from . import devices
from .errors import UsageError, did_you_mean, first_line
from . import registry
from .experiment import CONFIG_KEYS, HARNESS_NAMES, Experiment, Hyperparameter, load

MAX_CONFIG_BYTES = 1 << 20
# What a config, a space or a --tune range may expand to through YAML aliases (what is written is
# bounded by MAX_CONFIG_BYTES already): a 300-byte alias bomb expands to 10^8 values.
MAX_YAML_NODES = 100_000
INT_LIMIT = 2 ** 63 - 1  # what torch and numpy take as an integer
MAX_EPOCHS = 10_000_000  # per-epoch buffers are allocated up front


@dataclass(frozen=True)
class TrainConfig:
    experiment: str = "linear_regression"
    optimizer: str = "sgd"
    loss: str = "l1"
    lr: float = 0.01
    epochs: int = 200
    seed: int = 42
    device: str = "auto"
    batch_size: int | None = None  # None: the whole training set in one step (the reference)
    weight_decay: float = 0.0
    momentum: float = 0.0
    scheduler: str = "none"  # see harness.registry.SCHEDULERS
    grad_clip_norm: float | None = None
    grad_clip_value: float | None = None
    patience: int | None = None  # early stopping on the selection metric; None: off
    min_delta: float = 0.0
    # The share of the training data held out for validation when the experiment gives no
    # validation part; None: none for `harness train`, DEFAULT_VALID_FRACTION for a search.
    valid_fraction: float | None = None
    # The metric the run is selected on: early stopping and a plateau schedule watch it, and a
    # search's trial returns it. None: valid_loss where the run has validation data, else train_loss.
    # Never a test metric: what selects a run must not be what reports on it.
    objective: str | None = None
    direction: str = "minimize"
    # The settings of torch's optimizer, loss and schedule that are set (harness.registry.SETTINGS);
    # one that is not set is torch's default.
    settings: Mapping[str, Any] = field(default_factory=dict)
    # The experiment's own hyperparameters, by name (see Experiment.hyperparameters).
    hparams: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat: the harness's keys, the settings that are set, then the experiment's hyperparameters."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("settings", "hparams")}
        return {**flat, **{k: v for k, v in self.settings.items() if v is not None}, **self.hparams}

    def chosen(self) -> dict[str, str]:
        """What decides which settings apply (Hyperparameter.applies)."""
        return {"optimizer": self.optimizer, "loss": self.loss, "scheduler": self.scheduler}


FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name not in ("settings", "hparams"))
assert set(CONFIG_KEYS) <= set(FIELDS) and set(HARNESS_NAMES) <= set(FIELDS)
DEFAULT_VALID_FRACTION = 0.2  # a search of an experiment without a validation part holds this much out
MAX_VALID_FRACTION = 0.9


def read_file(path: str | Path, kind: str = "config file") -> dict[str, Any]:
    """A YAML or JSON mapping of names; JSON is YAML, so one parser reads both."""
    path = Path(path)
    shown = f"{kind} {str(path)!r}"
    try:
        if not path.is_file():
            raise UsageError(f"{shown} is not a regular file" if path.exists()
                             else f"cannot read {shown}: No such file or directory")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UsageError(f"{shown} is larger than {MAX_CONFIG_BYTES} bytes")
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {shown}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{shown} is not UTF-8 text") from None
    loaded = parse_yaml(text, shown, json_only=path.suffix == ".json")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{shown} must hold a mapping, got {type(loaded).__name__}")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise UsageError(f"{shown}: keys must be names, got {bad[0]!r}")
    return loaded


def parse_yaml(text: str, shown: str, json_only: bool = False) -> Any:
    """YAML (or JSON) text, or a UsageError naming ``shown``: bad syntax, integers too long to convert,
    nesting too deep to read all end as one line."""
    import yaml

    try:
        if json_only:
            return json.loads(text, object_pairs_hook=_unique_keys)
        # libyaml's parser where PyYAML was built with it: a 50,000-key file in a third of the time.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            counted: dict[int, int] = {}
            nodes = _expanded_nodes(node, counted)
            if nodes > MAX_YAML_NODES and nodes > len(counted):  # grown by aliases, not by what is written
                raise UsageError(f"{shown} expands to {nodes} values through its aliases (*name); "
                                 f"at most {MAX_YAML_NODES} allowed")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except UsageError:
        raise
    except (yaml.YAMLError, RecursionError, ValueError) as exc:  # ValueError: JSONDecodeError, too long an int
        first = first_line(exc, 200)
        raise UsageError(f"{shown} is not valid YAML/JSON: {first}") from None


def _given_twice(keys: list):
    """The first key of ``keys`` that an earlier one repeats, or None: YAML and JSON keep the last."""
    seen = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


def _unique_keys(pairs: list) -> dict:
    twice = _given_twice([key for key, _ in pairs])
    if twice is not None:
        raise ValueError(f"key {twice!r} is given twice")
    return dict(pairs)


def _expanded_nodes(node, counted: dict[int, int]) -> int:
    """How many values ``node`` becomes once every alias is expanded; each node is counted once (an
    alias is the same node object), so a 300-byte alias bomb is measured without being built."""
    import yaml

    if id(node) not in counted:
        counted[id(node)] = 0  # an alias of a node inside itself: counted as one
        if isinstance(node, yaml.MappingNode):  # PyYAML keeps the last of two equal keys, silently
            if any(key.tag == "tag:yaml.org,2002:merge" for key, _ in node.value):
                # A merged key beside one of the same name is dropped silently, whichever is meant.
                raise yaml.constructor.ConstructorError(None, None, "a YAML merge key (<<) is not taken: give each "
                                                        "key once", node.start_mark)
            twice = _given_twice([key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)])
            if twice is not None:
                raise yaml.constructor.ConstructorError(None, None, f"key {twice!r} is given twice", node.start_mark)
        children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        counted[id(node)] = 1 + sum(_expanded_nodes(child, counted) for child in children)
    return counted[id(node)]


def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """``--set NAME=VALUE`` flags as a mapping; values stay strings and are typed by validation."""
    values: dict[str, Any] = {}
    for pair in pairs or ():
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--set takes NAME=VALUE, got {pair!r}")
        if name.strip() == "experiment":
            raise UsageError("--set experiment=... is not taken: name the experiment with --experiment")
        values[name.strip()] = value.strip()
    return values


def with_flags(sets: Mapping[str, Any], named: Mapping[str, Any]) -> dict[str, Any]:
    """``--set`` values, overridden by the named flags that were given (an unset flag is None)."""
    return {**sets, **{k: v for k, v in named.items() if v is not None}}


def allowed_keys(experiment: Experiment) -> tuple[str, ...]:
    return FIELDS + tuple(h.name for h in experiment.all_hyperparameters() if h.name not in FIELDS)


def check_keys(keys, experiment: Experiment, origin: str) -> None:
    allowed = allowed_keys(experiment)
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise UsageError(f"unknown config key {unknown[0]!r} in {origin}; allowed: {', '.join(allowed)}"
                         f"{did_you_mean(str(unknown[0]).lower(), allowed)}")


def resolve(overrides: Mapping[str, Any] | None = None, file: str | Path | None = None,
            experiment: Experiment | None = None, n_train: int | None = None) -> tuple[TrainConfig, Experiment]:
    """Merge the layers, then validate once. Values of None in ``overrides`` mean "not given"."""
    layers = [read_file(file) if file else {}, {k: v for k, v in (overrides or {}).items() if v is not None}]
    given = layers[1].get("experiment", layers[0].get("experiment"))
    if given is None:
        experiment = experiment or load(TrainConfig.experiment)
    elif experiment is None or str(given) not in (experiment.reference, experiment.name):
        experiment = load(str(given))
    for layer, origin in zip(layers, (f"config file {str(file)!r}", "overrides")):
        check_keys(layer, experiment, origin)
    check_keys(experiment.defaults, experiment, f"experiment {experiment.name!r}'s defaults")
    declared = {h.name: h.default for h in experiment.hyperparameters}
    merged: dict[str, Any] = {**TrainConfig().to_dict(), **declared, **experiment.defaults, **layers[0], **layers[1]}
    merged["experiment"] = experiment.reference or experiment.name
    # A default of the experiment's that suits some optimizers only (momentum) is applied where it
    # applies; given in a file or on the command line, it is checked (and refused where it does not).
    given = set(layers[0]) | set(layers[1])
    inapplicable(merged, experiment, keep=given)
    return validate(build(merged, {h.name for h in experiment.hyperparameters}), experiment, n_train), experiment


def inapplicable(flat: dict[str, Any], experiment: Experiment, keep=frozenset()) -> None:
    """Reset (in place) the values of ``flat`` that do not apply to its optimizer, loss and schedule,
    except those named in ``keep``."""
    chosen = {key: flat.get(key) for key in ("optimizer", "loss", "scheduler")}
    for hp in experiment.all_hyperparameters():
        if hp.name in flat and hp.name not in keep and hp.limits() and not hp.applies(chosen):
            flat[hp.name] = hp.default


def build(flat: Mapping[str, Any], own=frozenset()) -> TrainConfig:
    """A TrainConfig from a flat mapping (unvalidated): keys that are not fields are torch's settings
    (harness.registry) or the experiment's hyperparameters (``own``, which win over a setting of
    the same name)."""
    settings = {k: v for k, v in flat.items() if k in registry.SETTING_NAMES and k not in own}
    return TrainConfig(**{k: v for k, v in flat.items() if k in FIELDS}, settings=settings,
                       hparams={k: v for k, v in flat.items() if k not in FIELDS and k not in settings})


def with_values(cfg: TrainConfig, values: Mapping[str, Any], experiment: Experiment | None = None) -> TrainConfig:
    """``cfg`` with some flat values replaced (e.g. those a trial sampled); validate it afterwards.
    With ``experiment``, the values of ``cfg`` that do not apply to the new optimizer, loss or
    schedule are reset (a trial of adam does not inherit sgd's momentum)."""
    flat = {**cfg.to_dict(), **values}
    if experiment is not None:
        inapplicable(flat, experiment, keep=set(values))
    return build(flat, set(cfg.hparams))


def validate(cfg: TrainConfig, experiment: Experiment, n_train: int | None = None) -> TrainConfig:
    """Every rule a config must obey, in one place. Returns the config with types made exact.

    ``n_train`` (the training set's size, when the caller has the data) bounds ``batch_size``.
    """
    lr = positive_float("lr", cfg.lr)
    epochs = epochs_value("epochs", cfg.epochs)
    seed = nonnegative_int("seed", cfg.seed)
    if str(cfg.optimizer).upper() in registry.NEEDS_CLOSURE and cfg.optimizer not in experiment.own_optimizers:
        raise UsageError(f"optimizer {cfg.optimizer!r} steps with a closure, which a loop of train steps does not "
                         f"pass; allowed: {', '.join(experiment.optimizer_names())}")
    one_of("optimizer", cfg.optimizer, experiment.optimizer_names())
    one_of("loss", cfg.loss, experiment.loss_names())
    one_of("device", cfg.device, devices.CHOICES)
    device = devices.resolve(cfg.device)
    if not device:
        raise UsageError(f"device {cfg.device!r} is not available on this machine; "
                         f"allowed here: auto, {', '.join(devices.available())}")
    harness = {name: check_value(name, getattr(cfg, name), experiment, n_train) for name in HARNESS_NAMES}
    valid_fraction = None if cfg.valid_fraction in UNSET else \
        float_in("valid_fraction", cfg.valid_fraction, 0.0, MAX_VALID_FRACTION)
    objective = None if cfg.objective in UNSET else selection_metric_name(cfg.objective)
    direction = one_of("direction", cfg.direction, DIRECTIONS)
    check_keys(cfg.hparams, experiment, "the config")
    check_keys(cfg.settings, experiment, "the config")
    chosen = cfg.chosen()
    settings = {}
    for hp in experiment.all_hyperparameters():
        given = harness[hp.name] if hp.name in harness else cfg.settings.get(hp.name)
        if hp.name in cfg.hparams or given is None or given == hp.default:
            continue
        if hp.name not in harness:
            given = settings[hp.name] = hyperparameter_value(hp, given)
        _check_applies(hp, given, chosen)
    hparams = {}
    for hp in experiment.hyperparameters:
        value = hyperparameter_value(hp, cfg.hparams.get(hp.name, hp.default))
        if value != hp.default:
            _check_applies(hp, value, chosen)
        hparams[hp.name] = value
    if objective is not None and not per_epoch(objective):
        watcher = ("patience", harness["patience"]) if harness["patience"] is not None else \
            ("scheduler", "plateau") if harness["scheduler"] == "plateau" else None
        if watcher:
            raise UsageError(f"{watcher[0]} {watcher[1]} with objective {objective!r}, a final value: it watches the "
                             "selection metric every epoch; select on a per-epoch one (valid_loss, ...) or drop it")
    checked = replace(cfg, lr=lr, epochs=epochs, seed=seed, device=device, valid_fraction=valid_fraction,
                      objective=objective, direction=direction, settings=settings, hparams=hparams, **harness)
    _torch_accepts(checked, experiment)
    return checked


def _check_applies(hp: Hyperparameter, value: Any, chosen: Mapping[str, Any]) -> None:
    """A value set for ``hp`` where the config's optimizer, loss or schedule does not take it: refused."""
    if not hp.applies(chosen):
        which = next(k for k, allowed in hp.limits().items() if chosen[k] not in allowed)
        raise UsageError(f"{hp.name} applies to {hp.scope()} only, got {hp.name}={value!r} with {which} "
                         f"{chosen[which]!r}")


UNSET = (None, "", "none", "None")  # what a file, --set or MLproject's "" give for "not set"


DIRECTIONS = ("minimize", "maximize")
SELECTABLE = ("valid_", "train_")


def selection_metric_name(name: Any, flag: str = "objective") -> str:
    """A metric a run may be selected on: a per-epoch value on its validation or training data
    (``valid_accuracy``), or a final value the experiment reads off the trained model (one of its
    ``scalars``, such as ``weight_error``), which the pre-flight step checks it logs. A test value
    is refused: the test data must stay out of every choice it reports on."""
    text = str(name).strip()
    if text.startswith("test_") or text.startswith("final_test_"):
        raise UsageError(f"{flag} {text!r} is a test metric: runs are selected on validation data and reported on "
                         f"test data; use {'valid_' + text.split('test_', 1)[1]!r}")
    if text.startswith("final_") and text[len("final_"):].startswith(SELECTABLE):
        raise UsageError(f"{flag} {text!r}: name the metric, {text[len('final_'):]!r}; a run's final value of it is "
                         "what selects")
    if not text.isidentifier() or len(text) > 100:
        raise UsageError(f"{flag} must name a metric the runs log: a per-epoch one starting with valid_ or train_ "
                         f"(valid_loss, valid_accuracy, ...) or a final value of the experiment's, got {_short(name)}")
    return text


def per_epoch(metric: str) -> bool:
    """Whether a selection metric is recorded every epoch (early stopping, a plateau schedule and a
    pruner can watch it), rather than once, off the trained model."""
    return metric.startswith(SELECTABLE)


def _torch_accepts(cfg: TrainConfig, experiment: Experiment) -> None:
    """torch's own checks of the settings (betas in [0, 1), a positive eps, milestones...), run on a
    throwaway parameter: the experiment's own optimizers, losses and schedules are checked by the
    pre-flight step, on its model."""
    import torch

    param = torch.zeros(2, 2, requires_grad=True)  # 2-D: Muon takes matrices only
    try:
        if cfg.optimizer not in experiment.own_optimizers:
            optimizer = registry.build_optimizer(cfg.optimizer, [param], cfg.lr, cfg.weight_decay, cfg.momentum,
                                                 cfg.settings)
            if cfg.scheduler not in experiment.schedulers:
                registry.build_scheduler(cfg.scheduler, optimizer, cfg.settings, cfg.epochs, 1)
        if cfg.loss not in experiment.own_losses:
            registry.build_loss(cfg.loss, cfg.settings)
    except (ValueError, TypeError, RuntimeError) as exc:
        first = first_line(exc, 200)
        raise UsageError(f"{cfg.optimizer}+{cfg.loss}, scheduler {cfg.scheduler} refuses these settings: {first}") from None


def check_value(name: str, value: Any, experiment: Experiment, n_train: int | None = None) -> Any:
    """One hyperparameter's value (the harness's or the experiment's), typed and checked."""
    if name == "batch_size":
        if value in (*UNSET, "full"):
            return None
        size = positive_int("batch_size", value)
        if n_train is not None and size > n_train:
            raise UsageError(f"batch_size must be at most the training set's size {n_train}, got {value!r}")
        return size
    if name == "weight_decay":
        return _float("weight_decay", value, low=0.0)
    if name == "momentum":
        return _float("momentum", value, low=0.0, high=0.999)
    if name == "scheduler":
        return one_of("scheduler", value, experiment.scheduler_names())
    if name in ("grad_clip_norm", "grad_clip_value"):
        return None if value in UNSET else positive_float(name, value)
    if name == "patience":
        return None if value in UNSET else positive_int(name, value)
    if name == "min_delta":
        return _float("min_delta", value, low=0.0)
    hp = experiment.hyperparameter(name)
    if hp is None:
        check_keys([name], experiment, "the config")
    return hyperparameter_value(hp, value)


def hyperparameter_value(hp: Hyperparameter, value: Any) -> Any:
    """``value`` as the declared type, within the declared range or choices; else a UsageError."""
    if value is None and hp.default is None:
        return None
    if hp.type == "str":
        text = str(value).strip()
        if not text or len(text) > 200:
            raise UsageError(f"{hp.name} must be a non-empty text of at most 200 characters, got {_short(value)}")
        if hp.choices is not None and text not in map(str, hp.choices):
            raise UsageError(f"unknown {hp.name} {value!r}; allowed: {', '.join(map(str, hp.choices))}")
        return text
    if hp.type == "bool":
        return boolean(hp.name, value)
    if hp.type == "categorical":
        for choice in hp.choices or ():
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise UsageError(f"unknown {hp.name} {value!r}; allowed: {', '.join(map(str, hp.choices or ()))}")
    if hp.type == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            _in_range(hp, value, value)  # a huge integer is named by the declared range first
        number = _int(hp.name, value, minimum=None)
    else:
        number = _float(hp.name, value)
    if hp.choices is not None and number not in hp.choices:
        raise UsageError(f"{hp.name} must be one of {', '.join(map(str, hp.choices))}, got {value!r}")
    _in_range(hp, number, value)
    return number


def _in_range(hp: Hyperparameter, number, value) -> None:
    if (hp.low is not None and number < hp.low) or (hp.high is not None and number > hp.high):
        raise UsageError(f"{hp.name} must be in [{hp.low}, {hp.high}], got {_short(value)}")


def one_of(name: str, value: Any, allowed) -> str:
    if value not in allowed:
        raise UsageError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}{did_you_mean(value, allowed)}")
    return value


def positive_float(name: str, value: Any) -> float:
    number = _to_float(value)
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"{name} must be a positive number, got {value!r}")
    return number


def _to_float(value: Any) -> float:
    try:
        return float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _float(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    number = _to_float(value)
    if not math.isfinite(number):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UsageError(f"{name} must be {bounds}, got {value!r}")
    return number


def float_in(name: str, value: Any, low: float, high: float | None = None) -> float:
    """A finite number in [low, high] (no upper bound when ``high`` is None)."""
    return _float(name, value, low, high)


def epochs_value(name: str, value: Any) -> int:
    return _int(name, value, minimum=1, maximum=MAX_EPOCHS)


def checkpoint_policy(every: Any, seconds: Any, default_seconds: float) -> tuple[int | None, float | None]:
    """(every N epochs, every S seconds) from --checkpoint-every and --checkpoint-seconds, checked;
    None: off (a --checkpoint-seconds of 0 too)."""
    every = None if every in (None, "") else positive_int("--checkpoint-every", every)
    seconds = default_seconds if seconds in (None, "") else float_in("--checkpoint-seconds", seconds, 0.0, 1e9)
    return every, seconds or None


def boolean(name: str, value: Any) -> bool:
    """True or false, as YAML, a flag's value or MLproject's text gives it."""
    lowered = str(value).strip().lower()
    if isinstance(value, bool) or lowered in ("true", "false", "1", "0", "yes", "no"):
        return value if isinstance(value, bool) else lowered in ("true", "1", "yes")
    raise UsageError(f"{name} must be true or false, got {value!r}")


def switch(name: str, value: Any) -> bool:
    """A switch given as a bare flag (``--importance``: True), with a value (``--importance false``),
    or as MLproject passes one not set: ""."""
    return False if value in (None, "", False) else boolean(name, value)


def int_in(name: str, value: Any, low: int, high: int) -> int:
    """An integer in [low, high] (e.g. a sampler seed, which numpy takes below 2**32)."""
    return _int(name, value, minimum=low, maximum=high)


def positive_int(name: str, value: Any) -> int:
    return _int(name, value, minimum=1)


def nonnegative_int(name: str, value: Any) -> int:
    return _int(name, value, minimum=0)


def _int(name: str, value: Any, minimum: int | None, maximum: int = INT_LIMIT) -> int:
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and (digits := value.strip().lstrip("+-")).isascii() and digits.isdigit():
        # Past 30 digits it is out of range whatever it is: not parsed (Python refuses int() of 4300+).
        number = int(value) if len(digits) < 30 else (INT_LIMIT + 1) * (-1 if value.strip()[0] == "-" else 1)
    if number is None or (minimum is not None and number < minimum):
        kind = ("an integer" if minimum is None else "a positive integer" if minimum == 1
                else f"an integer >= {minimum}")
        raise UsageError(f"{name} must be {kind}, got {_short(value)}")
    if number > maximum or number < -INT_LIMIT:
        limit = f"at most {maximum}" if maximum != INT_LIMIT else f"at most {INT_LIMIT} in size"
        raise UsageError(f"{name} must be {limit}, got {_short(value)}")
    return number


def _short(value: Any) -> str:
    """A value for a one-line message: repr, cut when long (a 5000-digit number, a long list)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 40 else f"an integer of {len(str(value))} digits"
    return text if len(text) <= 80 else text[:77] + "..."
