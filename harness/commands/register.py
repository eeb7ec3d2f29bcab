"""`harness register RUN_ID --name NAME`: a run's model as a new version of a registered model, with
the alias `champion` moved to it."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("register", help="register a run's MLflow Model in the Model Registry (alias champion)")
    p.add_argument("run_id")
    p.add_argument("--name", required=True, help="the registered model: created if new, else given a new version")
    p.add_argument("--experiment", metavar="MODULE_OR_FILE",
                   help="the run's experiment, when it is a module or .py file of your own and the run has no "
                        "MLflow Model yet (a run's record never chooses code to import)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import models, runs, schema
    from ..errors import HarnessError, UsageError
    from ..search.durable.workers import identity
    from ..tracking import default_tracking_uri, missing_run_offline, open_client, unwritable_store
    from ..urls import check_credentials

    models.check_name(args.name)
    uri = default_tracking_uri()
    check_credentials(uri, "MLFLOW_TRACKING_URI")
    refused = unwritable_store(uri) or missing_run_offline(args.run_id, uri)
    if refused:
        raise UsageError(refused)
    _check_writable(uri)
    client = open_client(uri)
    run = runs.get_run(client, args.run_id)
    models.check_registry(client)
    model_id = models.run_model(client, args.run_id)
    if model_id is None:  # a run `harness train` made, or a trial that was not the best: its model is logged now
        if run.info.status != "FINISHED":
            raise UsageError(f"run {args.run_id} is {run.info.status}, not FINISHED: it has no model to register")
        try:
            model_id = models.log_run_model(client, args.run_id, args.experiment, process=identity())
        except HarnessError as exc:  # no readable state_dict.pt or config.json, or a model that does not export
            raise UsageError(f"run {args.run_id} has no model to register: {exc}") from None
    tags, params = run.data.tags, run.data.params
    objective = params.get("objective") if params.get("objective") not in (None, "None") else None
    value = run.data.metrics.get(schema.final(objective)) if objective else None
    version = models.register(client, args.name, args.run_id, model_id,
                              models.version_tags(tags.get(schema.STUDY_TAG), tags.get(schema.TRIAL_NUMBER_TAG),
                                                  objective, value))
    print(f"registered run {args.run_id} as {args.name!r} version {version.version}: "
          f"models:/{args.name}@{models.CHAMPION}")
    return 0


def _check_writable(uri: str) -> None:
    """A local store this process cannot write is a one-line HarnessError (a store failure, exit 1)
    before anything is written: opening the store for writing makes a lock file beside it."""
    from pathlib import Path

    from ..errors import HarnessError
    from ..tracking import read_only_uri
    from ..urls import sqlite_path

    if read_only_uri(uri):
        raise HarnessError(f"the MLflow store {str(Path(sqlite_path(uri)).absolute())!r} is read-only here, and "
                           "registering writes to it (a model version, and the run's MLflow Model if it has none "
                           "yet): register in a copy you can write")
