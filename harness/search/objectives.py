"""What a trial's values are: its selection metric, and optionally a second objective (``--objectives``).

The first objective is a per-epoch metric the run records on its validation data (``valid_loss``,
the default, or ``valid_accuracy`` and the like) or its training data, or a final value the
experiment reads off the trained model (its ``scalars``: then no trial is pruned, as nothing is
reported per epoch), never a value on its test data:
the test figures a search reports must not be what chose the trial. With one objective a trial
returns its final value of it. With two, it returns (first, second) and the study is
multi-objective: Optuna keeps its Pareto front, and cannot prune it (``Trial.report`` refuses a
multi-objective study).
"""
from __future__ import annotations

import math

from .. import schema
from ..config import per_epoch, selection_metric_name
from ..errors import UsageError, did_you_mean
from .experimental import experimental_ok

FIRST = schema.VALID_LOSS  # the first objective unless one is named
EPOCHS = "epochs"  # the epochs the trial trained (a completed trial: its config's)
SECONDS = "train_seconds"  # the wall time of the trial's training loop
SECOND = (EPOCHS, SECONDS)
DEFAULT = (FIRST,)
# Samplers that model one objective only: Optuna's CmaEsSampler refuses a study with two directions.
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)


def parse(given, flag: str = "--objectives", first: str | None = None) -> tuple[str, ...]:
    """The objectives named by ``given`` (a list of names; one item may hold several, space-separated,
    as MLproject passes them): a selection metric (``valid_loss`` when none is named), then at most
    one of SECOND. ``first`` (``--objective``) names the selection metric. Else a one-line UsageError."""
    names = tuple(part for item in ([given] if isinstance(given, str) else given or ()) for part in item.split())
    if not names and given and not isinstance(given, str):  # --objectives "": MLproject's default is valid_loss
        raise UsageError(f"{flag} {' '.join(map(repr, given))}: name the objectives: a metric such as {FIRST}, then "
                         f"optionally one of {', '.join(SECOND)}")
    if first not in (None, ""):
        first = selection_metric_name(first, "--objective")
        if names and names[0] not in SECOND and names[0] != first:
            raise UsageError(f"--objective {first} with {flag} {' '.join(names)}: name the selection metric once")
        names = (first, *(names[1:] if names and names[0] not in SECOND else names))
    names = names or DEFAULT
    if names[0] in SECOND:
        raise UsageError(f"{flag} {' '.join(names)}: the first objective is a metric the runs record ({FIRST}, "
                         f"valid_accuracy, ...), then at most one of {', '.join(SECOND)}")
    selection_metric_name(names[0], flag)
    for name in names[1:]:
        if name not in SECOND:
            raise UsageError(f"{flag}: unknown second objective {name!r}; allowed: {', '.join(SECOND)}"
                             f"{did_you_mean(name, SECOND)}")
    if len(names) > 2:
        raise UsageError(f"{flag} {' '.join(names)}: a selection metric, then at most one of {', '.join(SECOND)}")
    return names


def known(names: tuple[str, ...] | None) -> bool:
    """Whether ``names`` are objectives this harness can search (a study's stored ones may be edited)."""
    try:
        return bool(names) and parse(list(names)) == tuple(names)
    except UsageError:
        return False


def fixed_values(fixed: dict, objectives: tuple[str, ...], has_valid: bool, experiment: str) -> dict:
    """A search's fixed config values: each trial selects (and early-stops) on the first objective,
    on validation data: without a validation part of the experiment's own, ``valid_fraction`` of the
    training part is held out (config.DEFAULT_VALID_FRACTION unless given; 0 is refused)."""
    from .. import config

    fixed = dict(fixed)
    if fixed.get("objective") not in (*config.UNSET, objectives[0]):
        raise UsageError(f"objective {fixed['objective']!r} in the fixed config, but the search selects on "
                         f"{objectives[0]!r}: name it once, as the search's objective")
    fixed["objective"] = objectives[0]
    if not has_valid:
        if fixed.get("valid_fraction") in config.UNSET:
            fixed["valid_fraction"] = config.DEFAULT_VALID_FRACTION
        elif config.float_in("valid_fraction", fixed["valid_fraction"], 0.0, config.MAX_VALID_FRACTION) == 0:
            raise UsageError(f"valid_fraction 0 with experiment {experiment!r}, which gives no validation part: a "
                             "search selects on validation data, never on test data; leave valid_fraction unset "
                             f"({config.DEFAULT_VALID_FRACTION} of the training data is held out) or give one")
    return fixed


def check_batch(objectives: tuple[str, ...], batch: int, flag: str = "--batch") -> None:
    """Trials trained together share their wall time: none of them has a training time of its own."""
    if SECONDS in objectives and batch > 1:
        raise UsageError(f"{flag} {batch} with objective {SECONDS}: trials trained together share their training "
                         f"time; use {flag} 1, or the objective {EPOCHS}")


