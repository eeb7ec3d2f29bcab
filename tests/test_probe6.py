"""What a sixth outside probe broke (issue 26), each as its class: code an experiment loads from its
own package or folder that its sha256 did not cover, and a checkpoint whose optimizer was not the
run's. (Its findings on `harness cluster --postgres` are in test_cluster_security.py.)"""
import pytest

WRAPPED = ("from dataclasses import replace\nfrom experiments.linear_regression import EXPERIMENT as BASE\n"
           "WEIGHT = 0.7\nEXPERIMENT = replace(BASE, name={name!r})\n")


def search_twice_then_edit(code, edited, in_workdir, cli_in_process, experiment, study):
    """Search, resume unchanged (exit 0), then for each file of ``edited`` in turn append to it and
    resume again: the CompletedProcess of each of those resumes."""
    search = ["search", "--experiment", experiment, "--study-name", study, "--n-trials", 1,
              "--epochs-range", 5, 10, "--no-progress"]
    first = cli_in_process(*search, cwd=in_workdir)
    assert first.returncode == 0, first.stderr
    again = cli_in_process(*search, cwd=in_workdir)
    assert again.returncode == 0, again.stderr  # unchanged: resumed
    resumed = []
    for name in edited:
        with (code / name).open("a") as file:
            file.write("WEIGHT = 5.0\n")
        resumed.append(cli_in_process(*search, cwd=in_workdir))
    return resumed


@pytest.mark.parametrize("package, import_line", [
    ("p6pkg", "from .helper import EXPERIMENT"),
    ("p6pkg_module", "from . import helper\nEXPERIMENT = helper.EXPERIMENT"),
])
@pytest.mark.slow  # whole searches of a file's experiment in-process
def test_a_package_experiment_s_relative_import_is_part_of_its_identity(tmp_path, in_workdir, cli_in_process,
                                                                       monkeypatch, package, import_line):
    """`p6pkg/exp.py` takes its data from `.helper`: an edited helper is refused as an edited exp.py is,
    an edited module of the package that it does not load is not."""
    code = tmp_path / "code" / package
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "helper.py").write_text(WRAPPED.format(name=package))
    (code / "exp.py").write_text(import_line + "\n")
    (code / "unrelated.py").write_text("")
    monkeypatch.syspath_prepend(str(code.parent))
    # One study for both edits (was a search of its own per edit): the unrelated edit resumes it.
    unrelated, helper = search_twice_then_edit(code, ["unrelated.py", "helper.py"], in_workdir, cli_in_process,
                                               f"{package}.exp", "rel")
    assert unrelated.returncode == 0, unrelated.stderr
    assert helper.returncode == 2 and "study 'rel' was created with experiment" in helper.stderr, helper.stderr


@pytest.mark.parametrize("name_expression", ["'p6dyn_literal'", "'p6dyn_' + 'computed'"])
@pytest.mark.slow  # whole searches of a file's experiment in-process
def test_a_helper_a_file_experiment_loads_with_import_module_is_part_of_its_identity(
        tmp_path, in_workdir, cli_in_process, monkeypatch, name_expression):
    """`a/exp.py` puts its folder on sys.path and loads its helper with importlib.import_module, by a
    literal name or a computed one."""
    name = eval(name_expression)
    code = tmp_path / "a"
    code.mkdir()
    (code / f"{name}.py").write_text(WRAPPED.format(name=name))
    (code / "exp.py").write_text(
        "import importlib, os, sys\nsys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
        f"EXPERIMENT = importlib.import_module({name_expression}).EXPERIMENT\n")
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # what exp.py adds goes with the test
    [out] = search_twice_then_edit(code, [f"{name}.py"], in_workdir, cli_in_process, code / "exp.py", "dyn")
    assert out.returncode == 2 and "study 'dyn' was created with experiment" in out.stderr, out.stderr


def checkpointed(overrides: dict):
    """A linear_regression run's config, experiment and data, and its checkpoint after epoch 2 of 4."""
    import io

    import torch

    from harness import checkpoint, config, training
    from harness.experiment import load

    experiment = load("linear_regression")
    data = experiment.load_data()
    cfg, _ = config.resolve({"experiment": "linear_regression", "device": "cpu", "epochs": 4, "batch_size": 10,
                             **overrides}, experiment=experiment, n_train=data.n_train)
    cfg = config.validate(cfg, experiment, data.n_train)
    written = []
    training.train(cfg, experiment, data, checkpoints=checkpoint.Checkpoints(
        write=lambda state: written.append(checkpoint.to_bytes(state)), every=2))
    return cfg, experiment, data, torch.load(io.BytesIO(written[0]), weights_only=True)


RUNS = {
    "sgd": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.001},
    "adam": {"optimizer": "adam"},
    "step": {"scheduler": "step"},
    "cosine": {"scheduler": "cosine"},
    "warmup_cosine": {"scheduler": "warmup_cosine"},
    "plateau": {"scheduler": "plateau"},
    "onecycle": {"scheduler": "onecycle", "optimizer": "sgd", "momentum": 0.9},
}


@pytest.mark.parametrize("run", RUNS)
def test_a_checkpoint_whose_optimizer_settings_are_not_the_run_s_is_refused(run):
    """Probe 6, smaller 1: a checkpoint with its config untouched but lr=0.5 in its optimizer state
    trained on at 0.5 under param lr=0.01. Any setting a param group holds (lr, its initial_lr under a
    schedule, momentum, betas, weight_decay, eps...) must be the one the run's config builds; only what
    the schedule moves may differ, and then it must be what the schedule's state last set."""
    from harness import checkpoint, training

    cfg, experiment, data, state = checkpointed(RUNS[run])
    assert training.train(cfg, experiment, data, resume=state).history.epochs_run == 4  # untouched: continues
    group = state["optimizer"]["param_groups"][0]
    tampered = [key for key in ("lr", "initial_lr", "momentum", "betas", "weight_decay", "eps") if key in group]
    assert "lr" in tampered and ("momentum" in tampered or "betas" in tampered)
    for key in tampered:
        was = group[key]
        group[key] = tuple(v * 3 + 0.01 for v in was) if isinstance(was, tuple) else was * 3 + 0.01
        try:
            with pytest.raises(checkpoint.Unusable):
                training.train(cfg, experiment, data, resume=state)
        finally:
            group[key] = was
