"""Bring your own experiment: the examples of the README and docs/experiments.md as printed, files
and modules of your own, the digits experiment, and bad experiment files; checked by opening both stores."""
import hashlib
import shlex
import sys
import textwrap

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import ROOT, all_runs, cli_env, client_for, readme_blocks, run_cli
from search_helpers import BREAKS, check_contract, journal_study


def readme_example() -> tuple[str, list[str]]:
    """The python block and the command lines of the README's 'Bring your own experiment' section."""
    return readme_blocks("## Bring your own experiment")


def harness(command: str, *extra, cwd, run=run_cli, **kw):
    """A ``harness ...`` line as printed, run as a process, or through ``run`` (cli_in_process)."""
    argv = shlex.split(command)
    assert argv[0] == "harness"
    return run(*argv[1:], *extra, cwd=cwd, **kw)


@pytest.mark.slow
def test_readme_example_runs_as_printed_end_to_end(workdir, cli_in_process):
    code, commands = readme_example()
    assert len(code.splitlines()) <= 40
    (workdir / "my_experiment.py").write_text(code)
    sha = hashlib.sha256(code.encode()).hexdigest()
    train, search, reproduce, predict = commands

    out = harness(train, cwd=workdir)
    assert out.returncode == 0, out.stderr
    [run] = all_runs(workdir)
    params = run.data.params
    assert params["hidden"] == "64" and params["batch_size"] == "32" and params["weight_decay"] == "0.0"
    assert params["experiment"] == str(workdir / "my_experiment.py") and params["experiment_sha256"] == sha
    client = client_for(workdir)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 20
    assert len(client.get_metric_history(run.info.run_id, "valid_loss")) == 20  # the experiment's own part
    rates = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "learning_rate"), key=lambda m: m.step)]
    assert rates[0] == 0.01 and rates == sorted(rates, reverse=True)  # the cosine schedule

    out = harness(search, "--n-trials", "3", "--no-progress", cwd=workdir)  # the README's 10, cut to 3
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir, "noisy_sine-search")
    assert len(study.trials) == 3
    _, runs = check_contract(workdir, study)
    for trial in study.trials:
        assert {"hidden", "batch_size", "weight_decay"} <= set(trial.params)
        assert 8 <= trial.params["hidden"] <= 128 and trial.params["batch_size"] in (32, 64, 128)
        assert 1e-6 <= trial.params["weight_decay"] <= 1e-2
        logged = runs[trial.number].data.params
        assert logged["hidden"] == str(trial.params["hidden"]) and logged["experiment_sha256"] == sha
    best = study.best_trial.user_attrs["mlflow_run_id"]
    # in-process (was a real process): not one of the README's commands
    assert cli_in_process("audit", "--study", "noisy_sine-search", cwd=workdir).returncode == 0

    out = harness(reproduce.replace("RUN_ID", best), cwd=workdir)
    assert out.returncode == 0 and "bitwise identical" in out.stdout, out.stderr
    out = harness(predict.replace("RUN_ID", best), cwd=workdir)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2, out.stderr

    # In-process from here (were real processes): what follows the README's commands.
    # A run's record never chooses code to import: without --experiment the user is told what to name.
    out = cli_in_process("reproduce", best, cwd=workdir)
    assert out.returncode == 2 and f"--experiment {workdir / 'my_experiment.py'}" in out.stderr
    # A changed file: said, and the re-run still compared; a missing one: refused.
    with open(workdir / "my_experiment.py", "a") as f:
        f.write("# edited\n")
    out = harness(reproduce.replace("RUN_ID", best), cwd=workdir, run=cli_in_process)
    assert out.returncode == 0 and "has changed since run" in out.stderr, out.stderr
    (workdir / "my_experiment.py").unlink()
    out = harness(predict.replace("RUN_ID", best), cwd=workdir, run=cli_in_process)
    assert out.returncode == 2 and "experiment file 'my_experiment.py' does not exist" in out.stderr


