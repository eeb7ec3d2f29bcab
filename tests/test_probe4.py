"""What a fourth outside probe broke (issue 26), each as its class: a valid input that a figure cannot
draw, a user's scalar shadowed by a name the harness computes, a `harness train` killed with -9, and
an experiment whose code lives partly in files it imports."""
import pytest
from mlflow import MlflowClient


def runs(workdir):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("low, high", [("1e-300", "1e-290"), ("1e-320", "1e-310")])
@pytest.mark.slow  # whole searches in-process
def test_a_valid_range_no_figure_can_draw_is_searched_and_the_figure_left_out(in_workdir, cli_in_process, low, high):
    """A learning rate Optuna and torch take, over which matplotlib cannot put a log axis: the search
    ends as usual (exit 0, parent FINISHED, audit clean), the figure left out in one line. Before: a
    'tracking failed' stop with the parent RUNNING, and every later search of the study the same."""
    out = cli_in_process("search", "--lr-range", low, high, "--n-trials", 2, "--epochs-range", 5, 10,
                         "--no-progress", cwd=in_workdir)
    assert out.returncode == 0, out.stderr
    assert "not drawn" in out.stderr and "tracking failed" not in out.stderr, out.stderr
    _, found = runs(in_workdir)
    assert len(found) == 3 and {r.info.status for r in found} == {"FINISHED"}
    out = cli_in_process("audit", "--study", "linear_regression-search", cwd=in_workdir)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr


SHADOWING = """
import torch
from torch import nn
from harness.experiment import Data, Experiment

def make_data():
    X = torch.linspace(0, 1, 40).unsqueeze(1)
    return Data(X[:30], X[:30] * 0.7, X[30:], X[30:] * 0.7)

class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x * self.weight

EXPERIMENT = Experiment(name="shadowing", make_data=make_data, make_model=Line, losses=("mse",),
                        defaults={{"optimizer": "sgd", "loss": "mse", "epochs": 3}}, truth={{"weight": 0.7}},
                        scalars=lambda model: {{"weight": float(model.weight), {name!r}: 3.0}})
"""


@pytest.mark.parametrize("name, command, line", [
    ("weight_error", ["train"], "scalars() gave 'weight_error', the name of the error the run computes"),
    ("weight_error", ["search", "--n-trials", "1"], "scalars() gave 'weight_error', the name of the error"),
    ("objective_valid_loss", ["search", "--n-trials", "1", "--objectives", "valid_loss", "epochs"],
     "has a scalar named 'objective_valid_loss', a name the run logs itself"),
])
def test_a_scalar_named_as_a_value_the_run_computes_is_refused_before_training(tmp_path, capsys, monkeypatch,
                                                                                name, command, line):
    """Not stored as the computed value with the user's own lost (a weight_error of 3.0 logged as 0.3)."""
    from search_helpers import check_refused_in_process

    code, folder = tmp_path / "code", tmp_path / "run"
    code.mkdir(), folder.mkdir()
    (code / "shadowing.py").write_text(SHADOWING.format(name=name))
    check_refused_in_process([*command, "--experiment", str(code / "shadowing.py")], line, capsys, folder, monkeypatch)


