"""The end of a search invocation: its best trial (or every completed one, or none: ``--models``)
logged as an MLflow Model, and with ``--register`` the best one registered in the Model Registry."""
from __future__ import annotations

import sys

from optuna.study import StudyDirection
from optuna.trial import TrialState

from .. import models, signals
from ..errors import HarnessError, UsageError
from ..schema import RUN_ATTR

# --models: the best trial (of two objectives, the Pareto front), every completed one, or none. The
# first MLflow Model of a process costs ~1 s whatever the model (torch.export's first use, MLflow's
# requirements check): what a search of seconds may rather not pay (docs/benchmarks.md).
MODELS = ("best", "all", "none")


class NotPublished(HarnessError):
    """What ``--register`` asked cannot be done once the trials are written: nothing is registered,
    the search's report still stands (exit 1, not 2: the stores were written)."""


def publish(study, client, trials, which: str = "best", register: str | None = None,
            process: dict | None = None) -> list[str]:
    """Log the models of the trials ``which`` names (one of MODELS) that are not logged yet, and
    register the best with ``register``. Returns the lines to print. A model that does not export,
    or that the experiment's code fails to rebuild, is said on stderr, once, and its runs keep what
    `harness predict` reads; with ``register`` that is a NotPublished (nothing is registered).
    After a Ctrl-C or SIGTERM (held while a model is logged, so none is left half-logged) no other
    model is started and nothing is registered. ``process``: this worker's record (models.log_run_model)."""
    if which == "none":
        return []
    best = _best(study)
    chosen = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if which == "all" else best
    logged: dict[int, str] = {}
    lines = []
    for trial in chosen:
        run_id = trial.user_attrs.get(RUN_ATTR)
        if signals.interrupted():
            return lines
        if run_id is None:
            continue
        model_id = models.run_model(client, run_id)
        if model_id is None:
            try:
                model_id = models.log_run_model(client, run_id, trials.experiment, trials.data, process)
            except (models.NotExportable, UsageError) as exc:  # UsageError: make_model or make_data raised now
                if register:
                    raise NotPublished(f"no MLflow Model logged: {exc}; nothing registered as {register!r}") from None
                print(f"harness: no MLflow Model logged: {exc}; the runs keep state_dict.pt and config.json "
                      "for harness predict", file=sys.stderr)
                return lines  # every trial has the same experiment: the others would fail alike
            lines.append(f"trial {trial.number}: MLflow Model models:/{model_id} (run {run_id})")
        logged[trial.number] = model_id
    if register and best and not signals.interrupted():
        trial = _champion(study, best)
        if trial.number not in logged:
            raise NotPublished(f"trial {trial.number}, the best, has no MLflow run: nothing registered as {register!r}")
        version = models.register(client, register, trial.user_attrs[RUN_ATTR], logged[trial.number],
                                  models.version_tags(study.study_name, trial.number, ", ".join(trials.objectives),
                                                      ", ".join(map(str, trial.values))))
        lines.append(f"registered trial {trial.number} as {register!r} version {version.version}: "
                     f"models:/{register}@{models.CHAMPION}")
    return lines


def _best(study) -> list:
    """The best trial of a study of one objective, the Pareto front of one of two; [] before any completed."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return [study.best_trial] if len(study.directions) == 1 else list(study.best_trials)


def _champion(study, best: list):
    """The trial ``--register`` makes the champion: the best; of a Pareto front, the member best on the
    first objective, then on the second (the order the summary lists the front in)."""
    signs = [1 if d == StudyDirection.MINIMIZE else -1 for d in study.directions]
    return min(best, key=lambda t: ([sign * value for sign, value in zip(signs, t.values)], t.number))
