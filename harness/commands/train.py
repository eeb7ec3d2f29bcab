"""`harness train`: one tracked training run."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from ..schema import COMMAND_TAG, FAIL_REASON_TAG, PROCESS_TAG, RESUMED_TAG, TEST_LOSS, TRAIN_LOSS
from ..search.durable.workers import WORKER_DIED, identity, is_identity, owner_gone, process_record
from ..search.limits import CHECKPOINT_SECONDS


def add_config_arguments(parser) -> None:
    """The TrainConfig fields as flags; unset flags stay None so lower layers show through."""
    parser.add_argument("--experiment", help="an experiment: a name in experiments/, a dotted module path or a "
                                             "path/to/file.py defining EXPERIMENT (default: linear_regression)")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with config values")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a config value or hyperparameter, e.g. --set batch_size=32 --set hidden=64 "
                             "(repeatable; named flags win)")
    parser.add_argument("--device", help="auto|cpu|cuda|mps (default: auto)")
    parser.add_argument("--mlflow-experiment", metavar="NAME",
                        help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the one of $MLFLOW_EXPERIMENT_ID, "
                             "else one named after the harness experiment)")


def add_checkpoint_arguments(parser) -> None:
    parser.add_argument("--checkpoint-every", metavar="N", help="write a checkpoint every N epochs (default: by time only)")
    parser.add_argument("--checkpoint-seconds", metavar="S",
                        help="write a checkpoint at the first epoch's end S seconds after the last one (default: "
                             f"{int(CHECKPOINT_SECONDS)}; 0: only --checkpoint-every's)")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train once with a given config and track the run in MLflow")
    add_config_arguments(p)
    p.add_argument("--optimizer", help="sgd|adam|adamw|rmsprop (default: the experiment's)")
    p.add_argument("--loss", help="l1|mse|smooth_l1|huber|bce_with_logits (default: the experiment's)")
    p.add_argument("--lr", help="learning rate, a positive number (default: the experiment's)")
    p.add_argument("--epochs", help="a positive integer (default: the experiment's)")
    p.add_argument("--seed", help="torch seed for the initial weights (default: 42)")
    add_checkpoint_arguments(p)
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue run RUN_ID (stopped, killed or preempted) from its latest checkpoint, with the "
                        "flags that started it: the result is bit for bit that of a run never stopped")
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import config, signals, training
    from .. import resume as resume_module
    from ..errors import ExperimentCodeError, UsageError, experiment_exit

    every, seconds = config.checkpoint_policy(args.checkpoint_every, args.checkpoint_seconds, CHECKPOINT_SECONDS)
    if args.resume is not None and not args.resume.strip():
        raise UsageError("--resume needs the id of the run to continue (the 32 hex digits `harness train` printed)")
    cfg, experiment = config.resolve(config.with_flags(config.parse_sets(args.set), {
        "experiment": args.experiment, "optimizer": args.optimizer, "loss": args.loss, "lr": args.lr,
        "epochs": args.epochs, "seed": args.seed, "device": args.device}), file=args.config)
    data = experiment.load_data()
    cfg = config.validate(cfg, experiment, data.n_train)  # batch_size against the training set's size
    training.preflight(cfg, experiment, data)
    from ..urls import check_credentials

    check_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_URI")
    from ..tracking import check_experiment_offline, default_tracking_uri, missing_run_offline

    refused = check_experiment_offline(args.mlflow_experiment, default_tracking_uri(), experiment.name) or \
        (missing_run_offline(args.resume, default_tracking_uri()) if args.resume else None)
    if refused:
        raise UsageError(refused)
    # mlflow is imported only once the input is known good: bad input never touches a store.
    import mlflow

    from .. import tracking
    from ..launched import VARIABLE, launched_id, launched_run
    from ..loop import History

    run_id = launched_id()
    if args.resume and run_id and args.resume != run_id:
        raise UsageError(f"--resume {args.resume} with {VARIABLE}={run_id} (`mlflow run`'s run): resume outside it")
    started = time.time()
    resumed, adopted = None, None
    process = identity()  # its lease taken before anything is written
    try:
        client = tracking.open_client()
        if args.resume:
            resumed = _resumable(client, args.resume, cfg, experiment)
            run_id, experiment_id, skip = args.resume, resumed.experiment_id, resumed.params
        elif run_id:  # under `mlflow run`: log into the run MLflow created
            existing = launched_run(client)
            experiment_id, skip = existing.info.experiment_id, set(existing.data.params)
            adopted = existing.data.tags
        else:
            refused = tracking.check_experiment(client, args.mlflow_experiment, experiment.name)
            if refused:
                raise UsageError(refused)
            experiment_id, skip = tracking.experiment_id(client, args.mlflow_experiment, experiment.name), set()
            run_id = client.create_run(experiment_id, run_name=f"{experiment.name}-{cfg.optimizer}-{cfg.loss}",
                                       tags={COMMAND_TAG: "train"}).info.run_id
        # The config from the start (shown while it trains, checked by a --resume), in the same write
        # as the process: a run that names a process someone can kill holds the config to check against.
        params = {} if args.resume else tracking.params_of(cfg, tracking.source_params(experiment))
        tracking.write(client, run_id, tracking.RunRecord(params=params, history={},
                                                          tags={PROCESS_TAG: json.dumps(process)}),
                       skip_params=skip)
        skip = skip | set(params)
        # Provenance from the start too; a resumed run's says the process that finishes it.
        tracking.write(client, run_id, tracking.provenance_record(experiment, data, cfg.device, cfg.valid_fraction,
                                                                  keep=adopted), skip_params=skip)
        _close_dead_runs(client, experiment_id, run_id)
    except UsageError:
        raise
    except Exception as exc:
        raise tracking.unreachable("the MLflow tracking store", mlflow.get_tracking_uri(), time.time() - started,
                                   exc) from None
    status, started = "FAILED", time.time()
    history = History()  # filled as training goes: what an interrupt leaves is still logged
    logged = resumed.logged_epochs if resumed else 0  # steps already on the run: not written twice
    live = tracking.LiveCurves(client, run_id, history, sent=logged)
    checkpoints = resume_module.run_checkpoints(client, run_id, every, seconds,
                                                after_slot=resumed.slot if resumed else None) \
        if every or seconds else None
    try:
        if resumed is not None:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, RESUMED_TAG, str(resumed.state["epochs_done"] if resumed.state else 0))
        result = training.train_from(
            cfg, experiment, data, [tracking.LoggedNames(experiment), Progress(cfg.epochs), live], history,
            checkpoints, resumed.state if resumed else None,
            refused=lambda why: _restarted(client, run_id, why))
        with signals.deferred(on_signal=lambda: None):  # trained in full: the run is logged in full
            status = tracking.log_result(client, run_id, experiment, result, skip_params=skip, first_step=live.close())
    except ExperimentCodeError as exc:  # the run is FAILED with the reason and its curves so far
        return _failed(client, run_id, tracking.partial_record(cfg, history, str(exc), tracking.source_params(experiment),
                                                               first_step=live.close()), skip)
    except KeyboardInterrupt:
        with signals.deferred():  # a second Ctrl-C must not cut the record short
            status = "KILLED"
            tracking.write(client, run_id, tracking.partial_record(cfg, history, "interrupted",
                                                                   tracking.source_params(experiment),
                                                                   first_step=live.close()),
                           skip_params=skip)
        if checkpoints is not None:
            print(f"harness: run {run_id} can be continued from its last checkpoint: "
                  f"harness train ... --resume {run_id}", file=sys.stderr)
        raise
    except BaseException as exc:  # sys.exit() in the experiment's code: failed as any of its errors
        error = experiment_exit(exc, history.epochs_run)
        if error is None:
            raise
        return _failed(client, run_id, tracking.partial_record(cfg, history, str(error),
                                                               tracking.source_params(experiment),
                                                               first_step=live.close()), skip)
    finally:
        live.close()  # its thread ends with the run
        with signals.deferred(on_signal=lambda: None):
            client.set_terminated(run_id, status)
    print(summary(cfg, result, run_id, status, time.time() - started))
    print(tracking.ui_hint(client, experiment_id, run_id))
    if signals.interrupted():
        print("harness: interrupted once training had ended; the run was logged in full", file=sys.stderr)
        return 130
    if result.diverged:
        print(f"harness: {result.history.stopped} (lr={cfg.lr}); run {run_id} marked FAILED", file=sys.stderr)
        return 1
    return 0


PROGRESS_SECONDS = 5


def _failed(client, run_id: str, record, skip: set[str]) -> int:
    """The run FAILED with the record of what it did, and its reason said in one line."""
    from .. import signals, tracking

    with signals.deferred():
        tracking.write(client, run_id, record, skip_params=skip)
    print(f"harness: error: run {run_id} FAILED: {record.tags[FAIL_REASON_TAG]}", file=sys.stderr)
    return 1


def _process_gone(run) -> bool:
    """Whether the process that trains a RUNNING run is known to be dead, by the rule of a trial's worker."""
    from datetime import datetime, timezone

    return owner_gone(process_record(run.data.tags), datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc)
                      if run.info.start_time is not None else None)