@pytest.mark.slow  # a real process, killed with -9
def test_a_train_killed_with_minus_9_is_closed_by_the_next_and_can_be_resumed(in_workdir, cli_in_process):
    """Nothing a user logged is left RUNNING: the next `harness train` on the store closes the run of
    a `harness train` whose process is gone, KILLED with the reason, and says how to go on; a run whose
    process still trains it is neither closed nor resumed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import cli_env
    from harness.schema import FAIL_REASON_TAG, RESUMED_TAG

    flags = ["train", "--epochs", "10000000", "--checkpoint-every", "1000"]
    victim = subprocess.Popen([sys.executable, "-m", "harness", *flags], cwd=in_workdir,
                              env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{in_workdir / 'mlflow.db'}"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, found = time.time() + 120, []
        while time.time() < deadline and not any("harness.process" in r.data.tags for r in found):
            time.sleep(0.5)
            found = runs(in_workdir)[1] if (in_workdir / "mlflow.db").exists() else []
        (running,) = found
        out = cli_in_process(*flags, "--resume", running.info.run_id, cwd=in_workdir)
        assert out.returncode == 2 and "is RUNNING, trained by process" in out.stderr, out.stderr
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    assert runs(in_workdir)[1][0].info.status == "RUNNING"  # what kill -9 leaves
    out = cli_in_process("train", "--epochs", 3, cwd=in_workdir)
    assert out.returncode == 0 and f"run {running.info.run_id} was left RUNNING" in out.stderr, out.stderr
    client, found = runs(in_workdir)
    by_id = {r.info.run_id: r for r in found}
    assert by_id[running.info.run_id].info.status == "KILLED"
    assert by_id[running.info.run_id].data.tags[FAIL_REASON_TAG] == "worker died"
    assert {r.info.status for r in found} == {"KILLED", "FINISHED"}
    out = cli_in_process("train", "--epochs", 3, "--resume", running.info.run_id, cwd=in_workdir)
    assert out.returncode == 2 and "another config (epochs differ)" in out.stderr, out.stderr


def test_a_train_run_names_its_process_only_in_the_write_that_holds_its_config(in_workdir, cli_in_process,
                                                                              monkeypatch):
    """A run found naming its process (what a user, or the next `harness train`, sees of a run that may
    be killed) already holds the config a --resume is checked against: the two land in one write.
    Before: the process tag came first, and a run killed in between took a --resume of any config."""
    from mlflow import MlflowClient

    from harness.schema import PROCESS_TAG

    writes = []
    real_batch, real_tag = MlflowClient.log_batch, MlflowClient.set_tag

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kw):
        writes.append(({p.key for p in params}, {t.key for t in tags}))
        return real_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    def set_tag(self, run_id, key, value, **kw):
        writes.append((set(), {key}))
        return real_tag(self, run_id, key, value, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    monkeypatch.setattr(MlflowClient, "set_tag", set_tag)
    assert cli_in_process("train", "--epochs", 3, cwd=in_workdir).returncode == 0
    first = next(params for params, tags in writes if PROCESS_TAG in tags)
    assert {"epochs", "lr", "optimizer", "loss", "seed"} <= first, first


@pytest.mark.slow  # whole searches in-process
def test_a_study_resumed_after_a_helper_its_experiment_imports_changed_is_refused(tmp_path, in_workdir,
                                                                                  cli_in_process, monkeypatch):
    """The experiment file only imports its EXPERIMENT from a helper of its folder: an edit to the
    helper (other data) is an edit to the experiment, as an edit to the file is."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper_of_wrap.py").write_text(
        "from dataclasses import replace\nfrom experiments.linear_regression import EXPERIMENT as BASE\n"
        "EXPERIMENT = replace(BASE, name='wrapped')\n")
    (code / "wrap.py").write_text("from helper_of_wrap import EXPERIMENT\n")
    monkeypatch.syspath_prepend(str(code))
    search = ["search", "--experiment", code / "wrap.py", "--n-trials", 1, "--epochs-range", 5, 10, "--no-progress"]
    assert cli_in_process(*search, cwd=in_workdir).returncode == 0
    assert cli_in_process(*search, cwd=in_workdir).returncode == 0  # unchanged: resumed
    with (code / "helper_of_wrap.py").open("a") as helper:
        helper.write("# other data from here on\n")
    out = cli_in_process(*search, cwd=in_workdir)
    assert out.returncode == 2 and "study 'wrapped-search' was created with experiment 'wrapped'" in out.stderr, out.stderr


def test_a_store_in_a_place_this_process_may_not_write_is_a_store_failure_not_bad_input():
    """Exit 1 (the store fails; the URL is right) for a read-only or forbidden place, exit 2 for a
    store that does not answer, whatever wraps the OSError (SQLAlchemy, MLflow)."""
    import errno

    from harness import tracking
    from harness.errors import HarnessError, UsageError

    for number in (errno.EROFS, errno.EACCES):
        try:
            try:
                raise OSError(number, "denied", "/data/mlflow.db.harness-lock")
            except OSError as inner:
                raise RuntimeError("wrapped") from inner
        except RuntimeError as exc:
            error = tracking.unreachable("the MLflow tracking store", "sqlite:////data/mlflow.db", 0.0, exc)
        assert type(error) is HarnessError and "cannot write the MLflow tracking store" in str(error)
    error = tracking.unreachable("the MLflow tracking store", "http://u:pw@host:1", 3.0, ConnectionError("refused"))
    assert type(error) is UsageError and "pw" not in str(error)


@pytest.mark.slow  # whole searches in-process
def test_a_study_another_worker_is_creating_is_read_once_it_is_whole(in_workdir, monkeypatch):
    """Two workers starting together on a new study: the one that creates it writes its objectives,
    space and experiment after Optuna makes it; the other read it in between and refused it as a study
    of other objectives ('has objectives test_loss, not valid_loss'), exiting 2."""
    import threading

    from harness.cli import build_parser
    from harness.search import objectives as objectives_module
    from harness.search import session
    from harness.search.options import SearchOptions

    options = SearchOptions.from_args(build_parser().parse_args(["search", "--study-name", "together", "--n-trials", "1"]))
    created, read = threading.Event(), threading.Event()
    name_study = objectives_module.name_study

    def slowly(study, objectives):  # the creating worker, paused between Optuna's create and its own attrs
        created.set()
        read.wait(3)
        name_study(study, objectives)

    monkeypatch.setattr(objectives_module, "name_study", slowly)
    errors = []

    def other_worker():
        created.wait(30)
        try:
            session._open_study(options)
        except Exception as exc:  # noqa: BLE001 - what the worker would have exited with
            errors.append(exc)
        read.set()

    thread = threading.Thread(target=other_worker)
    thread.start()
    study, _, _ = session._open_study(options)
    thread.join(60)
    assert not errors, errors
    assert objectives_module.of_study(study) == options.trials.objectives
