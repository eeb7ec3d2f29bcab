"""A value a run takes from its config and a search may sample: an experiment's own, or one of the
harness's (batch size, an optimizer's, loss's or schedule's settings)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

TYPES = ("int", "float", "categorical", "bool", "str")
# The config keys whose value decides whether a setting applies (a setting names the values it applies to).
CHOOSERS = ("optimizer", "loss", "scheduler")
PLURAL = {"optimizer": "optimizers", "loss": "losses", "scheduler": "schedulers"}


@dataclass(frozen=True)
class Hyperparameter:
    """A value an experiment (or the harness) takes from the config, and may let Optuna search.

    ``low``/``high`` (with ``log`` and ``step``) or ``choices`` give its default search range; a
    search samples it only when the search space names it. ``optimizers`` (``losses``,
    ``schedulers``) limits it to the optimizers (losses, schedules) it means something for: it is
    sampled, and may be set, only with those.
    """

    name: str
    type: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None
    optimizers: tuple[str, ...] | None = None
    help: str = ""
    losses: tuple[str, ...] | None = None
    schedulers: tuple[str, ...] | None = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"hyperparameter name {self.name!r} must be a Python identifier")
        if self.type not in TYPES:
            raise ValueError(f"hyperparameter {self.name!r}: type {self.type!r} is not one of {', '.join(TYPES)}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
            bad = [c for c in self.choices if not isinstance(c, (str, int, float, bool))]
            if bad:  # what Optuna can sample and MLflow can log as a param
                raise ValueError(f"hyperparameter {self.name!r}: choices must be str, int, float or bool, got {bad[0]!r}")
        if self.type == "bool" and self.choices is None:
            object.__setattr__(self, "choices", (False, True))
        for key in ("optimizers", "losses", "schedulers"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(getattr(self, key)))

    @property
    def has_range(self) -> bool:
        return self.choices is not None or (self.low is not None and self.high is not None)

    def applies_to(self, optimizer: str) -> bool:
        return self.optimizers is None or optimizer in self.optimizers

    def limits(self) -> dict[str, tuple[str, ...]]:
        """{chooser: the values this setting applies to}, for each chooser that limits it."""
        return {key: allowed for key, allowed in zip(CHOOSERS, (self.optimizers, self.losses, self.schedulers))
                if allowed is not None}

    def applies(self, chosen: Mapping[str, Any]) -> bool:
        """Whether it applies to a config's (or a trial's) optimizer, loss and schedule."""
        return all(chosen.get(key) in allowed for key, allowed in self.limits().items())

    def scope(self) -> str:
        """Where it applies, for a message: "optimizers sgd, rmsprop"."""
        return " and ".join(f"{PLURAL[key]} {', '.join(allowed)}" for key, allowed in self.limits().items())
