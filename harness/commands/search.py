"""`harness search`: an Optuna study over lr, epochs and optimizer/loss pairs, every trial an MLflow run."""
from __future__ import annotations

import shlex
import sys
import time

from .. import signals

from .train import add_config_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search lr, epochs and optimizer/loss pairs with Optuna")
    add_config_arguments(p)
    p.add_argument("--study-name", help="Optuna study; an existing one is resumed (default: <experiment>-search)")
    p.add_argument("--allow-changed-experiment", action="store_true",
                   help="resume a study whose experiment file changed since it was created (its sha256 differs); "
                        "the study records the change and the trial it starts at")
    p.add_argument("--n-trials", default="20", help="trials this invocation runs (default: 20)")
    p.add_argument("--max-trials", help="cap on the study's total trials, across invocations and workers")
    p.add_argument("--timeout", help="stop starting trials after this many seconds")
    p.add_argument("--storage", help="Optuna storage: journal:PATH, sqlite:///PATH, postgresql://... "
                                     "(default: journal:optuna_journal.log)")
    p.add_argument("--heartbeat", default="10", help="RDB storages: seconds between a trial's heartbeats; a "
                                                      "trial silent for 3x that is failed and retried (default: 10)")
    p.add_argument("--objectives", nargs="+", metavar="NAME",
                   help="what a trial is selected on: valid_loss (default) or another validation metric, then "
                        "optionally one of epochs (the epochs it trained), train_seconds (its training time): a "
                        "multi-objective study, its Pareto front on the parent run; no pruner")
    p.add_argument("--sampler", default="tpe",
                   help="tpe (default; Optuna's: multivariate with one objective, and constant_liar so that parallel "
                        "workers, --n-jobs and --batch spread their trials), random, grid, qmc (scrambled Sobol: an even "
                        "sweep), cmaes (CMA-ES; one objective only), gp (Gaussian process) or nsga2 (NSGA-II, for "
                        "two objectives); qmc and cmaes draw the optimizer/loss pair and other choices at random")
    p.add_argument("--seed", help="the sampler's seed (default: none); the model's seed comes from the config")
    p.add_argument("--pruner",
                   help="median (default), percentile, hyperband, sha (successive halving), wilcoxon or none "
                        "(the default, and the only one, with two --objectives); \"\" is the default, as "
                        "MLproject passes it")
    p.add_argument("--pruner-args", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="the pruner's settings, Optuna's names: median n_startup_trials, n_warmup_steps, "
                        "interval_steps, n_min_trials; percentile the same and percentile (default 25); hyperband "
                        "min_resource, max_resource, reduction_factor, bootstrap_count; sha min_resource, "
                        "reduction_factor, min_early_stopping_rate, bootstrap_count; wilcoxon p_threshold, "
                        "n_startup_steps")
    p.add_argument("--objective", metavar="METRIC",
                   help="the metric trials are selected, pruned and early-stopped on: a per-epoch validation (or "
                        "training) metric the runs record, e.g. valid_accuracy (default: valid_loss); never a test metric")
    p.add_argument("--direction", default="minimize", help="minimize|maximize the objective metric")
    p.add_argument("--n-jobs", default="1", help=f"trials run in parallel threads, at most {MAX_N_JOBS} (default: 1)")
    p.add_argument("--batch", default="1", metavar="K",
                   help="train K trials at a time as one stacked model where their configurations stack (same "
                        "batch size and shapes, any optimizer/loss pair; models without matrix products, dropout "
                        "or buffers), each still its own trial and run, bit for bit as alone (default: 1)")
    p.add_argument("--space", metavar="FILE", help="YAML or JSON search space (keys: lr, epochs, pairs, grid_points)")
    p.add_argument("--lr-range", nargs=2, metavar=("LOW", "HIGH"), help="log-uniform lr range")
    p.add_argument("--epochs-range", nargs=2, metavar=("LOW", "HIGH"), help="integer epochs range")
    p.add_argument("--pairs", nargs="+", metavar="OPT+LOSS", help="allowed optimizer+loss pairs")
    p.add_argument("--tune", action="append", metavar="NAME[=RANGE]",
                   help="also search a hyperparameter: its declared range (--tune hidden), [low, high] "
                        "(--tune weight_decay=[1e-6,1e-2]), choices (--tune batch_size=[32,64,128]) or a YAML "
                        "mapping (--tune 'lr2={low: 0.1, high: 1, log: true}'); repeatable")
    p.add_argument("--report-every", help="report the objective metric to the pruner every N epochs (default: a "
                                          "twentieth of the space's largest epochs, at least 1: 20 for the "
                                          "default 50-400; at least 10 on a database server)")
    p.add_argument("--trial-figures", action="store_true", help="render both PNG figures for every trial")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