@pytest.mark.slow
def test_readme_own_step_example_runs_as_printed(workdir, cli_in_process):
    code, (train, search, reproduce) = readme_blocks("**Your own step.**", doc="docs/experiments.md")
    (workdir / "two_inputs.py").write_text(code)
    out = harness(train, cwd=workdir)
    assert out.returncode == 0, out.stderr
    [run] = all_runs(workdir)
    assert run.data.params["mixup"] == "0.4" and run.data.params["width"] == "16"
    client = client_for(workdir)
    for key in ("train_aux_loss", "train_accuracy", "valid_accuracy", "test_aux_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(10)), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"state_dict.pt", "config.json", "loss_curves.png"} <= artifacts and "predictions.png" not in artifacts

    out = harness(search, "--n-trials", "3", "--no-progress", cwd=workdir)  # the docs' 6, cut to 3
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "Selected on valid_accuracy (maximized, on validation data)" in out.stdout
    study = journal_study(workdir, "two_inputs-search")
    assert [d.name for d in study.directions] == ["MAXIMIZE"] and len(study.trials) == 3
    _, runs = check_contract(workdir, study)
    assert all({"mixup", "width"} <= set(t.params) for t in study.trials)
    best = study.best_trial.user_attrs["mlflow_run_id"]
    out = harness(reproduce.replace("RUN_ID", best), cwd=workdir)
    assert out.returncode == 0 and "bitwise identical" in out.stdout, out.stderr
    out = cli_in_process("predict", best, "--experiment", "two_inputs.py", "--x", "1", "2", cwd=workdir)  # was a process
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "each sample of this experiment is a dict of several inputs" in out.stderr, out.stderr


EXPERIMENT_WITH = """
import torch
from torch import nn
from harness.experiment import Data, Experiment

def make_data():
    X = torch.linspace(0, 1, 20).unsqueeze(1)
    return {data}

def make_model():
    {model}

EXPERIMENT = Experiment(name="broken", make_data=make_data, make_model=make_model, losses=("mse",),
                        defaults={{"optimizer": "sgd", "loss": "mse", "epochs": 2}})
"""
GOOD_DATA, GOOD_MODEL = "Data(X[:15], X[:15], X[15:], X[15:])", "return nn.Linear(1, 1)"

BAD_FILES = {
    "raises.py": ("import torch\nraise RuntimeError('no data here')\n", "raised on import: RuntimeError: no data here"),
    "syntax.py": ("def (:\n", "raised on import: SyntaxError"),
    "exits.py": ("import sys\nsys.exit(3)\n", "raised on import: SystemExit: 3"),
    "empty.py": ("x = 1\n", "defines no EXPERIMENT"),
    "wrong.py": ("EXPERIMENT = {'name': 'x'}\n", "EXPERIMENT is a dict, not a harness Experiment"),
    # The experiment's own code failing: one line, before any store is touched.
    "data_raises.py": (EXPERIMENT_WITH.format(data="1 / 0", model=GOOD_MODEL),
                       "make_data() failed: ZeroDivisionError: division by zero"),
    "data_empty.py": (EXPERIMENT_WITH.format(data="Data(X[:0], X[:0], X, X)", model=GOOD_MODEL),
                      "make_data() gave 0 training and 20 test samples"),
    "model_raises.py": (EXPERIMENT_WITH.format(data=GOOD_DATA, model="raise RuntimeError('boom\\nsecond line')"),
                        "cannot build its model with no hyperparameters: RuntimeError: boom"),
    "model_none.py": (EXPERIMENT_WITH.format(data=GOOD_DATA, model="return None"),
                      "make_model returned a NoneType, not a torch nn.Module"),
    "no_params.py": (EXPERIMENT_WITH.format(data=GOOD_DATA, model="return nn.Identity()"),
                     "cannot train with sgd+mse, no hyperparameters: ValueError: optimizer got an empty parameter"),
    "bad_shape.py": (EXPERIMENT_WITH.format(data=GOOD_DATA, model="return nn.Linear(3, 1)"),
                     "cannot train with sgd+mse, no hyperparameters: RuntimeError: mat1 and mat2 shapes"),
}


def bad_experiment_files(folder) -> list[tuple[str, str]]:
    """Every kind of bad experiment file or module written in ``folder``: (reference, what its line says)."""
    for name, (content, message) in BAD_FILES.items():
        (folder / name).write_text(content)
    (folder / "folder.py").mkdir()
    (folder / "loop.py").symlink_to("loop.py")
    (folder / "pkg").mkdir()
    (folder / "pkg" / "__init__.py").write_text("")
    (folder / "pkg" / "quits.py").write_text("raise SystemExit('bye')\n")
    cases = [(name, message) for name, (_, message) in BAD_FILES.items()]
    return cases + [("missing.py", "experiment file 'missing.py' does not exist"),
                    ("folder.py", "experiment file 'folder.py' is not a regular file"),
                    ("loop.py", "experiment file 'loop.py' cannot be resolved"),
                    ("pkg.quits", "experiment module 'pkg.quits' raised on import: SystemExit: bye"),
                    ("no_such.module", "unknown experiment 'no_such.module'")]


def names_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "__pycache__")