def _close_dead_runs(client, experiment_id: str, own: str) -> None:
    """`harness train` runs of this MLflow experiment left RUNNING by a process that is gone (`kill -9`,
    a lost machine on this host): closed as KILLED with the reason, and said, with how to go on."""
    left = client.search_runs([experiment_id], max_results=100, filter_string=(
        f"tags.`{COMMAND_TAG}` = 'train' and attributes.status = 'RUNNING'"))
    for run in left:
        if run.info.run_id != own and _process_gone(run):
            client.set_tag(run.info.run_id, FAIL_REASON_TAG, WORKER_DIED)
            client.set_terminated(run.info.run_id, "KILLED")
            print(f"harness: run {run.info.run_id} was left RUNNING by a `harness train` that is gone: closed as "
                  f"KILLED; `harness train ... --resume {run.info.run_id}` goes on from its last checkpoint",
                  file=sys.stderr)


def _restarted(client, run_id: str, why: str) -> None:
    """The checkpoint a --resume found is refused: the run trains from epoch 0, and its tag, set to
    where it would resume, says so."""
    print(f"harness: the checkpoint of run {run_id} refused: {why}; it trains again from epoch 0", file=sys.stderr)
    client.set_tag(run_id, RESUMED_TAG, "0")


@dataclass(frozen=True)
class Resumed:
    """A run to continue: its MLflow experiment, the params already on it, the epochs its curves
    hold, and its latest usable checkpoint (None: it trains again from epoch 0) and that one's slot."""
    experiment_id: str
    params: set
    logged_epochs: int
    state: dict | None
    slot: int | None


