"""One config, resolved from defaults < experiment < file < command line, validated in one place."""
import json

import pytest

from harness import config
from harness.errors import UsageError


def test_layers_override_in_order(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("lr: 0.05\nepochs: 30\noptimizer: adam\n")
    cfg, _ = config.resolve({"epochs": "12", "lr": None}, file=file)
    assert cfg.lr == 0.05            # from the file: the None override means "not given"
    assert cfg.epochs == 12          # the command line wins over the file
    assert cfg.optimizer == "adam"   # file over the experiment's default
    assert cfg.loss == "l1"          # the experiment's default
    assert cfg.seed == 42 and cfg.device == "cpu"


def test_json_file_and_whole_config_round_trips(tmp_path):
    cfg, _ = config.resolve({"lr": "0.2", "seed": "7"})
    file = tmp_path / "cfg.json"
    file.write_text(json.dumps(cfg.to_dict()))
    again, _ = config.resolve(file=file)
    assert again == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"lr": "0"}, "lr must be a positive number, got '0'"),
    ({"lr": "-0.1"}, "lr must be a positive number, got '-0.1'"),
    ({"lr": "abc"}, "lr must be a positive number, got 'abc'"),
    ({"lr": "nan"}, "lr must be a positive number, got 'nan'"),
    ({"epochs": "0"}, "epochs must be a positive integer, got '0'"),
    ({"epochs": "-3"}, "epochs must be a positive integer, got '-3'"),
    ({"epochs": "2.5"}, "epochs must be a positive integer, got '2.5'"),
    ({"optimizer": "lbfgs"}, "optimizer 'lbfgs' steps with a closure, which a loop of train steps does not pass; allowed: adadelta,"),
    ({"loss": "hinge"}, "unknown loss 'hinge'; allowed: bce, bce_with_logits, cross_entropy, hinge_embedding,"),
    ({"device": "tpu"}, "unknown device 'tpu'; allowed: auto, cpu, cuda, mps"),
    ({"experiment": "nope"}, "unknown experiment 'nope'; allowed: "),
])
def test_bad_values_are_named_with_what_is_allowed(overrides, message):
    with pytest.raises(UsageError) as err:
        config.resolve(overrides)
    assert str(err.value).startswith(message)


def test_unknown_file_key_and_bad_file_are_refused(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(UsageError, match="unknown config key 'learning_rate'"):
        config.resolve(file=file)
    file.write_text("lr: [0.1\n")
    with pytest.raises(UsageError, match="not valid YAML/JSON"):
        config.resolve(file=file)
    with pytest.raises(UsageError, match="cannot read config file"):
        config.resolve(file=tmp_path / "missing.yaml")