# Optuna starts a thread per job, each training its own model beside the others in this one
# process: past a few per core they only wait on each other (and the GIL), and past the process's
# thread limit Optuna dies mid-search. More parallelism is more worker processes (scale-out).
MAX_N_JOBS = 64


def _options(args):
    """Every input checked before any store is touched."""
    from .. import config, training
    from ..errors import UsageError
    from ..experiment import load
    from ..search import objectives as objectives_module
    from ..search import space as space_module
    from ..search import study as study_module

    experiment = load(args.experiment or "linear_regression")
    data = experiment.load_data()
    space = space_module.resolve(experiment, args.space, {"lr": args.lr_range, "epochs": args.epochs_range,
                                                          "pairs": args.pairs, **parse_tunes(args.tune)},
                                 n_train=data.n_train)
    # The fixed values of every trial. Each trial's optimizer and loss come from the space's pairs,
    # so the fixed values must suit every pair (momentum, say, only sgd and rmsprop), and the
    # experiment's code must train with them: checked here, so a refused search writes nothing.
    objectives = objectives_module.parse(args.objectives, first=args.objective)
    base = config.with_flags(config.parse_sets(args.set), {"experiment": experiment.reference, "device": args.device})
    fixed = objectives_module.fixed_values({**(config.read_file(args.config) if args.config else {}), **base},
                                           objectives, data.has_valid, experiment.name)
    base.update({k: fixed[k] for k in ("objective", "valid_fraction") if k in fixed})
    # Every pair, put through one training step: an experiment whose code cannot train one of them
    # (a loss that does not fit its outputs) is refused in one line before any store is touched.
    cfgs = [config.resolve({**base, "optimizer": optimizer, "loss": loss}, file=args.config, experiment=experiment,
                           n_train=data.n_train)[0] for optimizer, loss in (pair.split("+") for pair in space.pairs)]
    for checked in cfgs:
        training.preflight(checked, experiment, data)
    cfg = cfgs[0]
    searched = {p.name for p in space.params}
    for param in space.params:  # a schedule's setting searched where no trial has that schedule
        if param.schedulers is not None and "scheduler" not in searched and cfg.scheduler not in param.schedulers:
            raise UsageError(f"search-space {param.name} applies to schedulers {', '.join(param.schedulers)}, and "
                             f"every trial's scheduler is {cfg.scheduler!r}: --set scheduler=NAME, or search it "
                             f"with --tune scheduler=[...]")
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
    from ..search.batch import MAX_BATCH

    batch = config.int_in("--batch", args.batch, 1, MAX_BATCH)
    objectives_module.check_batch(objectives, batch)
    n_jobs = config.int_in("--n-jobs", args.n_jobs, 1, MAX_N_JOBS)
    if batch > 1 and n_jobs > 1:
        raise UsageError(f"--batch {batch} with --n-jobs {n_jobs}: choose one (a batch already trains {batch} "
                         "trials at once)")
    from ..tracking import default_tracking_uri
    from ..urls import check_credentials

    check_credentials(default_tracking_uri(), "MLFLOW_TRACKING_URI")
    from ..tracking import check_experiment_offline

    refused = check_experiment_offline(args.mlflow_experiment, default_tracking_uri())
    if refused:
        raise UsageError(refused)
    storage_url = args.storage or study_module.DEFAULT_STORAGE
    study_module.check_storage(storage_url)
    return {
        "experiment": experiment, "cfg": cfg, "data": data, "space": space, "storage_url": storage_url,
        "study_name": study_name(args.study_name or f"{experiment.name}-search"),  # "" from MLproject = not given
        "trials": config.positive_int("--n-trials", args.n_trials),
        "max_trials": config.positive_int("--max-trials", args.max_trials) if args.max_trials else None,
        "timeout": config.positive_float("--timeout", args.timeout) if args.timeout else None,
        "n_jobs": n_jobs, "batch": batch,
        "heartbeat": config.int_in("--heartbeat", args.heartbeat, 1, study_module.MAX_HEARTBEAT_S),
        # Each report is a storage write and each pruning check a read of the study: every epoch
        # cost 1.9x (journal) and 17x (SQLite) an in-memory search (benchmarks/pruning_cadence.py),
        # and on a database server each is a round trip as well.
        "report_every": config.positive_int("--report-every", args.report_every) if args.report_every
        else space_module.report_cadence(space) if study_module.storage_scheme(storage_url) in ("journal", "sqlite")
        else max(10, space_module.report_cadence(space)),
        "sampler": study_module.make_sampler(args.sampler, sampler_seed, space),
        "pruner": pruner, "pruner_name": pruner_name, "objectives": objectives,
        "pruner_args": study_module.pruner_description(pruner_name, pruner_args),
        "independent": study_module.independent_axes(args.sampler, space),
    }


