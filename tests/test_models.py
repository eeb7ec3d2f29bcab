"""Issue 29: a run's model beyond `harness predict`'s own reader: inputs of any shape from files,
the best trial as an MLflow Model (torch.export), the Model Registry and `mlflow models serve`."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import all_runs, new_store, redirects_restored
from harness import runs
from harness.commands.predict import MAX_INPUT_BYTES, MAX_INPUTS


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, migrated_db):
    """A store holding one digits_cnn run (1x8x8 images, 10 classes), trained 1 epoch (its readers need
    a model, not a good one): (folder, run id)."""
    from harness.cli import main

    path = new_store(tmp_path_factory.mktemp("digits"), migrated_db)
    with redirects_restored(), pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
        assert main(["train", "--experiment", "digits_cnn", "--epochs", "1"]) == 0
    [run] = all_runs(path)
    return path, run.info.run_id


def images(n=3) -> np.ndarray:
    from experiments.digits_cnn import make_data

    return make_data().X_test[:n].numpy()


def test_predict_reads_image_shaped_inputs_from_npy_csv_and_json(digits_run, cli_in_process, tmp_path):
    folder, run_id = digits_run
    x = images()
    expected = runs.predict(run_id, x, client=runs_client(folder))[1]
    files = {"batch.npy": lambda p: np.save(p, x), "rows.csv": lambda p: np.savetxt(p, x.reshape(3, -1), delimiter=","),
             "nested.json": lambda p: p.write_text(json.dumps(x.tolist())),
             "served.json": lambda p: p.write_text(json.dumps({"inputs": x.tolist()}))}
    for name, write in files.items():
        write(tmp_path / name)
        out = cli_in_process("predict", run_id, "--input", tmp_path / name, cwd=folder)
        assert out.returncode == 0 and out.stderr == "", (name, out.stderr)
        printed = [[float(v) for v in line.split(" -> ")[1].split()] for line in out.stdout.splitlines()]
        assert [line.split(" -> ")[0] for line in out.stdout.splitlines()] == [f"input {i} (1x8x8)" for i in range(3)]
        assert np.allclose(printed, expected.numpy(), rtol=1e-5), name
    np.save(tmp_path / "one.npy", x[0])  # one image alone is one input
    out = cli_in_process("predict", run_id, "--input", tmp_path / "one.npy", cwd=folder)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    out = cli_in_process("predict", run_id, "--x", *x[:2].flatten().tolist(), cwd=folder)  # --x: flattened
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2


def runs_client(folder):
    from harness.tracking import read_client

    return read_client(f"sqlite:///{folder / 'mlflow.db'}")


def test_predict_refuses_input_files_that_are_not_inputs_of_the_experiment(digits_run, cli_in_process, tmp_path):
    folder, run_id = digits_run
    np.save(tmp_path / "objects.npy", np.array([{}], dtype=object))
    np.save(tmp_path / "short.npy", np.zeros((1000, 1, 8, 8), dtype=np.float32))
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:300])  # its header claims more
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5), dtype=np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    (tmp_path / "header.csv").write_text("a,b\n1,2\n")
    (tmp_path / "ragged.json").write_text("[[1, 2], [3]]")
    (tmp_path / "notes.txt").write_text("1 2 3")
    (tmp_path / "folder.json").mkdir()
    with open(tmp_path / "huge.npy", "wb") as sparse:  # costs no disk: refused by its size alone
        sparse.truncate(MAX_INPUT_BYTES + 1)
    # The seventh probe's: a traceback each, and 3.2 GB of memory for a 6 MB file of 3 million inputs.
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "nothing.npy").write_bytes(b"")
    (tmp_path / "many.csv").write_text("1\n" * (MAX_INPUTS + 1))
    for name, message in (("objects.npy", "is not an array of numbers"), ("short.npy", "is not an array of numbers"),
                          ("wrong.npy", "needs a multiple of 64 numbers for inputs of shape [1, 8, 8], got 10 "
                                        "(an array of shape [2, 5])"),
                          ("empty.npy", "holds no numbers"), ("text.npy", "not numbers"),
                          ("header.csv", "is not an array of numbers"), ("ragged.json", "is not an array of numbers"),
                          ("notes.txt", "a .npy, .csv, .json file is allowed"), ("folder.json", "not a regular file"),
                          ("missing.npy", "No such file"),
                          ("huge.npy", f"at most {MAX_INPUT_BYTES} allowed"), ("deep.json", "nested too deep"),
                          ("nothing.npy", "is not an array of numbers"),
                          ("many.csv", f"holds {MAX_INPUTS + 1} inputs, at most {MAX_INPUTS} allowed")):
        out = cli_in_process("predict", run_id, "--input", tmp_path / name, cwd=folder)
        assert out.returncode == 2 and message in out.stderr, (name, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == "", (name, out.stderr)


# ---- the best trial as an MLflow Model, and the Model Registry -----------------------------------

SMALL_DIGITS = ["--experiment", "digits_cnn", "--epochs-range", "1", "2", "--no-progress", "--seed", "3"]


def in_process(folder, *args, env=None) -> int:
    from harness.cli import main

    with redirects_restored(), pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        return main(list(map(str, args)))


@pytest.fixture(scope="module")
def registered(tmp_path_factory, migrated_db):
    """A digits_cnn search of 3 trials that registered its best as 'digits': (folder, study)."""
    from search_helpers import journal_study

    folder = new_store(tmp_path_factory.mktemp("registered"), migrated_db)
    assert in_process(folder, "search", "--n-trials", 3, *SMALL_DIGITS, "--register", "digits") == 0
    return folder, journal_study(folder, "digits_cnn-search")


@pytest.mark.slow  # whole searches that log MLflow Models
def test_a_search_logs_its_best_trial_as_an_mlflow_model_of_its_run(registered):
    import mlflow
    from importlib.metadata import version
    from mlflow.models import Model

    from conftest import client_for

    folder, study = registered
    client = client_for(folder)
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    run = client.get_run(best_run)
    # In the run's own MLflow experiment (digits_cnn), listed there beside it; none in Default.
    assert client.get_experiment(run.info.experiment_id).name == "digits_cnn"
    assert not client.search_logged_models([client.get_experiment_by_name("Default").experiment_id])
    [model] = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == best_run and model.status.to_proto() == 2  # READY
    assert model.name == "digits_cnn"
    run = client.get_run(best_run)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    # The logged model's view shows the run's params and its final metrics, equal to the run's.
    linked = {m.key: m.value for m in model.metrics}
    assert linked["final_valid_loss"] == run.data.metrics["final_valid_loss"] == study.best_value
    assert model.params["lr"] == run.data.params["lr"]
    # torch.export's format, a signature of images, an input example, the installed versions pinned.
    with mlflow_tracking(client.tracking_uri):  # MLflow finds a models:/ URI through its global tracking URI
        local = mlflow.artifacts.download_artifacts(f"models:/{model.model_id}")
    meta = Model.load(local)
    assert (Path(local) / "data" / "model.pt2").is_file() and not (Path(local) / "data" / "model.pth").exists()
    assert meta.signature.inputs.inputs[0].shape == (-1, 1, 8, 8) and meta.signature.outputs.inputs[0].shape == (-1, 10)
    assert np.array_equal(np.array(json.loads((Path(local) / "input_example.json").read_text())), images(5))
    assert (Path(local) / "requirements.txt").read_text().split() == [
        f"{p}=={version(p)}" for p in ("torch", "mlflow", "numpy")]
    # It predicts what `harness predict` prints for the same inputs.
    with mlflow_tracking(client.tracking_uri):
        served = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(images())
    assert np.array_equal(served, runs.predict(best_run, images(), client=client)[1].numpy())
    others = [t.user_attrs["mlflow_run_id"] for t in study.trials if t.number != study.best_trial.number]
    assert all(not client.get_run(r).outputs.model_outputs for r in others)  # only the best, by default


def mlflow_tracking(uri):
    from harness.tracking import scoped_tracking_uri

    return scoped_tracking_uri(uri)


@pytest.mark.slow  # whole searches that log MLflow Models
def test_the_best_trial_is_registered_with_the_champion_alias_and_its_study_s_tags(registered):
    from conftest import client_for

    folder, study = registered
    client = client_for(folder)
    best = study.best_trial
    [version] = client.search_model_versions("name = 'digits'")
    assert client.get_registered_model("digits").aliases == {"champion": version.version}
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    assert version.tags == {"optuna.study_name": "digits_cnn-search", "optuna.trial_number": str(best.number),
                            "harness.objective": "valid_loss", "harness.objective_value": str(best.value)}
    assert version.source == f"models:/{models_of(client, version.run_id)[0]}"


@pytest.mark.slow  # whole searches that log MLflow Models
def test_a_study_of_two_objectives_registers_the_front_member_best_on_the_first(workdir, cli_in_process):
    """Every member of the Pareto front is logged; `--register` makes the champion the one best on the
    first objective (then the second), tagged with both objectives and both values, not whichever
    member Optuna lists first."""
    from conftest import client_for
    from search_helpers import journal_study

    out = cli_in_process("search", "--objectives", "valid_loss", "epochs", "--n-trials", 5, "--epochs-range", 2, 30,
                         "--sampler", "random", "--seed", 3, "--no-progress", "--register", "line", cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    front = sorted(study.best_trials, key=lambda t: (t.values, t.number))
    # The seed draws a front whose first-listed member (the earliest) is not the one best on valid_loss.
    assert study.best_trials[0].number != front[0].number, [t.values for t in study.trials]
    client = client_for(workdir)
    assert all(len(models_of(client, t.user_attrs["mlflow_run_id"])) == 1 for t in front)
    [version] = client.search_model_versions("name = 'line'")
    assert version.run_id == front[0].user_attrs["mlflow_run_id"]
    assert version.tags["optuna.trial_number"] == str(front[0].number)
    assert version.tags["harness.objective"] == "valid_loss, epochs"
    assert version.tags["harness.objective_value"] == ", ".join(map(str, front[0].values))


def models_of(client, run_id) -> list[str]:
    return [o.model_id for o in client.get_run(run_id).outputs.model_outputs]


@pytest.mark.slow  # whole searches that log MLflow Models
def test_register_moves_the_champion_to_another_trial_and_refuses_in_one_line(registered, cli_in_process, tmp_path):
    import shutil

    from conftest import client_for, copy_store

    source, study = registered
    folder = copy_store(source, tmp_path / "copy")
    shutil.copy(source / "optuna_journal.log", folder)
    client = client_for(folder)
    other = next(t for t in study.trials if t.number != study.best_trial.number)
    run_id = other.user_attrs["mlflow_run_id"]
    out = cli_in_process("register", run_id, "--name", "digits", cwd=folder)
    assert out.returncode == 0, out.stderr
    assert "version 2" in out.stdout and "models:/digits@champion" in out.stdout
    assert client.get_registered_model("digits").aliases == {"champion": 2}
    version = client.get_model_version("digits", "2")
    assert version.run_id == run_id and version.tags["optuna.trial_number"] == str(other.number)
    assert float(version.tags["harness.objective_value"]) == other.value
    assert len(models_of(client, run_id)) == 1  # the trial had no model: register logged it
    again = cli_in_process("register", run_id, "--name", "digits", cwd=folder)  # the same model: no new version
    assert again.returncode == 0 and len(client.search_model_versions("name = 'digits'")) == 2

    # Bad input: one line, exit 2, the registry as it was.
    (folder / "state_dict.missing").touch()
    bare = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    client.set_terminated(bare)
    for args, message in (([run_id, "--name", "a/b"], "Names cannot contain '/' or ':'"),
                          ([run_id, "--name", ""], "registered model name ''"),
                          ([run_id, "--name", "x" * 300], "at most 256 printable characters"),
                          (["0" * 32, "--name", "digits"], "does not exist"),
                          ([bare, "--name", "digits"], "has no model to register"),
                          ([run_id, "--name", "digits"], "has no Model Registry")):
        env = {"MLFLOW_REGISTRY_URI": "nowhere://registry"} if "Registry" in message else None
        out = cli_in_process("register", *args, cwd=folder, env=env)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert [m.name for m in client.search_registered_models()] == ["digits"]
    assert len(client.search_model_versions("name = 'digits'")) == 2
    assert client.get_registered_model("digits").aliases == {"champion": 2}


def untouched_trial(source, study, folder):
    """A copy of the ``registered`` store in ``folder``, and the run of a trial that has no MLflow Model."""
    import shutil

    from conftest import copy_store

    copy_store(source, folder)
    shutil.copy(source / "optuna_journal.log", folder)
    trial = next(t for t in study.trials if t.number != study.best_trial.number)
    return trial.user_attrs["mlflow_run_id"]


def logged_models(client, run_id) -> list:
    """The run's logged models that are not deleted, in any MLflow experiment (the harness logs a run's
    model in the run's experiment; one logged elsewhere would show here too)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_logged_models(experiments, filter_string=f"source_run_id = '{run_id}'"))


