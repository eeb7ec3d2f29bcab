"""A logged run's model as an MLflow Model (MLflow's PyTorch flavor), and in the Model Registry.

The model is serialized with torch.export (MLflow's ``pt2`` format): loading it reads a graph and
tensors and imports no module, where ``pickle`` would import the experiment's class by the name the
stored file holds (and MLflow 3.17 refuses to unpickle without MLFLOW_ALLOW_PICKLE_DESERIALIZATION).
The model is rebuilt from the run's own ``config.json`` and ``state_dict.pt``, as `harness predict`
rebuilds it, so the MLflow Model predicts what `harness predict` prints. mlflow and torch are
imported inside the functions: the core's commands that need neither start without them.
"""
from __future__ import annotations

import contextlib

from . import runs, schema, tracking
from .errors import HarnessError, UsageError, first_line
from .experiment import Data, Experiment, is_builtin

CHAMPION = schema.CHAMPION_ALIAS
FORMAT = "pt2"  # torch.export: see docs/design.md, "The MLflow Model of a run"
WAIT_FOR_OTHER = 120  # seconds: another process's logging of the same run's model, at most (_first_model)
EXAMPLE_ROWS = 5  # the input example: the first test inputs (more than 1, so the batch axis stays dynamic)
# The versions this process runs, pinned: `mlflow models serve` with a virtualenv installs these.
PINNED = ("torch", "mlflow", "numpy")


class NotExportable(HarnessError):
    """The experiment's model cannot be logged as an MLflow Model; the message says why, in one line."""


def log_run_model(client, run_id: str, experiment: Experiment | str | None = None,
                  data=None, process: dict | None = None) -> str:
    """Log run ``run_id``'s model as an MLflow Model linked to the run (its params, and the metrics
    of the epoch its weights are from) and return the logged model's id (the one another process
    logged of the same run meanwhile, if it made its first). ``experiment``: the run's,
    when it is not one of the ``experiments`` package; ``data``: its data, when already loaded.
    A model torch.export cannot trace is a NotExportable, with nothing left written. ``process``:
    this process's record (workers.identity), kept on the logged model while it is PENDING, so that
    `harness audit` tells one a killed process left from one being logged."""
    import json

    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    reference = experiment.reference if isinstance(experiment, Experiment) else experiment
    run = runs.get_run(client, run_id)
    cfg, found = runs.logged_config(client, run_id, device="cpu",
                                    experiment=None if reference is None or is_builtin(reference) else reference)
    model = runs.fitted_model(client, run_id, cfg, found).eval()
    example = input_example(found, data if data is not None else found.load_data())
    signature = infer_signature(example, _output(model, example, found.name))
    step = _weights_step(client, run_id, cfg.epochs)
    with tracking.scoped_tracking_uri(client.tracking_uri):
        # Another process may be logging this run's model too (workers of one study ending on the same
        # best trial): each makes its logged model before it writes anything into it, and the first made
        # is the run's; the others are deleted unlinked (see _first_model).
        # In the run's MLflow experiment (log_model alone would choose MLflow's fluent one, Default):
        # `mlflow ui` lists it under the experiment's Models beside the run.
        mine = mlflow.initialize_logged_model(name=found.name, source_run_id=run_id, params=run.data.params,
                                              experiment_id=run.info.experiment_id,
                                              tags={schema.PROCESS_TAG: json.dumps(process)} if process else None)
        try:
            first = _first_model(client, mine)
            if first != mine.model_id:
                _discard(client, mine.model_id)
                return first
            with _quiet_torch():
                # log_model traces the model itself (it takes no exported program), before it writes
                # anything into the logged model: its trace is the only one, and a model it cannot
                # trace leaves nothing but the logged model made above, deleted here.
                mlflow.pytorch.log_model(
                    model, name=found.name, run_id=run_id, model_id=mine.model_id, input_example=example,
                    signature=signature, serialization_format=FORMAT, pip_requirements=pinned_requirements(),
                    step=step,
                    # MLflow's own check loads the saved model once more (0.9 s of the 1.1 s a digits_cnn
                    # model took): the trace's refusals are what fails here, and they are caught below.
                    validate_serving_input=False)
        except BaseException as exc:  # sys.exit() in the model's code, an interrupt: none is left PENDING either
            _discard(client, mine.model_id)
            if isinstance(exc, (MlflowException, OSError)) or not isinstance(exc, Exception):
                raise  # the store's or the disk's, not the model's; an interrupt; the code asking to stop
            # torch.export raises many kinds (its own, the model's code's)
            raise NotExportable(f"experiment {found.name!r}: torch.export cannot trace its model "
                                f"({first_line(exc)})") from None
    _link_final_metrics(client, run_id, mine.model_id)
    return mine.model_id