MAX_STUDY_NAME = 250


def study_name(name: str) -> str:
    """A study name that every store and the MLflow UI's filters can hold."""
    from ..errors import UsageError

    if len(name) > MAX_STUDY_NAME or not name.isprintable() or not name.strip():
        shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"
        raise UsageError(f"--study-name {shown}: at most {MAX_STUDY_NAME} printable characters")
    if "'" in name and '"' in name:
        raise UsageError(f"--study-name {name[:80]!r} holds both ' and \": MLflow's filters could never find its runs")
    return name


def parse_tunes(tunes: list[str] | None) -> dict:
    """``--tune NAME[=RANGE]`` flags as search-space entries; RANGE is YAML (a list or a mapping)."""
    from ..config import parse_yaml
    from ..errors import UsageError

    entries: dict = {}
    for tune in tunes or ():
        name, eq, text = tune.partition("=")
        name = name.strip()
        if not name:
            raise UsageError(f"--tune takes NAME or NAME=RANGE, got {tune!r}")
        value = parse_yaml(text, f"--tune {name} range") if eq else True
        if value is None:  # "--tune x=" would silently search nothing
            raise UsageError(f"--tune {name}= needs a range: [low, high], a list of choices or a mapping; "
                             f"--tune {name} alone takes its declared range")
        entries[name] = value
    return entries


def run(args) -> int:
    opts = _options(args)  # every input checked: a refused search writes nothing
    import optuna

    # Optuna would log each failed trial with a traceback (an interrupt too); the summary says what failed.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if opts["independent"]:  # Optuna's own warning would come once per trial and axis
        print(f"harness: --sampler {args.sampler} models numeric axes only; {', '.join(opts['independent'])} "
              "drawn at random", file=sys.stderr)
    study, storage = _open_study(args, opts)
    _recover_stale_trials(study, storage)
    n_trials = _trials_to_run(study, opts)
    if n_trials == 0:
        return 0
    objective = _objective(args, opts)
    started = time.time()
    interrupted, stopped_by = _optimize(study, objective, n_trials, opts, args)
    # Closing the study's record is held against a second Ctrl-C or a SIGTERM (they are acted on
    # once it is written): the parent run is never left RUNNING, the resume hint is printed.
    with signals.deferred(on_signal=lambda: None):
        tracker = objective.tracker
        errors = objective.close()
        failure = stopped_by or (errors[0] if errors else None)
        print(report(study, tracker, time.time() - started, opts["storage_url"], opts["experiment"]))
        return _exit_status(args, study, opts["storage_url"], failure, interrupted or signals.interrupted())


