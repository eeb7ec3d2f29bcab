"""A trial's way through a search, alone or stacked with others: its config, its run, its training,
and its wrap-up when it finishes or is cut short."""
from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import optuna

from .. import config, signals, tracking, training
from ..config import TrainConfig
from ..errors import ExperimentCodeError, UsageError, described, experiment_exit
from ..loop import History, StopTraining
from ..schema import (FAIL_REASON_ATTR, METRICS_ATTR, PAIR_TRIAL_PARAM, RESUMED_FROM_TAG, RESUMED_TAG, RUN_ATTR,
                      WORKER_ATTR)
from . import objectives as objectives_module
from . import space as space_module
from .durable.journal import JournalWriteError
from .options import TrialOptions
from .recorder import TrackingFailed, TrialEnd, TrialRecorder, TrialStart
from .durable.workers import INTERRUPTED, identity, retry, unfinished_reason


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


@dataclass
class TrialRun:
    """One trial on its way through training: what is known of it so far, for the wrap-up of a trial cut short."""
    trial: object
    recorder: TrialRecorder | None = None
    pending: object = None  # the Future of its run's id
    cfg: TrainConfig | None = None
    observers: list = field(default_factory=list)
    history: History = field(default_factory=History)  # kept if training is cut short
    result: training.TrainResult | None = None  # once trained
    error: ExperimentCodeError | None = None  # why the experiment's code failed it, if it did
    resume: dict | None = None  # the checkpoint an earlier attempt at its configuration left, to go on from


class Told(NamedTuple):
    """What ``study.tell`` gets for a trial of a batch: its state, and its value(s) when COMPLETE."""
    state: str
    value: float | tuple | None


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


class _Linking:
    """Loop observer: stores the trial's run id as soon as its run is created (so that even a trial
    whose worker is killed points at its run), and stops training at the first failed tracking
    write (a trial that cannot be recorded is not worth finishing)."""

    def __init__(self, trial, recorder: TrialRecorder, pending):
        self.trial, self.recorder, self.pending = trial, recorder, pending

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.recorder.check()
        if self.pending is not None and self.pending.done() and not self.pending.exception():
            self.trial.set_user_attr(RUN_ATTR, self.pending.result())
            self.pending = None


class Stacker(Protocol):
    """Trains several configs as one stacked model, each member as it trains alone (harness.fast.batched)."""
    MIN_STACK: int

    def stack_key(self, cfg) -> tuple: ...

    def refusal(self, cfg, experiment, data) -> str | None: ...

    def train_stack(self, cfgs, experiment, data, *, observers, histories) -> list: ...


