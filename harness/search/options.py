"""A search's inputs, checked once: ``SearchOptions.from_args`` for the CLI (and MLproject, which
calls it), ``TrialOptions.of`` for ``Objective``'s Python callers. Every refusal comes before any
store is touched, so a refused search writes nothing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .. import config, schema, training
from ..config import TrainConfig
from ..errors import UsageError
from ..experiment import Data, Experiment, load
from ..tracking import check_experiment_offline, default_tracking_uri
from ..urls import check_credentials, redact
from . import objectives as objectives_module
from . import space as space_module
from . import study as study_module
from .limits import CHECKPOINT_SECONDS, MAX_BATCH, MAX_N_JOBS, MAX_STUDY_NAME
from .publish import MODELS
from .space import SearchSpace

@dataclass(frozen=True)
class TrialOptions:
    """What every trial of a search shares: ``Objective``'s inputs, checked."""
    experiment: Experiment
    data: Data  # on the host: the figures are drawn from it
    space: SearchSpace
    base: TrainConfig  # each trial's config is this with its sampled values, then validated
    objectives: tuple[str, ...]
    report_every: int
    batch: int = 1
    mlflow_experiment: str | None = None
    trial_figures: bool = False
    study_tags: dict[str, str] = field(default_factory=dict)
    study_params: dict[str, str] = field(default_factory=dict)
    importance: bool = False  # the params' importances in the study's summary too (see summary._plots)
    checkpoint_every: int | None = None  # a trial's checkpoints (see checkpoint.Checkpoints); None: off
    checkpoint_seconds: float | None = None
    # The fast paths a command or Objective hands in (harness/fast/), None: the public ones, the same
    # records. ``sql_writer(client)``: a sink.DirectWriter for that store, or None where it does not
    # apply; ``stacker``: trains stackable trials of a batch as one model (see trials.Stacker).
    sql_writer: Callable | None = None
    stacker: object | None = None

    @classmethod
    def of(cls, experiment: str | Experiment = "linear_regression", space: SearchSpace | None = None, *,
           mlflow_experiment: str | None = None, report_every: int | None = None, trial_figures: bool = False,
           seed: int = 42, device: str = "auto", base: dict | None = None, data=None,
           study_tags: dict[str, str] | None = None, batch: int = 1, study_params: dict[str, str] | None = None,
           objectives=objectives_module.DEFAULT, importance: bool = False, checkpoint_every: int | None = None,
           checkpoint_seconds: float | None = None, sql_writer: Callable | None = None,
           stacker: object | None = None) -> "TrialOptions":
        """``Objective``'s keyword arguments, checked (see Objective.__init__)."""
        objectives = objectives_module.parse(objectives, flag="objectives")
        batch = config.positive_int("batch", batch)
        objectives_module.check_batch(objectives, batch, flag="batch")
        experiment = experiment if isinstance(experiment, Experiment) else load(experiment)
        data = data if data is not None else experiment.load_data()
        space = space or space_module.resolve(experiment, n_train=data.n_train)
        fixed = objectives_module.fixed_values(
            {**(base or {}), "experiment": experiment.reference or experiment.name, "seed": seed, "device": device},
            objectives, data.has_valid, experiment.name)
        resolved, _ = config.resolve(fixed, experiment=experiment, n_train=data.n_train)
        # None: the space's cadence (space.report_cadence), which the CLI uses on embedded storages too.
        every = (space_module.report_cadence(space) if report_every is None
                 else config.positive_int("report_every", report_every))
        checkpoint_every, checkpoint_seconds = config.checkpoint_policy(checkpoint_every, checkpoint_seconds, 0.0)
        return cls(experiment, data, space, resolved, objectives, every, batch, mlflow_experiment, trial_figures,
                   dict(study_tags or {}), dict(study_params or {}), importance=importance,
                   checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                   sql_writer=sql_writer, stacker=stacker)


