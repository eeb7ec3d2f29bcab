"""Reading logged runs back: a run by id, its config, its model, its curves."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from . import config, training
from .errors import HarnessError, UsageError
from .tracking import CONFIG, STATE_DICT


def get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"run {run_id!r} does not exist in the MLflow store {client.tracking_uri}") from None


def logged_config(client, run_id: str, device: str | None = None):
    """The run's resolved config (from its config.json), re-validated; returns (config, experiment)."""
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        try:
            logged = json.loads(Path(client.download_artifacts(run_id, CONFIG, tmp)).read_text())
        except Exception as exc:
            raise HarnessError(f"run {run_id} has no readable {CONFIG} ({type(exc).__name__}): "
                               "was it logged by the harness?") from None
    fields = {k: v for k, v in logged.items() if k in config.FIELDS}
    if device:
        fields["device"] = device
    return config.resolve(fields)


def load_state_dict(client, run_id: str) -> dict:
    """The run's state_dict.pt, loaded with weights_only=True: a pickle that is not plain tensors is refused."""
    import pickle

    import torch

    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        path = client.download_artifacts(run_id, STATE_DICT, tmp)
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HarnessError(f"refused {STATE_DICT} of run {run_id}: not a plain tensor file "
                               f"(torch.load weights_only=True: {first})") from None


def load_model(run_id: str, client=None):
    """The run's model, rebuilt from its config and loaded from its state_dict.pt, in eval mode."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    get_run(client, run_id)
    cfg, experiment = logged_config(client, run_id, device="cpu")
    model = training.build_model(cfg, experiment)
    model.load_state_dict(load_state_dict(client, run_id))
    return model.eval()


def predict(run_id: str, values: list[float], client=None):
    """Inputs shaped like the experiment's data and the model's outputs for them."""
    import torch

    from mlflow import MlflowClient

    client = client or MlflowClient()
    model = load_model(run_id, client)
    _, experiment = logged_config(client, run_id, device="cpu")
    shape = tuple(experiment.make_data().X_test.shape[1:])
    width = int(torch.Size(shape).numel())
    if not values or len(values) % width:
        raise UsageError(f"--x needs a multiple of {width} numbers for inputs of shape {list(shape)}, "
                         f"got {len(values)}")
    inputs = torch.tensor(values, dtype=torch.float32).reshape(-1, *shape)
    with torch.inference_mode():
        return inputs, model(inputs)


def curves(client, run_id: str, keys) -> dict[str, list[float]]:
    """Per-epoch metric histories, ordered by step."""
    return {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in keys}