def _open_study(args, opts):
    """The study, resumed or created; the MLflow store is checked (and created) before a new study is written."""
    from ..errors import UsageError
    from ..search import study as study_module

    url = opts["storage_url"]
    study_args = dict(direction=args.direction, space=opts["space"], experiment=opts["experiment"].name,
                      sampler=opts["sampler"], pruner=opts["pruner"], objectives=opts["objectives"],
                      experiment_sha256=opts["experiment"].sha256,
                      allow_changed_experiment=args.allow_changed_experiment)
    storage_args = dict(heartbeat=opts["heartbeat"], max_trials=opts["max_trials"])
    # Opening a journal creates its file: a missing one already says there is no study yet.
    storage = None if study_module.missing_journal(url) else study_module.open_storage(url, **storage_args)
    study = storage and study_module.existing_study(opts["study_name"], storage, **study_args)
    refused = _check_mlflow_store(args.mlflow_experiment)
    if refused:
        raise UsageError(refused)
    if study is None:
        storage = storage or study_module.open_storage(url, **storage_args)
        study = study_module.create_study(opts["study_name"], storage, **study_args)
    else:
        study_module.record_source(study, opts["experiment"].sha256)
    return study, storage


def _trials_to_run(study, opts) -> int:
    """--n-trials, within what --max-trials leaves (queued trials run without being created)."""
    from optuna.trial import TrialState

    from ..search.storages import COUNTED

    if not opts["max_trials"]:
        return opts["trials"]
    counted = study.get_trials(deepcopy=False, states=COUNTED)
    waiting = sum(t.state == TrialState.WAITING for t in counted)
    left = max(opts["max_trials"] - len(counted), 0) + waiting
    if left <= 0:
        print(f"study {study.study_name!r} already has {len(counted)} trials that count toward "
              f"--max-trials {opts['max_trials']}; nothing to run")
    return min(opts["trials"], max(left, 0))


def _objective(args, opts):
    from .. import schema
    from ..search.objective import Objective
    from ..urls import redact

    cfg = opts["cfg"]
    return Objective(opts["experiment"], opts["space"], seed=cfg.seed, device=cfg.device, base=cfg.to_dict(),
                     data=opts["data"], report_every=opts["report_every"], mlflow_experiment=args.mlflow_experiment,
                     trial_figures=args.trial_figures, batch=opts["batch"], objectives=opts["objectives"],
                     study_tags={schema.STORAGE_TAG: redact(opts["storage_url"]), schema.SAMPLER_TAG: args.sampler,
                                 schema.PRUNER_TAG: opts["pruner_name"]},
                     study_params={schema.PRUNER_ARGS_PARAM: opts["pruner_args"]})


def _optimize(study, objective, n_trials: int, opts, args) -> tuple[bool, BaseException | None]:
    """Run the trials. Returns (interrupted, the store failure that stopped them)."""
    from ..search.storages import StudyFull

    try:
        # Signals are held while Optuna records a trial (one landing inside its tell would leave the
        # trial half-told); the objective lets them interrupt training, and a held one stops the
        # study once the trial is recorded.
        with signals.deferred(on_signal=lambda: None):
            if opts["batch"] > 1:
                from ..search import batch

                batch.optimize(study, objective, n_trials, opts["batch"], timeout=opts["timeout"])
            else:
                study.optimize(objective, n_trials=n_trials, timeout=opts["timeout"], n_jobs=opts["n_jobs"],
                               show_progress_bar=not args.no_progress,
                               callbacks=[lambda study, trial: study.stop() if signals.pending() else None])
    except StudyFull:
        pass  # other workers filled the study first: this one is done
    except KeyboardInterrupt:
        return True, None
    except Exception as exc:
        # A store that stopped taking writes ends the search; Optuna may have wrapped the error in
        # its own while closing the trial (an AssertionError when the journal refused the FAIL).
        stopped_by = _store_failure(exc)
        if stopped_by is None:
            raise
        return signals.interrupted(), stopped_by
    return signals.interrupted(), None


