"""`harness train` as a user runs it, checked by opening the MLflow store it wrote."""
import json

import pytest
import torch
from PIL import Image

from harness import config, training
from conftest import all_runs, client_for, cli_env, run_cli



def download(client, run_id, name, dst):
    return client.download_artifacts(run_id, name, str(dst))


@pytest.mark.slow  # the CLI as a subprocess
def test_train_logs_the_whole_contract(workdir):
    out = run_cli("train", "--epochs", 150, cwd=workdir)
    assert out.returncode == 0, out.stderr
    [run] = all_runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.info.run_id in out.stdout and "mlflow ui" in out.stdout
    progress = [line for line in out.stdout.splitlines() if line.startswith("Epoch: ")]
    assert [int(line.split()[1]) for line in progress] == list(range(0, 150, 15))

    params = run.data.params
    assert {k: params[k] for k in ("lr", "epochs", "optimizer", "loss", "seed", "device", "experiment")} == {
        "lr": "0.01", "epochs": "150", "optimizer": "sgd", "loss": "l1", "seed": "42", "device": "cpu",
        "experiment": "linear_regression"}
    assert params["torch_version"] == torch.__version__

    # The same run in-process is the ground truth for every logged value.
    cfg, experiment = config.resolve({"epochs": 150, "device": "cpu"})
    expected = training.train(cfg, experiment)
    client = client_for(workdir)
    for key in ("train_loss", "test_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(150))
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            expected.history.values[key], rel=0, abs=0)
    metrics = run.data.metrics
    assert metrics["final_train_loss"] == expected.history.values["train_loss"][-1]
    assert metrics["final_test_loss"] == expected.history.values["test_loss"][-1]
    assert metrics["weight"] == expected.scalars["weight"] and metrics["bias"] == expected.scalars["bias"]

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    # provenance/: the installed packages' list (and the uncommitted diff, where there is one): tests/test_provenance.py
    assert names == {"state_dict.pt", "config.json", "loss_curves.png", "predictions.png", "provenance"}
    state = torch.load(download(client, run.info.run_id, "state_dict.pt", workdir), weights_only=True)
    assert list(state) == ["weights", "bias"]
    assert torch.equal(state["weights"], expected.model.state_dict()["weights"])
    logged_cfg = json.loads(open(download(client, run.info.run_id, "config.json", workdir)).read())
    assert {k: logged_cfg[k] for k in cfg.to_dict()} == cfg.to_dict()
    for png in ("loss_curves.png", "predictions.png"):
        with Image.open(download(client, run.info.run_id, png, workdir)) as image:
            assert image.size[0] > 300 and image.size[1] > 200


@pytest.mark.slow  # the CLI as a subprocess
def test_metrics_are_sent_in_batches_not_per_epoch(workdir, monkeypatch):
    """A 1500-epoch run needs two log_batch calls for 3000 points plus finals, not 3000 calls."""
    from mlflow import MlflowClient

    from harness import tracking

    calls, real = [], MlflowClient.log_batch

    def spy(self, run_id, metrics=(), params=(), tags=(), **kw):
        calls.append((len(metrics), len(params), len(tags)))
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    cfg, experiment = config.resolve({"epochs": 1500, "device": "cpu"})
    client = client_for(workdir)
    run_id = client.create_run("0").info.run_id
    tracking.write(client, run_id, tracking.record(training.train(cfg, experiment)))
    assert len(client.get_metric_history(run_id, "train_loss")) == 1500
    assert all(m + p + t <= 1000 for m, p, t in calls)
    assert sum(m for m, _, _ in calls) == 2 * 1500 + 6  # finals: 2 losses, weight, bias, their 2 errors
    assert len(calls) == 4


@pytest.mark.slow  # the CLI as a subprocess
def test_mlflow_experiment_name_from_flag_or_environment(workdir, cli_in_process):
    # The flag in-process; the variable as a user's shell hands it to a real process.
    assert cli_in_process("train", "--epochs", 3, "--mlflow-experiment", "mine", cwd=workdir).returncode == 0
    env = cli_env(MLFLOW_EXPERIMENT_NAME="from-env")
    assert run_cli("train", "--epochs", 3, cwd=workdir, env=env).returncode == 0
    client = client_for(workdir)
    for name in ("mine", "from-env"):
        exp = client.get_experiment_by_name(name)
        assert len(client.search_runs([exp.experiment_id])) == 1


@pytest.mark.slow  # a tracked training (in-process)
def test_tracking_uri_from_environment(tmp_path, cli_in_process):
    """In-process (was a process): MLflow reads the variable from os.environ at each command either
    way; test_mlflow_experiment_name_from_flag_or_environment hands a variable to a real process."""
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    out = cli_in_process("train", "--epochs", 2, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "mlflow.db").exists()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("linear_regression").experiment_id])) == 1


@pytest.mark.parametrize("args, bad", [
    (["--lr", "0"], "'0'"), (["--lr", "-1"], "'-1'"), (["--lr", "fast"], "'fast'"),
    (["--epochs", "0"], "'0'"), (["--epochs", "-5"], "'-5'"), (["--epochs", "1.5"], "'1.5'"),
    (["--optimizer", "lbfgs"], "'lbfgs'"), (["--loss", "hinge"], "'hinge'"),
    (["--experiment", "nope"], "'nope'"), (["--device", "tpu"], "'tpu'"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "xla"], "'"),
    (["--seed", "x"], "'x'"), (["--frobnicate"], "--frobnicate"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, bad, cli_in_process):
    out = cli_in_process("train", *args, cwd=tmp_path)
    _one_line_exit_2_and_nothing_written(out, bad, tmp_path)


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_writes_nothing_from_a_real_process(tmp_path):
    """The matrix above as a user's process shows it."""
    out = run_cli("train", "--lr", "fast", cwd=tmp_path)
    _one_line_exit_2_and_nothing_written(out, "'fast'", tmp_path)


def _one_line_exit_2_and_nothing_written(out, bad, tmp_path):
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: ") and bad in lines[0], out.stderr
    assert "allowed" in lines[0] or "must be" in lines[0] or "unrecognized" in lines[0]
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no store created, let alone a run


@pytest.mark.slow  # a tracked training (in-process)
def test_divergence_fails_the_run_with_curves_up_to_that_epoch(workdir, cli_in_process):
    """In-process (was a process): an exception main() let out would fail this test itself."""
    out = cli_in_process("train", "--loss", "mse", "--lr", 5, "--epochs", 100, cwd=workdir)
    assert out.returncode == 1
    assert "diverged at epoch" in out.stderr and "Traceback" not in out.stderr
    [run] = all_runs(workdir)
    assert run.info.status == "FAILED"
    epoch = int(run.data.tags["harness.fail_reason"].rsplit(" ", 1)[1])
    assert f"diverged at epoch {epoch}" in out.stderr
    steps = sorted(m.step for m in client_for(workdir).get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(epoch))
    assert "final_test_loss" not in run.data.metrics
