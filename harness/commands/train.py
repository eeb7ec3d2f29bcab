"""`harness train`: one tracked training run."""
from __future__ import annotations

import os
import sys
import time

from ..schema import TEST_LOSS, TRAIN_LOSS


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
                        help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else MLflow's default)")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train once with a given config and track the run in MLflow")
    add_config_arguments(p)
    p.add_argument("--optimizer", help="sgd|adam|adamw|rmsprop (default: the experiment's)")
    p.add_argument("--loss", help="l1|mse|smooth_l1|huber|bce_with_logits (default: the experiment's)")
    p.add_argument("--lr", help="learning rate, a positive number (default: the experiment's)")
    p.add_argument("--epochs", help="a positive integer (default: the experiment's)")
    p.add_argument("--seed", help="torch seed for the initial weights (default: 42)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import config, signals, training
    from ..errors import ExperimentCodeError, UsageError

    cfg, experiment = config.resolve(config.with_flags(config.parse_sets(args.set), {
        "experiment": args.experiment, "optimizer": args.optimizer, "loss": args.loss, "lr": args.lr,
        "epochs": args.epochs, "seed": args.seed, "device": args.device}), file=args.config)
    data = experiment.load_data()
    cfg = config.validate(cfg, experiment, data.n_train)  # batch_size against the training set's size
    training.preflight(cfg, experiment, data)
    from ..urls import check_credentials

    check_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_URI")
    from ..schema import COMMAND_TAG
    from ..tracking import check_experiment_offline, default_tracking_uri

    refused = check_experiment_offline(args.mlflow_experiment, default_tracking_uri())
    if refused:
        raise UsageError(refused)
    # mlflow is imported only once the input is known good: bad input never touches a store.
    import mlflow

    from .. import tracking
    from ..loop import History

    run_id = os.environ.get("MLFLOW_RUN_ID")
    started = time.time()
    try:
        client = tracking.open_client()
        if run_id:  # under `mlflow run`: log into the run MLflow created
            existing = client.get_run(run_id)
            experiment_id, skip = existing.info.experiment_id, set(existing.data.params)
        else:
            refused = tracking.check_experiment(client, args.mlflow_experiment)
            if refused:
                raise UsageError(refused)
            experiment_id, skip = tracking.experiment_id(client, args.mlflow_experiment), set()
            run_id = client.create_run(experiment_id, run_name=f"{experiment.name}-{cfg.optimizer}-{cfg.loss}",
                                       tags={COMMAND_TAG: "train"}).info.run_id
    except UsageError:
        raise
    except Exception as exc:
        raise tracking.unreachable("the MLflow tracking store", mlflow.get_tracking_uri(), time.time() - started,
                                   exc) from None
    status, started = "FAILED", time.time()
    history = History()  # filled as training goes: what an interrupt leaves is still logged
    try:
        result = training.train(cfg, experiment, data, observers=[tracking.LoggedNames(experiment), Progress(cfg.epochs)],
                                history=history)
        with signals.deferred(on_signal=lambda: None):  # trained in full: the run is logged in full
            status = tracking.log_result(client, run_id, experiment, result, skip_params=skip)
    except ExperimentCodeError as exc:  # the run is FAILED with the reason and its curves so far
        with signals.deferred():
            tracking.write(client, run_id, tracking.partial_record(cfg, history, str(exc),
                                                                   tracking.source_params(experiment)),
                           skip_params=skip)
        print(f"harness: error: run {run_id} FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with signals.deferred():  # a second Ctrl-C must not cut the record short
            status = "KILLED"
            tracking.write(client, run_id, tracking.partial_record(cfg, history, "interrupted",
                                                                   tracking.source_params(experiment)),
                           skip_params=skip)
        raise
    finally:
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
