"""`harness search`: an Optuna study over lr, epochs and optimizer/loss pairs, every trial an MLflow run."""
from __future__ import annotations

import shlex
import sys

from .. import signals
from ..errors import ExperimentExit
from ..schema import CHAMPION_ALIAS
from ..search.limits import MAX_N_JOBS
from ..urls import redact
from .train import add_checkpoint_arguments, add_config_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search lr, epochs and optimizer/loss pairs with Optuna")
    add_config_arguments(p)
    p.add_argument("--study-name", help="Optuna study; an existing one is resumed (default: <experiment>-search)")
    p.add_argument("--allow-changed-experiment", nargs="?", const=True, metavar="BOOL",
                   help="resume a study whose experiment file changed since it was created (its sha256 differs); "
                        "the study records the change and the trial it starts at (a switch: alone, or true|false "
                        "as MLproject passes it)")
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
    p.add_argument("--n-jobs", default="1",
                   help=f"trials in flight at once in this process, at most {MAX_N_JOBS} (default: 1): their "
                        "sampling, pruning checks and tracking overlap, while training itself runs one trial at a time "
                        "(a run's bits must not depend on its neighbours); more training at once is --batch K or "
                        "more worker processes")
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
    p.add_argument("--trial-figures", nargs="?", const=True, metavar="BOOL",
                   help="render both PNG figures for every trial")
    add_checkpoint_arguments(p)  # a trial cut short and queued again goes on from its last checkpoint
    p.add_argument("--importance", nargs="?", const=True, metavar="BOOL",
                   help="also render the params' importances (Optuna's PED-ANOVA) in the study's summary; off by "
                        "default: Optuna's importance module imports scikit-learn, ~1.8 s of every search")
    p.add_argument("--models", default="best", metavar="WHICH",
                   help="which trials are logged as MLflow Models at the end of the invocation: best (default; "
                        "of two objectives, the Pareto front), all (every completed trial) or none (no MLflow "
                        "Model: saves its ~1 s of torch.export and MLflow at the end, which short searches feel; "
                        "the runs keep state_dict.pt and config.json for harness predict)")
    p.add_argument("--register", metavar="NAME",
                   help="register the best trial's MLflow Model as a new version of NAME in the Model Registry "
                        f"and move its alias {CHAMPION_ALIAS!r} to it (models:/NAME@{CHAMPION_ALIAS}); \"\" registers "
                        "nothing, as MLproject passes it when unset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..search.durable.workers import identity
    from ..search.options import SearchOptions
    from ..search.report import report
    from ..search.session import run_search
    from ..fast import batched
    from ..fast.mlflow_sql import DirectWriter

    # Every input checked (a refused search writes nothing); the fast paths handed in.
    options = SearchOptions.from_args(args, sql_writer=DirectWriter.for_client, stacker=batched)
    if options.independent:  # Optuna's own warning would come once per trial and axis
        print(f"harness: --sampler {options.sampler_name} models numeric axes only; "
              f"{', '.join(options.independent)} drawn at random", file=sys.stderr)
    trials = options.trials
    if trials.batch > 1 and (trials.checkpoint_every or trials.checkpoint_seconds):
        print(f"harness: --batch {trials.batch}: trials trained in a stack write no checkpoints (each starts at "
              "epoch 0 with the stack); one trained alone does", file=sys.stderr)
    identity()  # this process's lease (workers.py): a folder that cannot keep it is refused before any store is opened
    outcome = run_search(options)
    if not outcome.ran:
        return 0
    # Held, as the record's closing was: the report and the resume hint are printed whole.
    with signals.deferred(on_signal=lambda: None):
        print(report(outcome.study, outcome.parent_run_id, outcome.seconds, options.storage_url,
                     options.trials.experiment))
        if outcome.published:
            print("\n".join(outcome.published))
        return _exit_status(args, outcome, options.storage_url)


def _exit_status(args, outcome, url: str) -> int:
    study, failure = outcome.study, outcome.failure
    resume = resume_command(args, study.study_name, url)
    if isinstance(failure, ExperimentExit):
        print(f"harness: error: the search stopped: {failure}; resume with: {resume}", file=sys.stderr)
        return 1
    if failure is not None:
        print(f"harness: {_failure_line(failure)}; the search stopped; once the store takes writes again, "
              f"`harness audit --study {shlex.quote(study.study_name)} --fix` closes what was left open, "
              f"then resume with: {resume}", file=sys.stderr)
        return 1
    if outcome.not_published is not None:
        print(f"harness: error: {outcome.not_published}", file=sys.stderr)
        return 1
    if outcome.interrupted:
        print(f"harness: interrupted; resume with: {resume}", file=sys.stderr)
        return 130
    return 0


def _failure_line(failure: BaseException) -> str:
    text = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    return text if text.startswith(("tracking failed", "cannot write")) else f"tracking failed: {text[:300]}"


def resume_command(args, study_name: str, url: str) -> str:
    """The command line that resumes this study as it was searched."""
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