@pytest.mark.slow  # whole searches that log MLflow Models
def test_a_run_whose_model_another_process_is_logging_keeps_that_one_model(registered, cli_in_process, tmp_path):
    """Issue 26: two invocations that log the same run's model (workers of one study ending on the same
    best trial) each logged their own. One that finds another's model made first, still being logged,
    waits for it and uses it: the run keeps one model, registered once."""
    import threading
    import time

    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from conftest import client_for

    source, study = registered
    folder = tmp_path / "copy"
    run_id = untouched_trial(source, study, folder)
    client = client_for(folder)
    with mlflow_tracking(client.tracking_uri):  # the other process's model, made first and still PENDING
        other = mlflow.initialize_logged_model(name="digits_cnn", source_run_id=run_id,
                                               experiment_id=client.get_run(run_id).info.experiment_id).model_id

    def other_finishes():  # once the command has made its own, so that it finds the other PENDING
        deadline = time.monotonic() + 300
        while len(logged_models(client, run_id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        client.log_outputs(run_id, [LoggedModelOutput(other, 1)])
        client.finalize_logged_model(other, LoggedModelStatus.READY)

    finishing = threading.Thread(target=other_finishes)
    finishing.start()
    try:
        out = cli_in_process("register", run_id, "--name", "digits", cwd=folder)
    finally:
        finishing.join()
    assert out.returncode == 0, out.stderr
    assert [m.model_id for m in logged_models(client, run_id)] == [other] == models_of(client, run_id)
    [version] = [v for v in client.search_model_versions("name = 'digits'") if v.run_id == run_id]
    assert version.source == f"models:/{other}"


@pytest.mark.slow
def test_two_invocations_at_once_on_one_run_log_and_register_one_model(registered, tmp_path):
    """Issue 26: two processes logging and registering the same run's model at the same time (as
    `harness cluster` workers ending on the same best trial do) leave one model and one version of it."""
    import subprocess
    import sys

    from conftest import cli_env, client_for

    source, study = registered
    folder = tmp_path / "copy"
    run_id = untouched_trial(source, study, folder)
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}")
    both = [subprocess.Popen([sys.executable, "-m", "harness", "register", run_id, "--name", "digits"], cwd=folder,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [process.communicate(timeout=600) for process in both]
    assert [process.returncode for process in both] == [0, 0], outs
    client = client_for(folder)
    [model] = logged_models(client, run_id)
    assert models_of(client, run_id) == [model.model_id]
    [version] = [v for v in client.search_model_versions("name = 'digits'") if v.run_id == run_id]
    assert version.source == f"models:/{model.model_id}"
    assert client.get_registered_model("digits").aliases == {"champion": int(version.version)}
    assert outs[0][0] == outs[1][0]  # both say they registered that version


OWN_EXPERIMENT = '''
import torch
from torch import nn
from harness.experiment import Data, Experiment

def make_data():
    X = torch.linspace(-1, 1, 40).unsqueeze(1)
    return Data(X[:30], 2 * X[:30] + 1, X[30:], 2 * X[30:] + 1)

class {name}(nn.Module):
    def __init__(self):
        super().__init__()
        self.line = nn.Linear(1, 1)

    def forward(self, x):
        {forward}

EXPERIMENT = Experiment(name="{name}", make_data=make_data, make_model={name}, optimizers=("sgd",), losses=("mse",),
                        defaults={{"lr": 0.1, "epochs": 3, "valid_fraction": 0.2}})
'''
# torch.export traces one path through the code: a branch on the data's values has none.
BRANCHES = "return self.line(x) if x.sum() > 0 else -self.line(x)"


def live_models(client) -> list:
    """The logged models of every experiment of the store that are not deleted."""
    return client.search_logged_models([e.experiment_id for e in client.search_experiments()])


def own_experiment(folder, name: str, forward: str = "return self.line(x)") -> str:
    (folder / f"{name}.py").write_text(OWN_EXPERIMENT.format(name=name, forward=forward))
    return f"{name}.py"


SMALL_OWN = ["--n-trials", 2, "--no-progress", "--epochs-range", 2, 3, "--pruner", "none"]


@pytest.mark.slow  # whole searches that log MLflow Models
def test_an_experiment_whose_model_does_not_export_is_told_in_one_line_and_keeps_its_artifacts(workdir, cli_in_process):
    from conftest import client_for

    experiment = own_experiment(workdir, "branchy", BRANCHES)
    out = cli_in_process("search", "--experiment", experiment, *SMALL_OWN, cwd=workdir)
    assert out.returncode == 0, out.stderr
    [line] = [line for line in out.stderr.splitlines() if "MLflow Model" in line]
    assert "no MLflow Model logged: experiment 'branchy': torch.export cannot trace its model" in line
    assert "keep state_dict.pt and config.json" in line and "models:/" not in out.stdout
    client = client_for(workdir)
    # Nothing half-written: MLflow's log_model makes its logged model before it traces, and the one it
    # could not trace is deleted (as a deleted run, `mlflow gc` removes it), not left PENDING or FAILED.
    assert live_models(client) == []
    runs_ = all_runs(workdir)
    trial_runs = [r for r in runs_ if "optuna.trial_number" in r.data.tags]
    for run in trial_runs:  # today's artifacts, and `harness predict` still answers
        assert {"state_dict.pt", "config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert cli_in_process("predict", trial_runs[0].info.run_id, "--experiment", experiment, "--x", 0.5,
                          cwd=workdir).returncode == 0
    # With --register the search still runs and records its trials; nothing is registered, and it says so.
    out = cli_in_process("search", "--experiment", experiment, *SMALL_OWN, "--register", "branchy", cwd=workdir)
    # Exit 1, not 2: the trials were written, and the report says so first.
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and "top trials:" in out.stdout, \
        out.stderr
    assert "torch.export cannot trace its model" in out.stderr and "nothing registered as 'branchy'" in out.stderr
    assert client.search_registered_models() == [] and live_models(client) == []
    out = cli_in_process("register", trial_runs[0].info.run_id, "--name", "branchy", "--experiment", experiment,
                         cwd=workdir)
    assert out.returncode == 2 and "has no model to register" in out.stderr and "torch.export" in out.stderr
    assert client.search_registered_models() == [] and live_models(client) == []


@pytest.mark.slow  # whole searches that log MLflow Models
def test_models_none_logs_no_model_and_the_next_invocation_logs_the_best(workdir, cli_in_process):
    """--models none leaves the end's MLflow Model out (a short search's second); the study's best still
    gets one from the next invocation that logs models, whichever invocation trained it."""
    from conftest import client_for
    from search_helpers import journal_study

    experiment = own_experiment(workdir, "own_line")
    out = cli_in_process("search", "--experiment", experiment, *SMALL_OWN, "--models", "none", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "MLflow Model" not in out.stdout + out.stderr
    client = client_for(workdir)
    assert live_models(client) == []
    out = cli_in_process("search", "--experiment", experiment, *SMALL_OWN, "--n-trials", 1, cwd=workdir)
    assert out.returncode == 0, out.stderr
    best = journal_study(workdir, "own_line-search").best_trial
    [model] = live_models(client)
    assert model.source_run_id == best.user_attrs["mlflow_run_id"]


@pytest.mark.slow
def test_every_completed_trial_on_request_and_loading_imports_no_code_of_the_record(workdir, cli_in_process):
    """The load in a process of its own: only a fresh interpreter shows which modules loading imports."""
    import subprocess
    import sys

    from conftest import cli_env, client_for
    from search_helpers import journal_study

    experiment = own_experiment(workdir, "own_line")
    out = cli_in_process("search", "--experiment", experiment, *SMALL_OWN, "--models", "all", cwd=workdir)
    assert out.returncode == 0, out.stderr
    client = client_for(workdir)
    study = journal_study(workdir, "own_line-search")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    ids = {t.number: models_of(client, t.user_attrs["mlflow_run_id"]) for t in complete}
    assert all(len(found) == 1 for found in ids.values()) and out.stdout.count("MLflow Model models:/") == 2
    # The experiment's file is gone, and the model loads and predicts all the same, importing none of it.
    (workdir / experiment).unlink()
    best = ids[study.best_trial.number][0]
    code = ("import sys, mlflow, numpy as np; "
            f"m = mlflow.pyfunc.load_model('models:/{best}'); "
            "print(m.predict(np.array([[0.25], [0.5]], dtype=np.float32)).tolist()); "
            "print(sorted(k for k in sys.modules if k.startswith(('own_line', 'harness', 'experiments'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300,
                            env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}"))
    assert loaded.returncode == 0, loaded.stderr
    predicted, imported = loaded.stdout.strip().splitlines()[-2:]
    assert imported == "[]"
    state = runs.load_state_dict(client, study.best_trial.user_attrs["mlflow_run_id"])
    expected = (torch.tensor([[0.25], [0.5]]) * state["line.weight"] + state["line.bias"]).tolist()
    assert np.allclose(json.loads(predicted), expected, rtol=1e-6)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_what_harness_predict_and_pyfunc_answer(registered, cli_in_process, tmp_path):
    """`mlflow models serve -m models:/NAME@champion` as a user starts it: a real server on loopback."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow

    from conftest import cli_env, client_for

    folder, study = registered
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    port, x = free_port(), images(4)
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m", "models:/digits@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=folder, env=cli_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # a bound on the wait, not a timing: it starts in ~20 s on a busy machine
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            served = np.array(json.loads(answer.read())["predictions"], dtype=np.float32)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    with mlflow_tracking(uri):
        loaded = mlflow.pyfunc.load_model("models:/digits@champion").predict(x)
    assert served.shape == (4, 10)
    assert np.array_equal(served, loaded)
    assert np.array_equal(served, runs.predict(best_run, x, client=client_for(folder))[1].numpy())
    np.save(tmp_path / "x.npy", x)  # and what `harness predict` prints for them, to its 6 digits
    out = cli_in_process("predict", best_run, "--input", tmp_path / "x.npy", cwd=folder)
    printed = [[float(v) for v in line.split(" -> ")[1].split()] for line in out.stdout.splitlines()]
    assert np.allclose(printed, served, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_mlflow_ui_shows_the_model_on_its_run_and_links_it_to_the_run_s_metrics(registered, tmp_path):
    """What a person sees, in headless Chromium (skipped without it)."""
    import os

    from browser import Browser, chromium, sign_in
    from harness.cluster import ADMIN, TrackingServer

    if chromium() is None:
        pytest.skip("needs Chromium (Debian: apt-get install chromium)")
    folder, study = registered
    best = study.best_trial
    run_id = best.user_attrs["mlflow_run_id"]
    from conftest import client_for

    client = client_for(folder)
    [model_id] = models_of(client, run_id)
    experiment_id = client.get_run(run_id).info.experiment_id  # digits_cnn's: the run and its model are there
    shots = Path(os.environ.get("HARNESS_UI_SCREENSHOTS") or tmp_path)
    server = TrackingServer(f"sqlite:///{folder / 'mlflow.db'}", tmp_path / "served", workers=1).start()
    try:
        with Browser() as browser:
            sign_in(browser, ADMIN, server.password).open(f"{server.url}/#/experiments/{experiment_id}/runs/{run_id}")
            text = browser.wait_for_text("Logged models (1)", "Registered models", "final_valid_loss", timeout=90)
            assert "digits_cnn" in text and "digits" in text
            browser.screenshot(shots / "run_with_model.png")
            browser.open(f"{server.url}/#/experiments/{experiment_id}/models/{model_id}")
            text = browser.wait_for_text("Source run", f"trial-{best.number}", "Model versions", "final_valid_loss",
                                         timeout=90)
            browser.screenshot(shots / "logged_model.png")
            assert "Not registered" not in text  # its version is listed on it
    finally:
        server.stop()


@pytest.mark.slow
def test_search_register_and_register_on_mlflow_server_with_postgresql(tmp_path, cli_in_process, cluster_services):
    """The engines users scale out on, real: PostgreSQL and `mlflow server` with served artifacts
    (the session's, which tests/test_scale_out.py uses too; skipped where PostgreSQL is not installed)."""
    from conftest import cli_env, run_cli, served_login

    storage, tracking_uri = cluster_services["storage"], cluster_services["tracking_uri"]
    login = {"MLFLOW_TRACKING_URI": tracking_uri, **cluster_services["login"]}
    with served_login(cluster_services):
        env = cli_env(**login)
        work = tmp_path / "work"
        work.mkdir()
        out = run_cli("search", "--storage", storage, "--n-trials", 2, *SMALL_DIGITS, "--register", "served",
                      cwd=work, env=env)
        assert out.returncode == 0, out.stderr
        assert "registered trial" in out.stdout and "models:/served@champion" in out.stdout
        import optuna
        from mlflow import MlflowClient

        from harness.search.study import open_storage

        study = optuna.load_study(study_name="digits_cnn-search", storage=open_storage(storage))
        client = MlflowClient(tracking_uri)
        [version] = client.search_model_versions("name = 'served'")
        assert version.run_id == study.best_trial.user_attrs["mlflow_run_id"]
        assert version.tags["optuna.trial_number"] == str(study.best_trial.number)
        other = next(t for t in study.trials if t.number != study.best_trial.number)
        # register in-process (was two processes): the search above is the real one on these engines.
        out = cli_in_process("register", other.user_attrs["mlflow_run_id"], "--name", "served", cwd=work, env=login)
        assert out.returncode == 0, out.stderr
        aliases = client.get_registered_model("served").aliases  # the server's REST answer holds strings
        assert {k: str(v) for k, v in aliases.items()} == {"champion": "2"}
        assert client.get_model_version("served", "2").run_id == other.user_attrs["mlflow_run_id"]
        out = cli_in_process("register", other.user_attrs["mlflow_run_id"], "--name", "a:b", cwd=work, env=login)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
        assert [m.name for m in client.search_registered_models()] == ["served"]
