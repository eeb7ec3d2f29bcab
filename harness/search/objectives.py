"""What a trial's values are: the final test loss, and optionally a second objective (``--objectives``).

With one objective (the default) a trial returns its final test loss, as it always did. With two, it
returns (test loss, second) and the study is multi-objective: Optuna keeps its Pareto front, and
cannot prune it (``Trial.report`` refuses a multi-objective study).
"""
from __future__ import annotations

import math
import warnings

from .. import schema
from ..errors import UsageError, did_you_mean

FIRST = schema.TEST_LOSS  # always the first objective
EPOCHS = "epochs"  # the epochs the trial trained (a completed trial: its config's)
SECONDS = "train_seconds"  # the wall time of the trial's training loop
SECOND = (EPOCHS, SECONDS)
NAMES = (FIRST, *SECOND)
DEFAULT = (FIRST,)
# Samplers that model one objective only: Optuna's CmaEsSampler refuses a study with two directions.
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)


def parse(given, flag: str = "--objectives") -> tuple[str, ...]:
    """The objectives named by ``given`` (a list of names; one item may hold several, space-separated,
    as MLproject passes them): the test loss, then at most one of SECOND. Else a one-line UsageError."""
    names = tuple(part for item in ([given] if isinstance(given, str) else given or ()) for part in item.split())
    if not names and given and not isinstance(given, str):  # --objectives "": MLproject's default is test_loss
        raise UsageError(f"{flag} {' '.join(map(repr, given))}: name the objectives: {FIRST}, or {FIRST} and one "
                         f"of {', '.join(SECOND)}")
    names = names or DEFAULT
    for name in names:
        if name not in NAMES:
            raise UsageError(f"{flag}: unknown objective {name!r}; allowed: {FIRST}, then one of "
                             f"{', '.join(SECOND)}{did_you_mean(name, NAMES)}")
    if names[0] != FIRST or len(names) > 2 or len(set(names)) < len(names):
        raise UsageError(f"{flag} {' '.join(names)}: the first objective is {FIRST}, then at most one of "
                         f"{', '.join(SECOND)}")
    return names


def known(names: tuple[str, ...] | None) -> bool:
    """Whether ``names`` are objectives this harness can search (a study's stored ones may be edited)."""
    try:
        return bool(names) and parse(list(names)) == tuple(names)
    except UsageError:
        return False


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
    """The study's directions: ``direction`` for the test loss, and the second objective minimized."""
    return [direction] + ["minimize"] * (len(objectives) - 1)


def measured(objectives: tuple[str, ...], result) -> dict[str, float]:
    """Each objective's value for a trained trial (a ``training.TrainResult``)."""
    values = {FIRST: result.history.last(schema.TEST_LOSS), EPOCHS: float(result.history.epochs_run),
              SECONDS: result.seconds}
    return {name: values[name] for name in objectives}


def values(objectives: tuple[str, ...], result):
    """What the trial returns to Optuna: the final test loss alone with one objective, else a tuple."""
    found = tuple(measured(objectives, result).values())
    return found[0] if len(found) == 1 else found


def failed(objectives: tuple[str, ...]):
    """What a diverged trial returns: NaN for each objective, which Optuna records as FAIL."""
    return math.nan if len(objectives) == 1 else (math.nan,) * len(objectives)


def metrics(objectives: tuple[str, ...], result) -> dict[str, float]:
    """The metrics a completed trial's run adds with two objectives: each value (none with one)."""
    if len(objectives) < 2:
        return {}
    return {schema.objective(name): value for name, value in measured(objectives, result).items()}


def of_study(study) -> tuple[str, ...] | None:
    """The objectives a study was created with (None: two, unnamed, from a script of one's own)."""
    stored = study.user_attrs.get(schema.OBJECTIVES_ATTR)
    if stored:
        return tuple(stored)
    return DEFAULT if len(study.directions) == 1 else None


def name_study(study, objectives: tuple[str, ...]) -> None:
    """A study of two objectives keeps their names (``harness.objectives``, and Optuna's metric names
    for its tables and plots), so that resuming it with others is refused; one already named for
    other objectives is refused here."""
    if len(objectives) < 2:
        return
    stored = study.user_attrs.get(schema.OBJECTIVES_ATTR)
    if stored:
        if tuple(stored) != tuple(objectives):
            raise UsageError(f"study {study.study_name!r} has objectives {' '.join(stored)}, not {' '.join(objectives)}")
        return
    import optuna

    study.set_user_attr(schema.OBJECTIVES_ATTR, list(objectives))
    with warnings.catch_warnings():  # set_metric_names is experimental in Optuna 5.0, and stable enough
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives))