@pytest.mark.parametrize("command", ["train", "search"])
def test_bad_experiment_files_are_one_line_exit_2_and_write_nothing(tmp_path, command, cli_in_process, monkeypatch):
    """In-process (was a real process per case); the test below shows one as a user's process does."""
    cases = bad_experiment_files(tmp_path)
    before = names_in(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH=tmp_path gives a process
    try:
        for reference, message in cases:
            out = cli_in_process(command, "--experiment", reference, cwd=tmp_path)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1 and message in lines[0], (reference, out.stderr)
    finally:
        sys.modules.pop("pkg", None)  # the next test's pkg/ is another folder's
    assert names_in(tmp_path) == before  # no store, no journal


@pytest.mark.slow
def test_an_experiment_file_that_exits_on_import_is_one_line_exit_2_from_a_real_process(tmp_path):
    """The matrix above as a user's process shows it: a module's sys.exit() ends not the harness."""
    reference, message = "exits.py", BAD_FILES["exits.py"][1]
    bad_experiment_files(tmp_path)
    before = names_in(tmp_path)
    out = run_cli("search", "--experiment", reference, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    assert names_in(tmp_path) == before


EXPERIMENT_MODULE = textwrap.dedent('''
    import torch
    from torch import nn
    from harness.experiment import Data, Experiment, Hyperparameter

    def make_data():
        X = torch.linspace(0, 1, 40).unsqueeze(1)
        return Data(X[:30], 2 * X[:30], X[30:], 2 * X[30:])

    EXPERIMENT = Experiment(
        name="slope", make_data=make_data, losses=("mse",),
        make_model=lambda scale: nn.Sequential(nn.Linear(1, 1)) if scale else None,
        hyperparameters=(Hyperparameter("scale", "categorical", "one", choices=("one", "two")),),
        defaults={"optimizer": "sgd", "loss": "mse", "lr": 0.1, "epochs": 5})
''')


@pytest.mark.slow
def test_a_dotted_module_of_your_own_trains_reproduces_and_refuses_bad_input(workdir, cli_in_process, monkeypatch):
    package = workdir / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "slope.py").write_text(EXPERIMENT_MODULE)
    env = cli_env(PYTHONPATH=str(workdir))
    out = run_cli("train", "--experiment", "mypkg.slope", "--set", "scale=two", "--set", "batch_size=7",
                  cwd=workdir, env=env)
    assert out.returncode == 0, out.stderr
    [run] = all_runs(workdir)
    assert run.data.params["experiment"] == "mypkg.slope" and run.data.params["scale"] == "two"
    monkeypatch.syspath_prepend(str(workdir))  # reproduce and the refusals in-process (were real processes)
    try:
        out = cli_in_process("reproduce", run.info.run_id, "--experiment", "mypkg.slope", cwd=workdir)
        assert out.returncode == 0, out.stderr
        for args, message in ((["--set", "scale=three"], "unknown scale 'three'; allowed: one, two"),
                              (["--set", "scael=two"], "did you mean 'scale'?"),
                              (["--set", "batch_size=31"], "at most the training set's size 30"),
                              (["--set", "momentum=0.5", "--optimizer", "adam"],
                               "momentum applies to optimizers muon, rmsprop, sgd only")):
            out = cli_in_process("train", "--experiment", "mypkg.slope", *args, cwd=workdir)
            assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, args
    finally:
        for name in ("mypkg.slope", "mypkg"):
            sys.modules.pop(name, None)
    assert len(all_runs(workdir)) == 2  # the run and its reproduction; nothing from the refused ones


@pytest.mark.slow  # a whole search in-process
def test_objective_takes_a_file_of_your_own(tmp_path, monkeypatch):
    from harness import Objective

    path = tmp_path / "slope.py"
    path.write_text(EXPERIMENT_MODULE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    with Objective(str(path), track=False, base={"batch_size": 10}) as objective:
        assert objective.base.batch_size == 10 and objective.experiment.sha256 == hashlib.sha256(
            path.read_bytes()).hexdigest()
        study.optimize(objective, n_trials=2)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


@pytest.mark.slow
def test_digits_search_with_two_threads_reproduces_every_trial_and_audits_clean(workdir, cli_in_process):
    # In-process (was a process): the two threads share this process's generator as they would a worker's.
    out = cli_in_process("search", "--experiment", "digits", "--n-trials", 3, "--n-jobs", 2, "--seed", 1,
                         "--epochs-range", 2, 4, "--pruner", "none", "--no-progress", cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir, "digits-search")
    parent, runs = check_contract(workdir, study, figures_for={study.best_trial.number})
    assert parent.data.metrics["best_final_test_accuracy"] == runs[study.best_trial.number].data.metrics[
        "final_test_accuracy"]
    for trial in study.trials:
        assert {"hidden", "dropout", "batch_size"} <= set(trial.params)
        assert ("momentum" in trial.params) == trial.params["optimizer_loss"].startswith("sgd")
        # dropout draws from torch's global generator: two threads must not share it mid-training.
        # Re-run in-process (was a process each): alone either way, with the thread count it trained with.
        out = cli_in_process("reproduce", trial.user_attrs["mlflow_run_id"], cwd=workdir)
        assert out.returncode == 0, out.stderr
    out = cli_in_process("audit", "--study", "digits-search", cwd=workdir)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout
    out = cli_in_process("compare", "--study", "digits-search", "--metric", "final_test_accuracy", "--descending",
                         "--csv", "top.csv", cwd=workdir)
    assert out.returncode == 0, out.stderr
    import csv

    rows = list(csv.DictReader(open(workdir / "top.csv")))
    # the hyperparameters that differ between the trials are columns of the table
    varying = [k for k in ("hidden", "dropout") if len({t.params[k] for t in study.trials}) > 1]
    assert varying and all(k in rows[0] for k in varying) and "experiment_sha256" not in rows[0]
    model_run = runs[study.best_trial.number].info.run_id
    from harness.runs import load_model

    model = load_model(model_run, client_for(workdir))
    assert model.layers[0].out_features == study.best_trial.params["hidden"]


@pytest.mark.slow
def test_reference_run_logs_parameter_recovery_and_compare_ranks_by_it(workdir, cli_in_process):
    out = cli_in_process("search", "--n-trials", 4, "--seed", 0, "--pruner", "none", "--epochs-range", 20, 60,
                         "--no-progress", cwd=workdir)  # in-process (was a real process)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    parent, runs = check_contract(workdir, study)
    for run in runs.values():
        metrics = run.data.metrics
        assert metrics["weight_error"] == pytest.approx(abs(metrics["weight"] - 0.7), abs=1e-7)
        assert metrics["bias_error"] == pytest.approx(abs(metrics["bias"] - 0.3), abs=1e-7)
    best = runs[study.best_trial.number].data.metrics
    assert parent.data.metrics["best_weight_error"] == best["weight_error"]
    assert parent.data.metrics["best_bias"] == best["bias"]
    out = cli_in_process("compare", "--study", "linear_regression-search", "--metric", "weight_error", "--csv",
                         "w.csv", cwd=workdir)  # in-process (was a real process)
    assert out.returncode == 0, out.stderr
    import csv

    rows = list(csv.DictReader(open(workdir / "w.csv")))
    errors = [float(r["weight_error"]) for r in rows]
    assert errors == sorted(errors) and len(rows) == 4


@pytest.mark.slow
def test_mlflow_run_takes_a_file_experiment_and_a_config_file(workdir):
    """`mlflow run -e train` with a file experiment, a config file and MLproject's own params, logged
    into the run MLflow created (test_train_cli's test_mlflow_run_logs_into_the_run_mlflow_created
    merged here: one `mlflow run`, each start two interpreters, for both)."""
    (workdir / "slope.py").write_text(EXPERIMENT_MODULE)
    (workdir / "run.yaml").write_text("scale: two\n")  # MLproject's own params always come as flags
    out = run_cli("mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
                  "-P", f"experiment={workdir / 'slope.py'}", "-P", f"config={workdir / 'run.yaml'}",
                  "-P", "batch_size=10", "-P", "loss=mse", "-P", "epochs=3", "-P", "lr=0.05", cwd=workdir,
                  module=False, env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}"))
    assert out.returncode == 0, out.stderr[-3000:]
    [run] = all_runs(workdir)  # one run: the harness did not open a second
    assert run.info.status == "FINISHED"
    assert run.data.params["scale"] == "two" and run.data.params["batch_size"] == "10"
    assert run.data.params["lr"] == "0.05" and run.data.params["epochs"] == "3"
    assert run.data.params["torch_version"] == torch.__version__
    assert len(client_for(workdir).get_metric_history(run.info.run_id, "test_loss")) == 3
    assert "state_dict.pt" in {a.path for a in client_for(workdir).list_artifacts(run.info.run_id)}
    state = torch.load(client_for(workdir).download_artifacts(run.info.run_id, "state_dict.pt", str(workdir)),
                       weights_only=True)
    assert set(state) == {"0.weight", "0.bias"}


@pytest.mark.parametrize("args, message", [
    # --set reaches keys that also have a flag of their own; a flag that is given wins
    (["train", "--set", "lr=nan"], "lr must be a positive number, got 'nan'"),
    (["train", "--set", "optimizer=bogus"], "unknown optimizer 'bogus'"),
    (["train", "--set", "seed=-5"], "seed must be an integer >= 0, got '-5'"),
    (["train", "--set", "experiment=digits"], "--set experiment=... is not taken"),
    (["train", "--epochs", "²"], "epochs must be a positive integer, got '²'"),
    (["search", "--n-trials", "²"], "--n-trials must be a positive integer, got '²'"),
    (["search", "--set", "device=tpu"], "unknown device 'tpu'"),
    # fixed values must suit every pair the space can sample
    (["search", "--experiment", "digits", "--set", "momentum=0.5", "--pairs", "adam+cross_entropy"],
     "momentum applies to optimizers muon, rmsprop, sgd only, got momentum=0.5 with optimizer 'adam'"),
    (["search", "--epochs-range", "20000000", "20000001"], "epochs bound must be at most 10000000"),
    (["search", "--experiment", "digits", "--tune", "weight_decay="], "--tune weight_decay= needs a range"),
    (["search", "--experiment", "digits", "--tune", "hidden=" + "[" * 3000], "is not valid YAML/JSON"),
    (["search", "--experiment", "digits", "--tune", "hidden=[16, " + "9" * 5000 + "]"],
     "is not valid YAML/JSON"),
    (["search", "--sampler", "grid", "--experiment", "digits", "--tune", "weight_decay=[1e-6, 1e-2]",
      "--tune", "momentum=[0.0, 0.9]", "--space", "grid.yaml"], "at most 1000000 allowed"),
])
def test_bad_values_through_every_door_are_one_line_exit_2_and_write_nothing(tmp_path, args, message, cli_in_process):
    """In-process (was a real process per case): test_bad_input's real-process test shows a refusal as
    a user's process does."""
    (tmp_path / "grid.yaml").write_text("grid_points: 100\n")
    out = cli_in_process(*args, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


@pytest.mark.slow
def test_set_and_search_fixed_values_that_suit_every_pair_are_used(workdir, cli_in_process):
    """In-process (were two processes): test_a_dotted_module_of_your_own... hands --set to a real one."""
    out = cli_in_process("train", "--experiment", "digits", "--set", "optimizer=sgd", "--set", "momentum=0.5",
                  "--set", "epochs=1", "--set", "lr=0.05", cwd=workdir)
    assert out.returncode == 0, out.stderr
    [run] = all_runs(workdir)
    params = run.data.params
    assert (params["optimizer"], params["momentum"], params["epochs"], params["lr"]) == ("sgd", "0.5", "1", "0.05")
    out = cli_in_process("search", "--experiment", "digits", "--set", "momentum=0.5", "--pairs", "sgd+cross_entropy",
                  "--tune", "momentum=false", "--epochs-range", 1, 2, "--n-trials", 1, "--no-progress", cwd=workdir)
    assert out.returncode == 0, out.stderr
    [trial] = journal_study(workdir, "digits-search").trials
    assert "momentum" not in trial.params
    assert client_for(workdir).get_run(trial.user_attrs["mlflow_run_id"]).data.params["momentum"] == "0.5"



@pytest.mark.slow
def test_user_code_that_raises_mid_training_fails_the_run_in_one_line_and_leaves_nothing_running(workdir,
                                                                                                 cli_in_process):
    """The first search as a real process; the rest in-process (were real processes)."""
    (workdir / "breaks.py").write_text(BREAKS)
    out = run_cli("search", "--experiment", "breaks.py", "--n-trials", 2, "--no-progress", cwd=workdir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        "harness: a trial failed, the search goes on: the experiment's code raised at epoch 10: RuntimeError: "
        "user code broke at call 31"]
    study = journal_study(workdir, "breaks-search")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    out = cli_in_process("train", "--experiment", "breaks.py", cwd=workdir)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("FAILED: the experiment's code raised at epoch 15: "
                                                        "RuntimeError: user code broke at call 31")
    runs = all_runs(workdir)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FAILED", "FINISHED"]  # the parent: FINISHED
    assert all("user code broke" in r.data.tags["harness.fail_reason"] for r in runs if r.info.status == "FAILED")
    assert cli_in_process("audit", "--study", "breaks-search", cwd=workdir).returncode == 0
    # Trials trained in batches (--batch): the same, for each trial of the batch.
    out = cli_in_process("search", "--experiment", "breaks.py", "--n-trials", 4, "--batch", 2, "--study-name",
                         "batched", "--no-progress", cwd=workdir)  # in-process (was a process)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert [t.state.name for t in journal_study(workdir, "batched").trials] == ["FAIL"] * 4
    assert cli_in_process("audit", "--study", "batched", cwd=workdir).returncode == 0