class TrialRunner:
    """Trains the trials of one ``Objective``: ``recorder_for(trial)`` gives the recorder of a
    trial's run (None: the trial is not tracked). Without ``options.stacker`` a batch's trials
    train one at a time."""

    def __init__(self, options: TrialOptions, recorder_for):
        self.options, self.objectives, self.experiment = options, options.objectives, options.experiment
        self.data = options.data.to(options.base.device)
        self._recorder_for = recorder_for
        self._lock = threading.Lock()
        self._worker = identity()
        self._refusals: dict[tuple, str | None] = {}  # (stack key, loss) -> why it is not stacked (None: it is)
        self._named: set[str] = set()  # studies checked by _check_study
        self._reasons: set[str] = set()  # why trials failed in the experiment's code, said once each

    def train(self, run: TrialRun) -> None:
        every, seconds = self.options.checkpoint_every, self.options.checkpoint_seconds
        checkpoints = run.recorder.checkpoints(run.trial, run.pending, every, seconds) \
            if run.recorder and run.pending is not None and (every or seconds) else None
        def refused(why: str) -> None:
            self._said_once(f"harness: trial {run.trial.number}: its earlier attempt's checkpoint refused: {why}; "
                            "it trains from epoch 0")
            if run.recorder and run.pending is not None:
                run.recorder.restarted(run.trial, run.pending)

        run.result = training.train_from(run.cfg, self.experiment, self.data, run.observers, run.history,
                                          checkpoints, run.resume, refused=refused)
        self._check_finals(run)

    def _check_finals(self, run: TrialRun) -> None:
        """A tracked run's final values beside its curves, as its record will log them."""
        if run.recorder:
            tracking.check_logged(self.experiment, run.result.history.values, run.result.scalars,
                                  objectives_module.logged_names(self.objectives))

    def said(self, reason: str) -> None:
        """One line on stderr for each new reason a trial failed in the experiment's code."""
        self._said_once(f"harness: a trial failed, the search goes on: {reason}")

    def _said_once(self, line: str) -> None:
        with self._lock:
            if line in self._reasons:
                return
            self._reasons.add(line)
        print(line, file=sys.stderr)

    def start(self, runs: list[TrialRun]) -> None:
        """Everything before training, filled into each run step by step: its worker, its config,
        its run (created in the background, a batch's together, those of the configurations made
        so far also when a later one raises) and the observers that report, prune and link the run."""
        options = self.options
        try:
            for run in runs:
                trial = run.trial
                self._check_study(trial)
                if getattr(trial, "study", None) is not None:
                    # Lets the next worker (or `harness audit --fix`) tell a crashed trial from a running one.
                    trial.set_user_attr(WORKER_ATTR, self._worker)
                    _drop_inherited_reason(trial)
                run.recorder = self._recorder_for(trial)
                try:
                    values = space_module.sample(trial, options.space, options.base.chosen())
                    if getattr(trial, "study", None) is not None:  # the run early-stops the way the study selects
                        values["direction"] = trial.study.directions[0].name.lower()
                    run.cfg = config.validate(config.with_values(options.base, values, self.experiment),
                                              self.experiment, self.data.n_train)
                except ValueError as exc:  # UsageError too; Optuna's for a queued choice the space lacks
                    run.error, queued, drawn = _queued_misfit(trial, exc)
                    if run.recorder:
                        known = {"lr", "epochs", PAIR_TRIAL_PARAM, *(p.name for p in options.space.params)}
                        params = {k: str(v)[:250] for k, v in queued.items() if k in known}
                        params.update(space_module.logged_params(drawn))  # as a trained trial's run logs them
                        run.recorder.record_refused(trial, params, str(run.error))
        finally:
            tracked = [run for run in runs if run.recorder and run.cfg is not None]
            tags = {id(run): self._resumed(run) for run in tracked}
            if tracked:
                # Held: a signal between submitting the runs and keeping their futures would leave
                # runs their trials never point at; one that came is acted on once they are kept.
                with signals.deferred():
                    pending = tracked[0].recorder.start_trials([TrialStart(run.trial, run.cfg, tags[id(run)])
                                                                for run in tracked])
                    for run, future in zip(tracked, pending):
                        run.pending = future
        for run in runs:  # a tracked run's names checked first: no observer may end its epoch before
            tracked = run.recorder is not None and run.pending is not None
            run.observers = ([tracking.LoggedNames(self.experiment)] if tracked else []) + self._observers(
                run.trial) + ([_Linking(run.trial, run.recorder, run.pending),
                               run.recorder.live(run.trial, run.pending, run.history)] if tracked else [])

    def finish(self, runs: list[TrialRun]) -> list[str]:
        """Trained trials' states, their reasons or final selection-data values, and their runs'
        records (a batch's written together); held against signals. Where drawing a record's figure
        asked to stop (TrialRecorder.stopped), the study stops once these trials are told."""
        states = []
        for run in runs:
            history = run.result.history
            states.append("FAIL" if run.result.diverged else "PRUNED" if history.stopped else "COMPLETE")
        taken = set()
        with signals.deferred(on_signal=lambda: _stop(runs[0].trial)):
            for number, (run, state) in enumerate(zip(runs, states)):
                try:
                    if state == "FAIL":
                        run.trial.set_user_attr(FAIL_REASON_ATTR, run.result.history.stopped)
                    elif state == "COMPLETE":
                        run.trial.set_user_attr(METRICS_ATTR, objectives_module.selection_split(self.objectives,
                                                                                              run.result))
                except optuna.exceptions.UpdateFinishedTrialError:
                    # Another process closed it while this one trained (audit --fix, or a search that
                    # took this worker for dead) and queued its configuration again: its record stays
                    # as that process left it, and the search goes on (the loop's tell skips it).
                    taken.add(number)
                    states[number] = "FAIL"
                    self._said_once(f"harness: trial {run.trial.number} was closed by another process while this "
                                    "one trained it: its result is not recorded, its configuration is queued again")
            tracked = [TrialEnd(run.trial, run.pending, run.result, state)
                       for number, (run, state) in enumerate(zip(runs, states))
                       if run.recorder and number not in taken]
            if tracked:
                runs[0].recorder.end_trials(tracked)
                if runs[0].recorder.stopped is not None:  # its figure's code asked to stop: these trials stand
                    runs[0].trial.study.stop()
        return states

    def _resumed(self, run: TrialRun) -> dict[str, str]:
        """A retried trial goes on from the last checkpoint an earlier attempt left, where one is usable:
        kept in ``run.resume``; the tags that link its new run to that attempt's."""
        study = getattr(run.trial, "study", None)
        if study is None or not (self.options.checkpoint_every or self.options.checkpoint_seconds):
            return {}
        try:
            state, source = run.recorder.resumable(_frozen(study, run.trial), run.cfg)
        except Exception as exc:  # a store that cannot be read now: the trial trains from epoch 0
            print(f"harness: trial {run.trial.number}: its earlier attempt's checkpoint could not be read "
                  f"({described(exc)}); it trains from epoch 0", file=sys.stderr)
            return {}
        if state is None:
            return {}
        run.resume = state
        return {RESUMED_TAG: str(state["epochs_done"]), RESUMED_FROM_TAG: source}

    def end_unfinished(self, run: TrialRun, exc: BaseException) -> None:
        """A trial cut short: record why, close its run with the curves so far, and queue its
        configuration again when the cause was not the configuration itself."""
        trial = run.trial
        reason = failure_reason(exc)
        study = getattr(trial, "study", None)
        with contextlib.suppress(Exception):  # the storage may be what failed
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
        if run.recorder and run.cfg is not None:
            with contextlib.suppress(TrackingFailed):
                run.recorder.end_interrupted_trial(trial, run.pending, run.cfg, run.history, reason=reason,
                                                   run_status="KILLED" if reason == INTERRUPTED else "FAILED")
        if study is not None and unfinished_reason(reason):
            with contextlib.suppress(Exception):  # the next search (or audit --fix) queues it then
                retry(study, _frozen(study, trial))

    def run_batch(self, trials: list) -> list[Told]:
        """``Objective.run_batch``: the trials started together, trained in stacks where their
        configurations stack, each finished as ``Objective.__call__`` finishes one."""
        if len(trials) > self.options.batch:  # up to it, checked with the options
            objectives_module.check_batch(self.objectives, len(trials), flag="a batch of")
        runs = []
        try:
            with signals.interruptible():
                runs = [TrialRun(trial) for trial in trials]
                self.start(runs)
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
            error = experiment_exit(exc, max((r.history.epochs_run for r in runs), default=0)) or exc
            with signals.deferred():  # a second Ctrl-C must not cut the wrap-up short
                for run in runs:
                    self.end_unfinished(run, error)
            if error is exc:
                raise
            raise error from None  # an Exception: Optuna closes the trials, the search stops (Objective.__call__)
        for run in runs:
            if run.error is not None:
                with signals.deferred():
                    self.end_unfinished(run, run.error)
                self.said(str(run.error))
        trained = [run for run in runs if run.error is None]
        states = dict(zip(map(id, trained), self.finish(trained) if trained else []))
        return [Told("FAIL", None) if run.error is not None else
                Told(states[id(run)], objectives_module.values(self.objectives, run.result)
                     if states[id(run)] == "COMPLETE" else None) for run in runs]

    def _train_group(self, group: list[TrialRun]) -> None:
        """One run alone, or a stack of them, trained; each run gets its result."""
        if len(group) == 1:
            self.train(group[0])
            return
        stacked = self.options.stacker.train_stack([r.cfg for r in group], self.experiment, self.data,
                                      observers=[r.observers for r in group], histories=[r.history for r in group])
        for run, result in zip(group, stacked):
            run.result = result
            try:
                self._check_finals(run)
            except ExperimentCodeError as exc:  # this member's values: the others go on
                run.error = exc

    def _stacks(self, runs: list[TrialRun]) -> list[list[TrialRun]]:
        """The runs grouped into stacks; a configuration that cannot be stacked is a group of its
        own (said once per kind, on stderr)."""
        stacker = self.options.stacker
        if stacker is None:
            return [[run] for run in runs]
        groups: dict[tuple, list] = {}
        for run in runs:
            key = stacker.stack_key(run.cfg)
            checked = (key, run.cfg.loss)  # a loss may change the last bits a stack gives
            if checked not in self._refusals:
                reason = self._refusals[checked] = stacker.refusal(run.cfg, self.experiment, self.data)
                if reason and list(self._refusals.values()).count(reason) == 1:  # said once per reason
                    print(f"harness: trials trained one at a time, not stacked: {reason}", file=sys.stderr)
            # A trial going on from a checkpoint trains alone: a stack starts every member at epoch 0.
            alone = self._refusals[checked] is not None or run.resume is not None
            groups.setdefault(("alone", run.trial.number) if alone else key, []).append(run)
        # A stacked epoch costs about what 3 epochs alone cost on a small model (vmap's own
        # overhead, benchmarks/batched_search.py): fewer members train faster one at a time.
        return [part for group in groups.values()
                for part in ([group] if len(group) >= stacker.MIN_STACK else [[r] for r in group])]

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
        return [_Reporter(trial, self.options.report_every, self.objectives[0])]

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
