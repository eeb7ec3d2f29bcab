"""``Objective``: what a plain Optuna script passes to ``study.optimize``."""
from __future__ import annotations

import contextlib
import threading

import sys
from dataclasses import dataclass, field

import optuna

from .. import batched, config, signals, training
from ..errors import ExperimentCodeError, UsageError, described
from ..experiment import Experiment, load
from ..loop import History, StopTraining
from . import objectives as objectives_module
from . import space as space_module
from .space import SearchSpace
from .journal import JournalWriteError
from ..schema import FAIL_REASON_ATTR, METRICS_ATTR, PAIR_TRIAL_PARAM, RUN_ATTR, WORKER_ATTR
from .tracker import StudyTracker, TrackingFailed
from .workers import INTERRUPTED, identity, retry, unfinished_reason


def failure_reason(exc: BaseException) -> str:
    """What the trial's fail_reason says: "interrupted", "tracking failed: ..." and the like for a
    trial stopped from outside (see workers.UNFINISHED_REASONS), else the error the trial raised."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, TrackingFailed):
        return str(exc) if str(exc).startswith("tracking failed") else f"tracking failed: {exc}"
    if isinstance(exc, JournalWriteError):
        return f"journal write failed: {exc}"
    if isinstance(exc, ExperimentCodeError):
        return str(exc)[:500]
    return repr(exc)[:500]


def _frozen(study, trial):
    """The FrozenTrial of a running trial (what Optuna's retry callbacks take)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def _queued_misfit(trial, exc: ValueError) -> tuple[ExperimentCodeError, dict, dict]:
    """A queued trial (enqueued by hand, or left by a search over another space) whose params this
    search's space or config refuses: that trial fails with the reason and is not queued again.
    The same error from a trial the sampler drew is the harness's bug: raised as it is. Returns
    the error, the queued params and those drawn before the refusal."""
    study = getattr(trial, "study", None)
    frozen = _frozen(study, trial) if study is not None else None
    if frozen is None or not frozen.system_attrs.get("fixed_params"):
        raise exc
    return (ExperimentCodeError(f"trial {trial.number}'s queued params do not fit this search: {described(exc)}"),
            frozen.system_attrs["fixed_params"], frozen.params)


def _stop(trial) -> None:
    """A signal while a finished trial is being recorded: let the trial end as it is, then stop."""
    study = getattr(trial, "study", None)
    if study is not None:
        study.stop()
    else:
        raise KeyboardInterrupt


def _drop_inherited_reason(trial) -> None:
    """A retried configuration's trial comes with its failed try's user attrs (Optuna's retry copies
    them): the reason that try failed is not this trial's."""
    if trial.user_attrs.get(FAIL_REASON_ATTR) is not None:
        trial.set_user_attr(FAIL_REASON_ATTR, None)


@dataclass
class _TrialRun:
    """One trial on its way through training; what is known of it so far, for the wrap-up of a trial cut short."""
    trial: object
    tracker: StudyTracker | None = None
    pending: object = None  # the Future of its run's id
    cfg: object = None
    observers: list = field(default_factory=list)
    history: History = field(default_factory=History)  # kept if training is cut short
    result: object = None  # its TrainResult, once trained
    error: ExperimentCodeError | None = None  # why the experiment's code failed it, if it did


class _Reporter:
    """Loop observer: reports the selection metric to the trial and stops the loop when the pruner says so."""

    def __init__(self, trial, every: int, metric: str):
        self.trial, self.every, self.metric = trial, every, metric

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if epoch % self.every:
            return
        self.trial.report(logs[self.metric], epoch)
        if self.trial.should_prune():
            raise StopTraining(f"pruned at epoch {epoch}")


class _Tracking:
    """Loop observer: stores the trial's run id as soon as its run is created (so that
    even a trial whose worker is killed points at its run), and stops training at the first failed
    tracking write (a trial that cannot be recorded is not worth finishing)."""

    def __init__(self, trial, tracker, pending):
        self.trial, self.tracker, self.pending = trial, tracker, pending

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.tracker.check()
        if self.pending is not None and self.pending.done() and not self.pending.exception():
            self.trial.set_user_attr(RUN_ATTR, self.pending.result())
            self.pending = None


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
                 study_params: dict[str, str] | None = None, objectives=objectives_module.DEFAULT):
        """``base``: fixed config values for every trial (e.g. ``{"batch_size": 64}``); the space's
        samples override them. ``data``: the experiment's data, if the caller already loaded it.
        ``study_tags``: tags added to the study's parent run (say, ``{"team": "vision"}``);
        ``study_params``: params added to it (the CLI logs its pruner's settings there).
        ``batch``: trials trained together by ``run_batch`` (recorded on the parent run).
        ``objectives``: what each trial returns (see harness/search/objectives.py)."""
        self.objectives = objectives_module.parse(objectives, flag="objectives")
        objectives_module.check_batch(self.objectives, config.positive_int("batch", batch), flag="batch")
        self.experiment = experiment if isinstance(experiment, Experiment) else load(experiment)
        data = data if data is not None else self.experiment.load_data()
        self.space = space or space_module.resolve(self.experiment, n_train=data.n_train)
        fixed = objectives_module.fixed_values(
            {**(base or {}), "experiment": self.experiment.reference or self.experiment.name, "seed": seed,
             "device": device}, self.objectives, data.has_valid, self.experiment.name)
        self.base, _ = config.resolve(fixed, experiment=self.experiment, n_train=data.n_train)
        self._host_data = data  # the figures are drawn from it
        self.data = data.to(self.base.device)
        # None: the space's cadence (space.report_cadence), which the CLI uses on embedded storages too.
        self.report_every = (space_module.report_cadence(self.space) if report_every is None
                             else config.positive_int("report_every", report_every))
        self.track = track
        self.tracker = None
        # Two objectives: nothing is reported (Optuna prunes no multi-objective study), so no cadence is logged.
        reports = self.report_every if len(self.objectives) == 1 else None
        self._tracker_options = {"mlflow_experiment": mlflow_experiment, "trial_figures": trial_figures,
                                 "study_tags": study_tags, "space": self.space, "report_every": reports,
                                 "batch": config.positive_int("batch", batch), "extra_params": study_params,
                                 "objectives": self.objectives}
        self._lock = threading.Lock()
        self._worker = identity()
        self._refusals: dict[tuple, str | None] = {}  # (stack key, loss) -> why it is not stacked (None: it is)
        self._named: set[str] = set()  # studies checked by _check_study
        self._reasons: set[str] = set()  # why trials failed in the experiment's code, said once each

    def __call__(self, trial: optuna.Trial) -> float:
        run = _TrialRun(trial)
        try:
            # Where the caller holds signals (`harness search` does, so that none lands while Optuna
            # records a trial), an interrupt stops the trial at once from here on.
            with signals.interruptible():
                self._start([run])
                if run.error is not None:
                    raise run.error
                result = training.train(run.cfg, self.experiment, self.data, run.observers, history=run.history)
        except BaseException as exc:
            with signals.deferred():  # a second Ctrl-C must not cut the wrap-up short
                self._end_unfinished(run, exc)
            if isinstance(exc, ExperimentCodeError):  # this trial fails, the search goes on
                self._said(str(exc))
                return objectives_module.failed(self.objectives)
            raise
        run.result = result
        state, = self._finish([run])
        if state == "PRUNED":
            raise optuna.TrialPruned(result.history.stopped)
        return objectives_module.failed(self.objectives) if state == "FAIL" else \
            objectives_module.values(self.objectives, result)

    def _said(self, reason: str) -> None:
        """One line on stderr for each new reason a trial failed in the experiment's code."""
        self._said_once(f"harness: a trial failed, the search goes on: {reason}")

    def _said_once(self, line: str) -> None:
        with self._lock:
            if line in self._reasons:
                return
            self._reasons.add(line)
        print(line, file=sys.stderr)

    def _start(self, runs: list[_TrialRun]) -> None:
        """Everything before training, filled into each run step by step: its worker, its config,
        its run (created in the background, a batch's together, those of the configurations made
        so far also when a later one raises) and the observers that report, prune and link the run."""
        try:
            for run in runs:
                trial = run.trial
                self._check_study(trial)
                if getattr(trial, "study", None) is not None:
                    # Lets the next worker (or `harness audit --fix`) tell a crashed trial from a running one.
                    trial.set_user_attr(WORKER_ATTR, self._worker)
                    _drop_inherited_reason(trial)
                run.tracker = self._tracker_for(trial)
                try:
                    values = space_module.sample(trial, self.space, self.base.chosen())
                    if getattr(trial, "study", None) is not None:  # the run early-stops the way the study selects
                        values["direction"] = trial.study.directions[0].name.lower()
                    run.cfg = config.validate(config.with_values(self.base, values, self.experiment),
                                              self.experiment, self.data.n_train)
                except ValueError as exc:  # UsageError too; Optuna's for a queued choice the space lacks
                    run.error, queued, drawn = _queued_misfit(trial, exc)
                    if run.tracker:
                        known = {"lr", "epochs", PAIR_TRIAL_PARAM, *(p.name for p in self.space.params)}
                        params = {k: str(v)[:250] for k, v in queued.items() if k in known}
                        params.update(space_module.logged_params(drawn))  # as a trained trial's run logs them
                        run.tracker.record_refused(trial, params, str(run.error))
        finally:
            tracked = [run for run in runs if run.tracker and run.cfg is not None]
            if tracked:
                # Held: a signal between submitting the runs and keeping their futures would leave
                # runs their trials never point at; one that came is acted on once they are kept.
                with signals.deferred():
                    pending = tracked[0].tracker.start_trials([(run.trial, run.cfg) for run in tracked])
                    for run, future in zip(tracked, pending):
                        run.pending = future
        for run in runs:
            run.observers = self._observers(run.trial) + (
                [_Tracking(run.trial, run.tracker, run.pending)] if run.tracker else [])

    def _finish(self, runs: list[_TrialRun]) -> list[str]:
        """Trained trials' states, their reasons or final selection-data values, and their runs'
        records (a batch's written together); held against signals."""
        states = []
        for run in runs:
            history = run.result.history
            states.append("FAIL" if run.result.diverged else "PRUNED" if history.stopped else "COMPLETE")
        with signals.deferred(on_signal=lambda: _stop(runs[0].trial)):
            for run, state in zip(runs, states):
                if state == "FAIL":
                    run.trial.set_user_attr(FAIL_REASON_ATTR, run.result.history.stopped)
                elif state == "COMPLETE":
                    run.trial.set_user_attr(METRICS_ATTR, objectives_module.selection_split(self.objectives,
                                                                                          run.result))
            tracked = [(run.trial, run.pending, run.result, state) for run, state in zip(runs, states) if run.tracker]
            if tracked:
                runs[0].tracker.end_trials(tracked)
        return states

    def run_batch(self, trials: list) -> list[tuple[str, float | None]]:
        """Train ``trials`` (asked from one study) together: those whose configurations stack
        (harness.batched: same shapes, batch size and seed) as one stacked model, each still its own trial and
        run, reported, pruned and tracked as ``__call__`` does; the others one at a time. Returns
        (state, value) per trial, for ``study.tell``. A member's numbers are those of training it
        alone, bit for bit, so each trial reproduces alone."""
        objectives_module.check_batch(self.objectives, len(trials), flag="a batch of")
        runs = []
        try:
            with signals.interruptible():
                runs = [_TrialRun(trial) for trial in trials]
                self._start(runs)
                for group in self._stacks([run for run in runs if run.error is None]):
                    try:
                        self._train_group(group)
                    except Exception as exc:  # the experiment's code: that group's trials fail, the rest go on
                        error = training.experiment_code_error(exc, max(r.history.epochs_run for r in group))
                        if error is None:
                            raise
                        for run in group:
                            run.error = error
        except BaseException as exc:
            with signals.deferred():  # a second Ctrl-C must not cut the wrap-up short
                for run in runs:
                    self._end_unfinished(run, exc)
            raise
        for run in runs:
            if run.error is not None:
                with signals.deferred():
                    self._end_unfinished(run, run.error)
                self._said(str(run.error))
        trained = [run for run in runs if run.error is None]
        states = dict(zip(map(id, trained), self._finish(trained) if trained else []))
        return [("FAIL", None) if run.error is not None else
                (states[id(run)], objectives_module.values(self.objectives, run.result)
                 if states[id(run)] == "COMPLETE" else None) for run in runs]

    def _train_group(self, group: list[_TrialRun]) -> None:
        """One run alone, or a stack of them, trained; each run gets its result."""
        if len(group) == 1:
            run, = group
            run.result = training.train(run.cfg, self.experiment, self.data, run.observers, history=run.history)
            return
        stacked = batched.train_stack([r.cfg for r in group], self.experiment, self.data,
                                      observers=[r.observers for r in group], histories=[r.history for r in group])
        for run, result in zip(group, stacked):
            run.result = result

    def _stacks(self, runs: list[_TrialRun]) -> list[list[_TrialRun]]:
        """The runs grouped into stacks; a configuration that cannot be stacked is a group of its
        own (said once per kind, on stderr)."""
        groups: dict[tuple, list] = {}
        for run in runs:
            key = batched.stack_key(run.cfg)
            checked = (key, run.cfg.loss)  # a loss may change the last bits a stack gives
            if checked not in self._refusals:
                reason = self._refusals[checked] = batched.refusal(run.cfg, self.experiment, self.data)
                if reason and list(self._refusals.values()).count(reason) == 1:  # said once per reason
                    print(f"harness: trials trained one at a time, not stacked: {reason}", file=sys.stderr)
            groups.setdefault(key if self._refusals[checked] is None else ("alone", run.trial.number), []).append(run)
        # A stacked epoch costs about what 3 epochs alone cost on a small model (vmap's own
        # overhead, benchmarks/batched_search.py): fewer members train faster one at a time.
        return [part for group in groups.values()
                for part in ([group] if len(group) >= batched.MIN_STACK else [[r] for r in group])]

    def _end_unfinished(self, run: _TrialRun, exc: BaseException) -> None:
        """A trial cut short: record why, close its run with the curves so far, and queue its
        configuration again when the cause was not the configuration itself."""
        trial, tracker, pending, cfg, history = run.trial, run.tracker, run.pending, run.cfg, run.history
        reason = failure_reason(exc)
        study = getattr(trial, "study", None)
        with contextlib.suppress(Exception):  # the storage may be what failed
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
        if tracker and cfg is not None:
            with contextlib.suppress(TrackingFailed):
                tracker.end_interrupted_trial(trial, pending, cfg, history, reason=reason,
                                              run_status="KILLED" if reason == INTERRUPTED else "FAILED")
        if study is not None and unfinished_reason(reason):
            with contextlib.suppress(Exception):  # the next search (or audit --fix) queues it then
                retry(study, _frozen(study, trial))

    def _observers(self, trial) -> list:
        study = getattr(trial, "study", None)
        if study is None or isinstance(study.pruner, optuna.pruners.NopPruner) or len(study.directions) > 1:
            # Intermediate values only feed a pruner; without one, skip the storage writes. Optuna
            # prunes no multi-objective study (its Trial.report refuses one).
            return []
        if not config.per_epoch(self.objectives[0]):  # a final value: nothing to report along the way
            self._said_once(f"harness: objective {self.objectives[0]} is a final value, not a per-epoch one: "
                            "the pruner prunes no trial")
            return []
        return [_Reporter(trial, self.report_every, self.objectives[0])]

    def _check_study(self, trial) -> None:
        """A study with as many directions as this objective returns values (else each trial would FAIL),
        that keeps the names of its objectives (so a later search cannot resume it with others)."""
        study = getattr(trial, "study", None)
        if study is None or study.study_name in self._named:
            return
        if len(study.directions) != len(self.objectives):
            raise UsageError(f"the study has {len(study.directions)} direction(s), the objective returns "
                             f"{len(self.objectives)} value(s) ({', '.join(self.objectives)}); create the study with "
                             f"directions={objectives_module.directions(self.objectives)}")
        objectives_module.name_study(study, self.objectives)
        self._named.add(study.study_name)

    def _tracker_for(self, trial):
        if not self.track or getattr(trial, "study", None) is None:
            return None
        with self._lock:
            if self.tracker is None:
                self.tracker = StudyTracker(trial.study, self.experiment, data=self._host_data, **self._tracker_options)
        return self.tracker

    def close(self) -> list[BaseException]:
        """Write the study summary and wait until every trial's run is in the store."""
        with self._lock:
            tracker, self.tracker = self.tracker, None
        return tracker.close() if tracker else []

    def __enter__(self) -> "Objective":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