def _resumable(client, run_id: str, cfg, experiment) -> Resumed:
    """Run ``run_id`` checked as one this command may continue with ``cfg``: made by `harness train`,
    not finished, and logged (if at all) with this config; refused in one line before anything is written."""
    from ..errors import UsageError
    from ..runs import get_run

    from .. import resume as resume_module

    existing = get_run(client, run_id)
    if existing.data.tags.get(COMMAND_TAG) != "train":
        raise UsageError(f"run {run_id} was not made by `harness train`; --resume continues those only")
    if existing.info.status == "RUNNING":
        process = process_record(existing.data.tags)
        if not _process_gone(existing):
            where = f"process {process['pid']} on {process['host']}" if is_identity(process) else \
                "a process that has not named itself yet"
            raise UsageError(f"run {run_id} is RUNNING, trained by {where}; resume it once that process is gone")
    if existing.info.status == "FINISHED":
        raise UsageError(f"run {run_id} is FINISHED: there is nothing left to train")
    if existing.info.lifecycle_stage != "active":
        raise UsageError(f"run {run_id} is deleted; restore it in MLflow first")
    given = {k: str(v) for k, v in cfg.to_dict().items()}
    differs = sorted(k for k, v in existing.data.params.items() if k in given and given[k] != v)
    if differs:
        raise UsageError(f"run {run_id} was logged with another config ({', '.join(differs[:5])} differ); "
                         "resume it with the flags that started it")
    state, slot = resume_module.latest(client, run_id, cfg.to_dict(), experiment.sha256)
    if state is None:
        print(f"harness: run {run_id} has no usable checkpoint: it trains again from epoch 0", file=sys.stderr)
    logged = len(client.get_metric_history(run_id, TRAIN_LOSS))
    return Resumed(existing.info.experiment_id, set(existing.data.params), logged, state, slot)


class Progress:
    """Loop observer: the reference notebook's progress line, every tenth of the run."""

    def __init__(self, epochs: int, seconds: float = PROGRESS_SECONDS):
        # Every tenth of the run, as the notebook prints; and at least every few seconds, so a
        # run of millions of epochs still shows it is alive.
        self.every, self.seconds = max(1, epochs // 10), seconds
        self.last = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        now = time.monotonic()
        if epoch % self.every == 0 or now - self.last >= self.seconds:
            self.last = now
            print(f"Epoch: {epoch} | Loss: {logs[TRAIN_LOSS]} | Test loss: {logs[TEST_LOSS]}", flush=True)


def summary(cfg, result, run_id: str, status: str, seconds: float) -> str:
    batch = f"batch {cfg.batch_size}" if cfg.batch_size else "full batch"
    lines = [f"run {run_id} {status} in {seconds:.1f}s: {cfg.experiment}, {cfg.optimizer}+{cfg.loss}, "
             f"lr={cfg.lr:g}, {result.history.epochs_run}/{cfg.epochs} epochs, {batch}, seed {cfg.seed}, {cfg.device}"]
    if cfg.hparams:
        lines.append("  " + "  ".join(f"{k}={v}" for k, v in cfg.hparams.items()))
    finals = result.final_metrics()
    if finals:
        lines.append("  " + "  ".join(f"{k} {v:.6g}" for k, v in finals.items()))
    return "\n".join(lines)