@dataclass(frozen=True)
class SearchOptions:
    """`harness search`'s flags, checked: the study, how it samples and prunes, and its trials."""
    trials: TrialOptions
    study_name: str
    storage_url: str  # checked (study.check_storage): opening it does not check again
    n_trials: int
    max_trials: int | None
    timeout: float | None
    n_jobs: int
    heartbeat: int
    direction: str
    sampler_name: str
    sampler: object
    pruner: object
    independent: tuple[str, ...]  # categorical axes the sampler draws at random
    allow_changed_experiment: bool
    progress: bool
    models: str = "best"  # which trials become MLflow Models at the end: one of MODELS (see search.publish)
    register: str | None = None  # the registered model the best trial becomes a version of

    @classmethod
    def from_args(cls, args, *, sql_writer: Callable | None = None, stacker: object | None = None) -> "SearchOptions":
        """Every input checked before any store is touched; the fast paths as the command hands them in."""
        experiment = load(args.experiment or "linear_regression")
        data = experiment.load_data()
        space = space_module.resolve(experiment, args.space, {"lr": args.lr_range, "epochs": args.epochs_range,
                                                              "pairs": args.pairs, **parse_tunes(args.tune)},
                                     n_train=data.n_train)
        # The fixed values of every trial. Each trial's optimizer and loss come from the space's pairs,
        # so the fixed values must suit every pair (momentum, say, only sgd and rmsprop), and the
        # experiment's code must train with them: checked here, so a refused search writes nothing.
        objectives = objectives_module.parse(args.objectives, first=args.objective)
        base = config.with_flags(config.parse_sets(args.set), {"experiment": experiment.reference,
                                                               "device": args.device})
        from_file = config.read_file(args.config) if args.config else {}
        fixed = objectives_module.fixed_values({**from_file, **base}, objectives, data.has_valid, experiment.name)
        base.update({k: fixed[k] for k in ("objective", "valid_fraction") if k in fixed})
        pairs = [pair.split("+") for pair in space.pairs]
        cfg, _ = config.resolve({**base, "optimizer": pairs[0][0], "loss": pairs[0][1]}, file=args.config,
                                experiment=experiment, n_train=data.n_train)
        # Every pair, as its trials get it (the base with that pair; what was given kept, so that a
        # value that does not suit the pair is refused), put through one training step: an
        # experiment whose code cannot train one of them (a loss that does not fit its outputs) is
        # refused in one line before any store is touched.
        given = {k: v for k, v in {**from_file, **base}.items() if v is not None and k != "experiment"}
        cfgs = [cfg] + [config.validate(config.with_values(cfg, {**given, "optimizer": optimizer, "loss": loss},
                                                           experiment), experiment, data.n_train)
                        for optimizer, loss in pairs[1:]]
        for checked in cfgs:  # a scalar named as an objective's value would be replaced by it
            training.preflight(checked, experiment, data, reserved=objectives_module.logged_names(objectives))
        searched = {p.name for p in space.params}
        for param in space.params:  # a schedule's setting searched where no trial has that schedule
            if param.schedulers is not None and "scheduler" not in searched and cfg.scheduler not in param.schedulers:
                raise UsageError(f"search-space {param.name} applies to schedulers {', '.join(param.schedulers)}, "
                                 f"and every trial's scheduler is {cfg.scheduler!r}: --set scheduler=NAME, or "
                                 f"search it with --tune scheduler=[...]")
        config.one_of("sampler", args.sampler, study_module.SAMPLERS)
        # Not given ("" from MLproject): median, or none for a study of two objectives, which Optuna cannot prune.
        pruner_name = args.pruner or ("median" if len(objectives) == 1 else "none")
        config.one_of("pruner", pruner_name, study_module.PRUNERS)
        objectives_module.check_strategy(objectives, args.sampler, pruner_name, args.pruner_args)
        pruner_args = study_module.pruner_settings(pruner_name, args.pruner_args)
        pruner = study_module.make_pruner(pruner_name, pruner_args)
        config.one_of("direction", args.direction, study_module.DIRECTIONS)
        # numpy's generators, which Optuna's samplers use, take seeds below 2**32.
        sampler_seed = config.int_in("--seed", args.seed, 0, 2 ** 32 - 1) if args.seed not in (None, "") else None
        batch = config.int_in("--batch", args.batch, 1, MAX_BATCH)
        objectives_module.check_batch(objectives, batch)
        n_jobs = config.int_in("--n-jobs", args.n_jobs, 1, MAX_N_JOBS)
        if batch > 1 and n_jobs > 1:
            raise UsageError(f"--batch {batch} with --n-jobs {n_jobs}: choose one (a batch already trains {batch} "
                             "trials at once)")
        check_credentials(default_tracking_uri(), "MLFLOW_TRACKING_URI")
        refused = check_experiment_offline(args.mlflow_experiment, default_tracking_uri(), experiment.name)
        if refused:
            raise UsageError(refused)
        storage_url = args.storage or study_module.DEFAULT_STORAGE
        study_module.check_storage(storage_url)
        trials = TrialOptions(
            experiment, data, space, cfg, objectives, batch=batch, mlflow_experiment=args.mlflow_experiment,
            trial_figures=config.switch("--trial-figures", args.trial_figures),
            importance=config.switch("--importance", args.importance),
            **dict(zip(("checkpoint_every", "checkpoint_seconds"), config.checkpoint_policy(
                args.checkpoint_every, args.checkpoint_seconds, CHECKPOINT_SECONDS))),
            # Each report is a storage write and each pruning check a read of the study: every epoch
            # cost 1.9x (journal) and 17x (SQLite) an in-memory search (benchmarks/pruning_cadence.py),
            # and on a database server each is a round trip as well.
            report_every=config.positive_int("--report-every", args.report_every) if args.report_every
            else space_module.report_cadence(space) if study_module.storage_scheme(storage_url) in ("journal", "sqlite")
            else max(10, space_module.report_cadence(space)),
            study_tags={schema.STORAGE_TAG: redact(storage_url), schema.SAMPLER_TAG: args.sampler,
                        schema.PRUNER_TAG: pruner_name},
            study_params={schema.PRUNER_ARGS_PARAM: study_module.pruner_description(pruner_name, pruner_args)},
            sql_writer=sql_writer, stacker=stacker)
        return cls(
            trials, study_name=study_name(args.study_name or f"{experiment.name}-search"),  # "" from MLproject
            storage_url=storage_url, n_trials=config.positive_int("--n-trials", args.n_trials),
            max_trials=config.positive_int("--max-trials", args.max_trials) if args.max_trials else None,
            timeout=config.positive_float("--timeout", args.timeout) if args.timeout else None, n_jobs=n_jobs,
            heartbeat=config.int_in("--heartbeat", args.heartbeat, 1, study_module.MAX_HEARTBEAT_S),
            direction=args.direction, sampler_name=args.sampler,
            sampler=study_module.make_sampler(args.sampler, sampler_seed, space), pruner=pruner,
            independent=tuple(study_module.independent_axes(args.sampler, space)),
            allow_changed_experiment=config.switch("--allow-changed-experiment", args.allow_changed_experiment),
            progress=not args.no_progress, **published(args.models, args.register))