def _discard(client, model_id: str) -> None:
    """A logged model this process made and will not fill: FAILED (MLflow's log_model ends one so on
    an Exception, and leaves it PENDING on any other BaseException), then deleted."""
    from mlflow.entities import LoggedModelStatus

    client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    client.delete_logged_model(model_id)


def _first_model(client, mine) -> str:
    """The id of the first-made logged model of ``mine``'s run and name that is READY, or ``mine``'s.
    One made before ``mine`` that another process is still logging is waited for, up to WAIT_FOR_OTHER
    seconds: then it is passed over (a process killed while logging leaves its model PENDING for good).
    MLflow has no compare-and-set: ordered by (creation time, id), every process that sees the
    others' models chooses the same one, and one made after another process looked sees that one's."""
    import time

    from mlflow.entities import LoggedModelStatus

    from .tracking import filter_value

    query = f"source_run_id = {filter_value(mine.source_run_id)} AND name = {filter_value(mine.name)}"
    deadline = time.monotonic() + WAIT_FOR_OTHER
    while True:
        made = sorted((m for m in client.search_logged_models([mine.experiment_id], filter_string=query)
                       if m.status != LoggedModelStatus.FAILED), key=lambda m: (m.creation_timestamp, m.model_id))
        for model in made:
            if model.model_id == mine.model_id or model.status == LoggedModelStatus.READY:
                return model.model_id
            if time.monotonic() < deadline:
                break  # an earlier one is being logged: its outcome decides
        else:
            return mine.model_id
        time.sleep(0.5)


def input_example(experiment: Experiment, data) -> "numpy.ndarray":  # noqa: F821
    """The first EXAMPLE_ROWS test inputs, as the model takes them; NotExportable for an experiment
    whose samples are not one input tensor."""
    import torch

    if isinstance(data, Data):
        inputs = data.X_test[:EXAMPLE_ROWS]
    else:
        if data.input_shape is None:
            raise NotExportable(f"experiment {experiment.name!r}: each sample is a {type(data.test[0]).__name__} of "
                                "several inputs, and an MLflow Model of the PyTorch flavor takes one input tensor")
        inputs = torch.stack([torch.as_tensor(data.test[i][0]) for i in range(min(EXAMPLE_ROWS, len(data.test)))])
    return inputs.detach().to("cpu", torch.float32).numpy()


def _output(model, example, name: str):
    """The model's output on ``example`` (for the signature); NotExportable, before anything is
    written, for a model whose code fails on it or that returns something other than one tensor."""
    import torch

    try:
        with torch.inference_mode():
            output = model(torch.from_numpy(example))
    except Exception as exc:  # the experiment's own code
        raise NotExportable(f"experiment {name!r}: its model fails on the first test inputs ({first_line(exc)})") \
            from None
    if not isinstance(output, torch.Tensor):
        raise NotExportable(f"experiment {name!r}: its model returns a {type(output).__name__}, and an MLflow "
                            "Model of the PyTorch flavor returns one tensor")
    return output.numpy()


@contextlib.contextmanager
def _quiet_torch():
    """torch.export prints the graph it could not trace to stderr, and logs warnings beside it: the
    harness says why in one line instead."""
    import io
    import logging

    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def pinned_requirements() -> list[str]:
    """PINNED as ``name==version``: three distributions read, where provenance.requirements reads
    them all (and MLflow's check maps modules to distributions, which neither list holds)."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in PINNED]


def _weights_step(client, run_id: str, epochs: int) -> int:
    """The epoch the run's weights are from: its best epoch with early stopping, else its last (a
    finished run trained all its epochs; its curves are not read: a long run's are thousands of points)."""
    best_epoch = client.get_run(run_id).data.metrics.get(schema.BEST_EPOCH)
    return int(best_epoch) if best_epoch is not None else epochs - 1


def _link_final_metrics(client, run_id: str, model_id: str) -> None:
    """The run's final values as the logged model's metrics (MLflow links only those of its step)."""
    from mlflow.entities import Metric

    run = client.get_run(run_id)
    finals = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id)
              for key in run.data.metrics if key.startswith(schema.FINAL.split("{")[0])
              for m in client.get_metric_history(run_id, key)]
    if finals:
        client.log_batch(run_id, metrics=finals)


