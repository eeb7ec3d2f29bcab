"""``Objective``: what a plain Optuna script passes to ``study.optimize``."""
from __future__ import annotations

import threading

import optuna

from .. import accelerated, signals
from ..errors import ExperimentCodeError, ExperimentExit, experiment_exit
from ..experiment import Experiment
from . import objectives as objectives_module
from . import space as space_module
from .options import TrialOptions
from .recorder import TrialRecorder
from .space import SearchSpace
from .tracker import StudyTracker
from .trials import Told, TrialRun, TrialRunner


class Objective:
    """Samples a config, trains it, tracks the trial in MLflow and returns its selection metric,
    ``valid_loss`` unless ``objectives`` names another (with two ``objectives``, that metric then
    epochs or train_seconds, a tuple of both, for a study created with two directions). The trial
    is selected, pruned and early-stopped on validation data: the experiment's validation part, or
    ``valid_fraction`` (default 0.2) held out of its training part. Test metrics are logged, never
    returned.

    The experiment's data is loaded once, here. Use it as a context manager (or call ``close``) so
    that the study's summary is written and every trial's run is complete in the store::

        with Objective("linear_regression") as objective:
            study.optimize(objective, n_trials=20)

    ``track=False`` runs the same trials with no MLflow at all. A trial whose loss turns NaN or
    infinite returns NaN, which Optuna records as FAIL while the study carries on.
    """

    def __init__(self, experiment: str | Experiment = "linear_regression", space: SearchSpace | None = None, *,
                 track: bool = True, mlflow_experiment: str | None = None, report_every: int | None = None,
                 trial_figures: bool = False, seed: int = 42, device: str = "auto", base: dict | None = None,
                 data=None, study_tags: dict[str, str] | None = None, batch: int = 1,
                 study_params: dict[str, str] | None = None, objectives=objectives_module.DEFAULT,
                 importance: bool = False, checkpoint_every: int | None = None,
                 checkpoint_seconds: float | None = None, fast: bool = True):
        """``base``: fixed config values for every trial (e.g. ``{"batch_size": 64}``); the space's
        samples override them. ``data``: the experiment's data, if the caller already loaded it.
        ``study_tags``: tags added to the study's parent run (say, ``{"team": "vision"}``);
        ``study_params``: params added to it (the CLI logs its pruner's settings there).
        ``batch``: trials trained together by ``run_batch`` (recorded on the parent run).
        ``objectives``: what each trial returns (see harness/search/objectives.py).
        ``importance``: the study's summary renders the params' importances too (~1.8 s: it imports
        scikit-learn). ``checkpoint_every``/``checkpoint_seconds``: a tracked trial's checkpoints (off by
        default here; `harness search` writes one every 5 minutes of a trial), from which a retry of it
        goes on (see docs/operations.md, "Checkpoints and resume"). ``fast``: the acceleration wing's
        paths where it is installed (harness/fast/: one SQL transaction a record on an SQLite store,
        ``run_batch``'s stacks); False: MLflow's public path and every trial trained alone, the same
        records."""
        self._setup(TrialOptions.of(experiment, space, mlflow_experiment=mlflow_experiment, report_every=report_every,
                                    trial_figures=trial_figures, seed=seed, device=device, base=base, data=data,
                                    study_tags=study_tags, batch=batch, study_params=study_params,
                                    objectives=objectives, importance=importance, checkpoint_every=checkpoint_every,
                                    checkpoint_seconds=checkpoint_seconds,
                                    sql_writer=accelerated.sql_writer() if fast else None,
                                    stacker=accelerated.stacker() if fast else None), track=track)

    @classmethod
    def from_options(cls, options: TrialOptions, *, track: bool = True, client=None) -> "Objective":
        """An Objective of inputs checked already (`harness search`'s); ``client``: the MLflow client to track with."""
        objective = cls.__new__(cls)
        objective._setup(options, track=track, client=client)
        return objective

    def _setup(self, options: TrialOptions, *, track: bool, client=None) -> None:
        self.options, self.track, self._client = options, track, client
        self.objectives, self.experiment, self.space = options.objectives, options.experiment, options.space
        self.base, self.report_every = options.base, options.report_every
        self.tracker: StudyTracker | None = None
        self._lock = threading.Lock()
        self._runner = TrialRunner(options, self._recorder_for)
        self.data = self._runner.data  # on the config's device

    def __call__(self, trial: optuna.Trial) -> float:
        run, runner = TrialRun(trial), self._runner
        try:
            # Where the caller holds signals (`harness search` does, so that none lands while Optuna
            # records a trial), an interrupt stops the trial at once from here on.
            with signals.interruptible():
                runner.start([run])
                if run.error is not None:
                    raise run.error
                runner.train(run)
        except BaseException as exc:
            # sys.exit() in the experiment's code: the trial fails, and the search stops as an Exception
            # (Optuna closes only those, and the parent run is then closed too).
            error = experiment_exit(exc, run.history.epochs_run) or exc
            with signals.deferred():  # a second Ctrl-C must not cut the wrap-up short
                runner.end_unfinished(run, error)
            if isinstance(error, ExperimentCodeError) and not isinstance(error, ExperimentExit):
                runner.said(str(error))  # this trial fails, the search goes on
                return objectives_module.failed(self.objectives)
            if error is exc:
                raise
            raise error from None
        state, = runner.finish([run])
        if state == "PRUNED":
            raise optuna.TrialPruned(run.result.history.stopped)
        return objectives_module.failed(self.objectives) if state == "FAIL" else \
            objectives_module.values(self.objectives, run.result)

    def run_batch(self, trials: list) -> list[Told]:
        """Train ``trials`` (asked from one study) together: those whose configurations stack (the
        options' stacker, harness.fast.batched: same shapes, batch size and seed) as one stacked
        model, each still its own trial and run, reported, pruned and tracked as ``__call__`` does;
        the others one at a time. Returns
        a ``Told(state, value)`` per trial, for ``study.tell``. A member's numbers are those of training it
        alone, bit for bit, so each trial reproduces alone."""
        return self._runner.run_batch(trials)

    def record_unstarted(self, trials: list, reason: str) -> None:
        """Trials asked and never started (a signal came while a batch was asked): each gets its FAILED
        run, with the params drawn so far and ``reason``, as a trial cut short after its start has one."""
        for trial in trials:
            recorder = self._recorder_for(trial)
            if recorder is not None:
                recorder.record_refused(trial, space_module.logged_params(trial.params), reason)

    def _recorder_for(self, trial) -> TrialRecorder | None:
        if not self.track or getattr(trial, "study", None) is None:
            return None
        with self._lock:
            if self.tracker is None:
                self.tracker = StudyTracker(trial.study, self.options, client=self._client)
        return self.tracker.recorder

    def close(self) -> list[BaseException]:
        """Write the study summary and wait until every trial's run is in the store."""
        with self._lock:
            tracker, self.tracker = self.tracker, None
        return tracker.close() if tracker else []

    def __enter__(self) -> "Objective":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