def published(models: str, register: str | None) -> dict:
    """--models and --register's name, checked (MLflow's rule for the name); "" (MLproject's default
    for --register) registers nothing."""
    if models not in MODELS:
        raise UsageError(f"--models {models[:80]!r}: one of {', '.join(MODELS)}")
    if not register:
        return {"models": models, "register": None}
    if models == "none":
        raise UsageError(f"--register {register[:80]!r} registers the best trial's MLflow Model: not with --models none")
    from ..models import check_name

    check_name(register)
    return {"models": models, "register": register}


def study_name(name: str) -> str:
    """A study name that every store and the MLflow UI's filters can hold."""
    if len(name) > MAX_STUDY_NAME or not name.isprintable() or not name.strip():
        shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"
        raise UsageError(f"--study-name {shown}: at most {MAX_STUDY_NAME} printable characters")
    if "'" in name and '"' in name:
        raise UsageError(f"--study-name {name[:80]!r} holds both ' and \": MLflow's filters could never find its runs")
    return name


def parse_tunes(tunes: list[str] | None) -> dict:
    """``--tune NAME[=RANGE]`` flags as search-space entries; RANGE is YAML (a list or a mapping)."""
    entries: dict = {}
    for tune in tunes or ():
        name, eq, text = tune.partition("=")
        name = name.strip()
        if not name:
            raise UsageError(f"--tune takes NAME or NAME=RANGE, got {tune!r}")
        value = config.parse_yaml(text, f"--tune {name} range") if eq else True
        if value is None:  # "--tune x=" would silently search nothing
            raise UsageError(f"--tune {name}= needs a range: [low, high], a list of choices or a mapping; "
                             f"--tune {name} alone takes its declared range")
        entries[name] = value
    return entries