def run_model(client, run_id: str) -> str | None:
    """The id of the run's latest READY logged model, or None. The run's outputs may name a deleted
    one (log_model links its model to the run before it traces: one it could not trace, or another
    process's that lost to an earlier one, is deleted): passed over."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    ready = [m for m in (_logged_model(client, o.model_id) for o in (run.outputs.model_outputs if run.outputs else ()))
             if m is not None and m.status == LoggedModelStatus.READY]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


def _logged_model(client, model_id: str):
    """The logged model, or None where it is deleted (MLflow answers a deleted one as not found)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_logged_model(model_id)
    except MlflowException as exc:
        if tracking.missing(exc):
            return None
        raise


# ---- the Model Registry --------------------------------------------------------------------------
MAX_NAME = 256  # the registry's tables hold names of at most this many characters (MLflow's schema)


def check_name(name: str) -> None:
    """A registered model name MLflow takes (its own rule, then its tables' width); else a UsageError."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    shown = repr(name) if len(name) <= 80 else f"{name[:60]!r}... ({len(name)} characters)"
    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise UsageError(f"registered model name {shown}: {first_line(exc.message, 200)}") from None
    if len(name) > MAX_NAME or not name.isprintable() or name != name.strip() or ("'" in name and '"' in name):
        raise UsageError(f"registered model name {shown}: at most {MAX_NAME} printable characters, without "
                         "leading or trailing spaces, no '/' or ':', and not both ' and \"")


def check_registry(client) -> None:
    """The store has a Model Registry that answers; else a one-line UsageError, before anything is written."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    from .urls import redact

    try:
        client.search_registered_models(max_results=1)
    except (MlflowException, UnsupportedModelRegistryStoreURIException) as exc:
        raise UsageError(f"the MLflow store {redact(client.tracking_uri)} has no Model Registry that answers "
                         f"({first_line(getattr(exc, 'message', exc), 200)}); register on a database store "
                         "(sqlite:///..., postgresql://...) or an mlflow server") from None


def register(client, name: str, run_id: str, model_id: str, tags: dict[str, str]):
    """A new version of registered model ``name`` (created if need be) from the logged model
    ``model_id``, with ``tags``, and the CHAMPION_ALIAS moved to it. Returns the version. A failure
    part way takes back what it made: nothing is left half-registered."""
    source = f"models:/{model_id}"
    # MLflow's registry finds the logged model of a models:/ source through the global tracking URI.
    with tracking.scoped_tracking_uri(client.tracking_uri):
        return _register(client, name, run_id, source, model_id, tags)


def _register(client, name: str, run_id: str, source: str, model_id: str, tags: dict[str, str]):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    created, version = False, None
    try:
        try:
            client.create_registered_model(name)
            created = True
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        # The same logged model again (a search whose best trial did not change): its version gets the alias.
        same = None if created else _first_version(client, name, source)
        if same is not None:
            client.set_registered_model_alias(name, schema.CHAMPION_ALIAS, same.version)
            return same
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)
        # Another process may have registered the same model meanwhile (workers of one study ending on
        # the same best trial): the lowest version of it stays, whichever process looks.
        first = _first_version(client, name, source)
        if int(first.version) != int(version.version):
            client.delete_model_version(name, version.version)
            version = None
            client.set_registered_model_alias(name, schema.CHAMPION_ALIAS, first.version)
            return first
        _list_version(client, model_id, name, version.version)
        client.set_registered_model_alias(name, schema.CHAMPION_ALIAS, version.version)
        return version
    except BaseException:
        with contextlib.suppress(Exception):  # the store that failed may refuse these too: the error says why
            if version is not None:
                client.delete_model_version(name, version.version)
            if created:
                client.delete_registered_model(name)
        raise


def _first_version(client, name: str, source: str):
    """The lowest version of registered model ``name`` made from ``source``, or None."""
    from .tracking import filter_value

    same = [v for v in client.search_model_versions(f"name = {filter_value(name)}") if v.source == source]
    return min(same, key=lambda v: int(v.version), default=None)


def _list_version(client, model_id: str, name: str, version) -> None:
    """The version among the logged model's own (its page in `mlflow ui` shows them), as
    mlflow.register_model records it; that function would also print to stderr."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
        listed + [{"name": name, "version": version}])})


def version_tags(study: str | None, trial: int | str | None, objective: str | None, value) -> dict[str, str]:
    """A version's tags: the study and trial it comes from, and the trial's value of the study's objective."""
    tags = {schema.STUDY_TAG: study, schema.TRIAL_NUMBER_TAG: trial, schema.OBJECTIVE_NAME_TAG: objective,
            schema.OBJECTIVE_VALUE_TAG: value}
    return {k: str(v) for k, v in tags.items() if v is not None}