def check_strategy(objectives: tuple[str, ...], sampler: str, pruner: str, pruner_args=()) -> None:
    """A sampler and pruner (and its settings) that can serve a study with two objectives (one: any)."""
    if len(objectives) < 2:
        return
    shown = " ".join(objectives)
    settings = " ".join(part for item in pruner_args or () for part in item.split())
    if settings:
        raise UsageError(f"--pruner-args {settings} with --objectives {shown}: a multi-objective study is not "
                         "pruned (Optuna does not prune one), so it takes no pruner settings")
    if sampler in SINGLE_OBJECTIVE_SAMPLERS:
        raise UsageError(f"--sampler {sampler} models one objective only; with --objectives {shown} use tpe, "
                         "random, grid, qmc, gp or nsga2")
    if pruner != "none":
        raise UsageError(f"--pruner {pruner} with --objectives {shown}: Optuna does not prune multi-objective "
                         "studies; allowed: none (the default with two objectives)")


def directions(objectives: tuple[str, ...], direction: str = "minimize") -> list[str]:
    """The study's directions: ``direction`` for the selection metric, and the second objective minimized."""
    return [direction] + ["minimize"] * (len(objectives) - 1)


def measured(objectives: tuple[str, ...], result) -> dict[str, float]:
    """Each objective's value for a trained trial (a ``training.TrainResult``): the selection
    metric's final value (with early stopping, its best epoch's), the epochs trained, the seconds."""
    values = {EPOCHS: float(result.history.epochs_run), SECONDS: result.seconds}
    return {name: values[name] if name in values else result.value(name) for name in objectives}


def selection_split(objectives: tuple[str, ...], result) -> dict[str, float]:
    """A trained trial's final values on the data its first objective is measured on (``valid_*``,
    or ``train_*`` without validation data): the selection metric first, then the experiment's own
    (``valid_accuracy``), so tables of the best trials show more than the number that ranked them."""
    first = objectives[0]
    if per_epoch(first):
        split = first.split("_", 1)[0] + "_"
    else:  # a final value read off the model, then the values on the data the run validates on
        split = "valid_" if schema.VALID_LOSS in result.history.values else "train_"
    names = sorted((n for n in result.history.values if n.startswith(split)), key=lambda n: n != first)
    return {**({} if per_epoch(first) else {first: result.value(first)}),
            **{name: result.history.last(name) for name in names}}


def values(objectives: tuple[str, ...], result):
    """What the trial returns to Optuna: the selection metric alone with one objective, else a tuple."""
    found = tuple(measured(objectives, result).values())
    return found[0] if len(found) == 1 else found


def failed(objectives: tuple[str, ...]):
    """What a diverged trial returns: NaN for each objective, which Optuna records as FAIL."""
    return math.nan if len(objectives) == 1 else (math.nan,) * len(objectives)


def logged_names(objectives: tuple[str, ...]) -> list[str]:
    """The names ``metrics`` logs for these objectives."""
    return [schema.objective(name) for name in objectives] if len(objectives) > 1 else []


def metrics(objectives: tuple[str, ...], result) -> dict[str, float]:
    """The metrics a completed trial's run adds with two objectives: each value (none with one)."""
    if len(objectives) < 2:
        return {}
    return {schema.objective(name): value for name, value in measured(objectives, result).items()}


LEGACY = (schema.TEST_LOSS,)  # what a study created before objectives were named selected on


def of_study(study) -> tuple[str, ...] | None:
    """The objectives a study was created with (None: two, unnamed, from a script of one's own)."""
    stored = study.user_attrs.get(schema.OBJECTIVES_ATTR)
    if stored:
        return tuple(stored)
    return LEGACY if len(study.directions) == 1 else None


def name_study(study, objectives: tuple[str, ...]) -> None:
    """A study keeps its objectives' names (``harness.objectives``, and Optuna's metric names for
    its tables and plots), so that resuming it with others is refused; one already named for other
    objectives is refused here."""
    stored = study.user_attrs.get(schema.OBJECTIVES_ATTR)
    if stored:
        if tuple(stored) != tuple(objectives):
            raise UsageError(f"study {study.study_name!r} has objectives {' '.join(stored)}, not {' '.join(objectives)}")
        return
    study.set_user_attr(schema.OBJECTIVES_ATTR, list(objectives))
    if len(objectives) < 2:  # one: trials.csv keeps Optuna's plain "value" column
        return
    with experimental_ok():  # set_metric_names is experimental in Optuna 5.0, and stable enough
        study.set_metric_names(list(objectives))