def _exit_status(args, study, url: str, failure, interrupted: bool) -> int:
    resume = resume_command(args, study.study_name, url)
    if failure is not None:
        print(f"harness: {_failure_line(failure)}; the search stopped; once the store takes writes again, "
              f"`harness audit --study {shlex.quote(study.study_name)} --fix` closes what was left open, "
              f"then resume with: {resume}", file=sys.stderr)
        return 1
    if interrupted:
        print(f"harness: interrupted; resume with: {resume}", file=sys.stderr)
        return 130
    return 0


def _store_failure(exc: BaseException):
    """The journal or tracking failure behind ``exc`` (following Optuna's wrapping), or None."""
    from ..search.journal import JournalWriteError
    from ..search.tracker import TrackingFailed

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (JournalWriteError, TrackingFailed)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _failure_line(failure: BaseException) -> str:
    text = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    return text if text.startswith(("tracking failed", "cannot write")) else f"tracking failed: {text[:300]}"


def _check_mlflow_store(mlflow_experiment: str | None) -> str | None:
    """Open (create or migrate) the MLflow store, in bounded time, and say why runs cannot go to
    their MLflow experiment (None: they can)."""
    from ..tracking import check_experiment, default_tracking_uri, open_client, unreachable

    uri, started = default_tracking_uri(), time.time()
    try:
        return check_experiment(open_client(uri), mlflow_experiment)
    except Exception as exc:
        raise unreachable("the MLflow tracking store", uri, time.time() - started, exc) from None


def _recover_stale_trials(study, storage) -> None:
    """Trials a dead worker left RUNNING, or that an interrupt or a failed write stopped: fail them
    and queue their configurations again (the tracker closes their runs)."""
    from ..search.audit import recover_stale, recover_unfinished

    by_pid, by_heartbeat = recover_stale(study, storage)
    if by_pid or by_heartbeat:
        print(f"harness: trial(s) {', '.join(map(str, by_pid + by_heartbeat))} were left RUNNING by a worker that "
              "is gone: failed them and queued their configurations again", file=sys.stderr)
    queued = recover_unfinished(study)
    if queued:
        print(f"harness: trial(s) {', '.join(str(n) for n, _ in queued)} were stopped before they finished "
              f"({queued[0][1]}): queued their configurations again", file=sys.stderr)


