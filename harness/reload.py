"""Rebuild a logged run's model from its config and ``state_dict.pt`` (loaded with weights_only=True)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from . import config, training
from .tracking import CONFIG, STATE_DICT, load_state_dict


def load_model(run_id: str, client=None) -> nn.Module:
    from mlflow import MlflowClient

    client = client or MlflowClient()
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        logged = json.loads(Path(client.download_artifacts(run_id, CONFIG, tmp)).read_text())
        state = load_state_dict(client.download_artifacts(run_id, STATE_DICT, tmp))
    fields = {k: v for k, v in logged.items() if k in config.FIELDS}
    cfg, experiment = config.resolve({**fields, "device": "cpu"})
    model = training.build_model(cfg, experiment)
    model.load_state_dict(state)
    return model.eval()