def report(study, tracker, seconds: float, url: str, experiment) -> str:
    from optuna.trial import TrialState

    from ..search import study as study_module
    from ..schema import PAIR_TRIAL_PARAM, RUN_ATTR
    from ..search.objectives import of_study
    from ..search.summary import selected_on, top_frame

    counts = {s.name: sum(t.state == s for t in study.trials) for s in TrialState if s.is_finished()}
    lines = [f"study {study.study_name!r}: {len(study.trials)} trials "
             f"({', '.join(f'{n} {k.lower()}' for k, n in counts.items() if n)}) in storage "
             f"{study_module.redact(url)}; this run took {seconds:.1f}s"]
    if not counts.get("COMPLETE"):
        return "\n".join(lines + ["no trial completed"])
    if len(study.directions) > 1:
        return "\n".join(lines + _front_report(study, tracker))
    objectives = of_study(study) or ("value",)
    top = top_frame(study, study.get_trials(deepcopy=False), 5, objectives)
    lines.append(selected_on(objectives[0], study.direction.name.lower()).replace("**", "").replace("`", ""))
    top = top.rename(columns={**{c: c.removeprefix("params_") for c in top.columns if c.startswith("params_")},
                              f"params_{PAIR_TRIAL_PARAM}": "optimizer+loss", RUN_ATTR: "mlflow run"})
    lines += ["top trials:", top.to_string(index=False, na_rep="-")]  # "-": not sampled (momentum for adam)
    best_run = study.best_trial.user_attrs.get(RUN_ATTR)
    if tracker is not None:
        from ..tracking import default_tracking_uri, filter_value
        from ..urls import redact

        uri = redact(default_tracking_uri())
        where = f"open {uri}" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
        lines.append(f"compare in MLflow: {where}  "
                     f"(parent run {tracker.parent_run_id}, filter: tags.optuna.study_name = "
                     f"{filter_value(study.study_name)})")
    if best_run:
        from ..experiment import is_builtin

        named = "" if is_builtin(experiment.reference) else f", experiment={experiment.reference!r}"
        lines.append("reload the best model: python -c \"from harness.runs import load_model; "
                     f"print(load_model('{best_run}'{named}).state_dict())\"")
    return "\n".join(lines)


def _front_report(study, tracker) -> list[str]:
    """A study of two objectives: its Pareto front, and where the whole of it is."""
    from ..schema import PAIR_TRIAL_PARAM, PARETO_FRONT_CSV, RUN_ATTR
    from ..search.objectives import of_study
    from ..search.summary import FRONT_SHOWN, front_shown

    objectives = of_study(study) or tuple(f"values_{i}" for i in range(len(study.directions)))
    total, shown = front_shown(study, objectives)
    shown = shown.rename(columns={
        "number": "trial", RUN_ATTR: "mlflow run", f"params_{PAIR_TRIAL_PARAM}": "optimizer+loss",
        **{c: c.removeprefix("params_") for c in shown.columns if c.startswith("params_")}})
    more = f"; all of it in {PARETO_FRONT_CSV} on the parent run" if tracker is not None else ""
    lines = [f"Pareto front: {total} trial(s) that no other trial betters in both {' and '.join(objectives)}"
             f"{more}", shown.to_string(index=False, na_rep="-")]
    if total > FRONT_SHOWN:
        lines.append(f"(and {total - FRONT_SHOWN} more)")
    if tracker is not None:
        from ..tracking import default_tracking_uri
        from ..urls import redact

        lines.append(f"compare: harness compare --study {shlex.quote(study.study_name)} --front  "
                     f"(parent run {tracker.parent_run_id} in {redact(default_tracking_uri())})")
    return lines


def resume_command(args, study_name: str, url: str) -> str:
    from ..urls import redact

    import shlex

    parts = ["harness", "search", "--study-name", study_name, "--storage", redact(url)]
    # Everything that shapes the space or the trials' fixed values: a study resumes only with the same space.
    for flag, value in (("--experiment", args.experiment), ("--config", args.config), ("--space", args.space),
                        ("--lr-range", args.lr_range), ("--epochs-range", args.epochs_range),
                        ("--pairs", args.pairs)):
        if value:
            parts += [flag, *value] if isinstance(value, list) else [flag, value]
    for flag, values in (("--set", args.set), ("--tune", args.tune), ("--pruner-args", args.pruner_args)):
        for value in values or ():
            parts += [flag, value]
    # And how it searched, where not the default: a resume goes on the same way.
    for flag, value, default in (("--objective", args.objective, None), ("--direction", args.direction, "minimize"),
                                 ("--sampler", args.sampler, "tpe"),
                                 ("--pruner", args.pruner, "median"), ("--report-every", args.report_every, None),
                                 ("--batch", args.batch, "1")):
        if value not in (None, "", default):
            parts += [flag, value]
    if args.objectives:  # a study resumes only with its objectives
        parts += ["--objectives", *" ".join(args.objectives).split()]
    return " ".join(shlex.quote(str(p)) for p in parts)
