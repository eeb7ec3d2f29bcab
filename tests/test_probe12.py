"""What a twelfth outside probe broke (issue 26), each as its class: the experiment's own code raising
where the harness draws, reads or logs (not where it trains), a BaseException out of the user's code,
and a signal while a search logs its models at the end."""
import json
import os
import textwrap

import pytest

from conftest import ROOT, all_runs, client_for, slow_cases
from harness.schema import PROCESS_TAG
from search_helpers import journal_study

# The reference experiment whose hooks raise as the environment asks: HOOK names the one, FROM the
# call from which it raises (make_model's first calls build the trials, later ones the MLflow Model).
HOOKED = (ROOT / "experiments" / "linear_regression.py").read_text().replace(
    "from harness.experiment import Data, Experiment",
    textwrap.dedent("""\
        import os
        import sys
        from harness.experiment import Data, Experiment

        CALLS = {}


        def raises(hook):
            key = hook, os.environ.get("TAG")  # the module is loaded once a process: counted a test apiece
            CALLS[key] = CALLS.get(key, 0) + 1
            if os.environ.get("HOOK") == hook and CALLS[key] >= int(os.environ.get("FROM", "1")):
                kind = os.environ.get("KIND", "error")
                if kind == "exit":
                    sys.exit(3)
                if kind == "base":
                    raise Custom("user base exception")
                if kind == "interrupt":
                    raise KeyboardInterrupt("user interrupt")
                raise RuntimeError(f"user {hook} failed{os.environ.get('TAG', '')}")


        class Custom(BaseException):
            pass
        """)).replace(
    '    """The reference\'s plot_predictions: training data, test data and the model\'s test predictions."""',
    '    """The reference\'s plot_predictions: training data, test data and the model\'s test predictions."""\n'
    '    raises("plot")').replace(
    '    return {"weight": model.weights.item(), "bias": model.bias.item()}',
    '    raises("scalars")\n    return {"weight": model.weights.item(), "bias": model.bias.item()}').replace(
    "        super().__init__()\n", "        super().__init__()\n        raises('model')\n").replace(
    "def make_data() -> Data:\n", "def make_data() -> Data:\n    raises('data')\n").replace(
    "        return self.weights * x + self.bias",
    "        raises('forward')\n        if torch.compiler.is_exporting():\n            raises('export')\n"
    "        return self.weights * x + self.bias")


def hooked(workdir, monkeypatch, hook: str, start: int = 1, kind: str = "error") -> str:
    """The experiment file; its error's message is the test's own (each distinct line is said once a process)."""
    monkeypatch.setenv("TAG", f" ({os.environ['PYTEST_CURRENT_TEST'].split('::')[-1].rsplit(' (', 1)[0]})")
    (workdir / "lr2.py").write_text(HOOKED.replace('name="linear_regression"', 'name="lr2"'))
    monkeypatch.setenv("HOOK", hook)
    monkeypatch.setenv("FROM", str(start))
    monkeypatch.setenv("KIND", kind)
    return "lr2.py"


def statuses(workdir) -> list[str]:
    return sorted(run.info.status for run in all_runs(workdir))


@pytest.mark.slow  # whole searches and trainings in-process
def test_a_plot_that_raises_leaves_the_figure_out_of_a_train_run_in_one_line(workdir, cli_in_process, monkeypatch):
    """Was: exit 1, a traceback at plots.py, the fully trained run FAILED with no reason."""
    experiment = hooked(workdir, monkeypatch, "plot")
    out = cli_in_process("train", "--epochs", 3, "--experiment", experiment, cwd=workdir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    [line] = [l for l in out.stderr.splitlines() if "plot_predictions" in l]
    assert "RuntimeError: user plot failed (" in line and "left out" in line
    [run] = all_runs(workdir)
    assert run.info.status == "FINISHED" and "final_test_loss" in run.data.metrics
    names = {a.path for a in client_for(workdir).list_artifacts(run.info.run_id)}
    assert "state_dict.pt" in names and "loss_curves.png" in names and "predictions.png" not in names


@pytest.mark.slow  # whole searches and trainings in-process
def test_a_plot_that_raises_in_a_search_leaves_the_figures_out_and_the_search_goes_on(workdir, cli_in_process,
                                                                                     monkeypatch):
    """Was: exit 1 'tracking failed: a write to the MLflow store failed', the search stopped, trial 0 FAILED.
    The best trial's figures for the parent at the end go through the same drawing."""
    experiment = hooked(workdir, monkeypatch, "plot")
    out = cli_in_process("search", "--experiment", experiment, "--n-trials", 2, "--epochs-range", 2, 5,
                         "--pruner", "none", "--trial-figures", "--no-progress", cwd=workdir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert len([l for l in out.stderr.splitlines() if "plot_predictions" in l]) == 1, out.stderr
    assert [t.state.name for t in journal_study(workdir, "lr2-search").trials] == ["COMPLETE", "COMPLETE"]
    assert statuses(workdir) == ["FINISHED"] * 3


def test_scalars_that_raise_after_training_fail_the_run_with_the_experiment_s_reason(workdir, cli_in_process,
                                                                                   monkeypatch):
    """scalars() is read off the trained model, after the training loop: it raised past the loop's
    handling (a traceback, the run FAILED with no reason). Now it is the experiment's error as any other:
    train exits 1 with one line, a search fails the trial and goes on."""
    experiment = hooked(workdir, monkeypatch, "scalars", start=2)  # the first: the pre-flight check
    out = cli_in_process("train", "--epochs", 3, "--experiment", experiment, cwd=workdir)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("scalars() raised RuntimeError: user scalars failed "
                                                       f"{os.environ['TAG'].strip()}"), out.stderr
    [run] = all_runs(workdir)
    assert run.info.status == "FAILED" and "scalars() raised" in run.data.tags["harness.fail_reason"]


@pytest.mark.slow  # whole searches and trainings in-process
def test_scalars_that_raise_after_training_fail_the_trial_and_the_search_goes_on(workdir, cli_in_process,
                                                                                monkeypatch):
    experiment = hooked(workdir, monkeypatch, "scalars", start=2)
    out = cli_in_process("search", "--experiment", experiment, "--n-trials", 2, "--epochs-range", 2, 5,
                         "--pruner", "none", "--pairs", "sgd+l1", "--no-progress", cwd=workdir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert [t.state.name for t in journal_study(workdir, "lr2-search").trials] == ["FAIL", "FAIL"]
    assert "RUNNING" not in statuses(workdir)


@pytest.mark.parametrize("kind,named,batch", [("exit", "SystemExit: 3", 1), ("base", "Custom: user base exception", 1),
                                              ("exit", "SystemExit: 3", 2)])
@pytest.mark.slow  # whole searches and trainings in-process
def test_sys_exit_in_the_experiment_s_code_stops_a_search_in_one_line_with_nothing_left_running(
        workdir, cli_in_process, monkeypatch, kind, named, batch):
    """Was: exit 3 with no message (or exit 1 with a traceback), the parent run left RUNNING. The trial
    fails with the reason, the search stops (the code asked to), exit 1, and the parent is closed."""
    experiment = hooked(workdir, monkeypatch, "forward", start=30, kind=kind)
    out = cli_in_process("search", "--experiment", experiment, "--n-trials", 2, "--epochs-range", 20, 30,
                         "--pruner", "none", "--pairs", "sgd+l1", "--no-progress", "--batch", batch, cwd=workdir)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    lines = [l for l in out.stderr.strip().splitlines() if not l.startswith("harness: --batch")]  # its note
    line = lines[-1]
    assert len(lines) == 1, lines
    assert line.startswith("harness: error: the search stopped: the experiment's code raised at epoch") and \
        named in line and "resume with: harness search" in line, line
    assert [t.state.name for t in journal_study(workdir, "lr2-search").trials] == ["FAIL"] * batch
    assert statuses(workdir) == ["FAILED"] * batch + ["FINISHED"]  # the trials' runs, the parent
    for trial_run in [r for r in all_runs(workdir) if r.info.status == "FAILED"]:
        assert named in trial_run.data.tags["harness.fail_reason"]


@pytest.mark.parametrize("kind,named", [("exit", "SystemExit: 3"), ("base", "Custom: user base exception")])
def test_sys_exit_in_the_experiment_s_code_fails_a_train_run_in_one_line(workdir, cli_in_process, monkeypatch,
                                                                         kind, named):
    experiment = hooked(workdir, monkeypatch, "forward", start=30, kind=kind)
    out = cli_in_process("train", "--epochs", 20, "--experiment", experiment, cwd=workdir)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith(named), out.stderr
    [run] = all_runs(workdir)
    assert run.info.status == "FAILED" and named in run.data.tags["harness.fail_reason"]


@pytest.mark.parametrize("command, kind, named", [("train", "exit", "SystemExit: 3"),
                                                   ("search", "base", "Custom: user base exception")])
def test_sys_exit_in_the_pre_flight_check_stops_in_one_line_before_anything_is_written(
        workdir, cli_in_process, monkeypatch, command, kind, named):
    """Was: exit 2 "cannot train with ...: SystemExit: 3", the code's asking to stop taken for refused
    input, where the same in make_model stopped with exit 1: errors.asked_to_stop's rule is one rule."""
    experiment = hooked(workdir, monkeypatch, "forward", kind=kind)
    out = cli_in_process(command, "--experiment", experiment, "--epochs", 2, cwd=workdir) if command == "train" \
        else cli_in_process(command, "--experiment", experiment, "--n-trials", 1, "--no-progress", cwd=workdir)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"harness: error: {command} stopped: the experiment's code raised {named}"], out.stderr
    assert all_runs(workdir) == [] and not (workdir / "optuna_journal.log").exists()


def test_sys_exit_in_reproduce_s_pre_flight_check_stops_in_one_line_with_no_re_run(workdir, cli_in_process,
                                                                                     monkeypatch):
    experiment = hooked(workdir, monkeypatch, "none")
    assert cli_in_process("train", "--experiment", experiment, "--epochs", 2, cwd=workdir).returncode == 0
    [run] = all_runs(workdir)
    monkeypatch.setenv("HOOK", "scalars")
    monkeypatch.setenv("KIND", "exit")
    out = cli_in_process("reproduce", run.info.run_id, "--experiment", experiment, cwd=workdir)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == \
        "harness: error: reproduce stopped: the experiment's code raised SystemExit: 3", out.stderr
    assert [r.info.run_id for r in all_runs(workdir)] == [run.info.run_id]


@pytest.mark.parametrize("register", [False, True])
@pytest.mark.slow  # whole searches and trainings in-process
def test_the_experiment_s_model_failing_at_the_end_keeps_the_search_s_report(workdir, cli_in_process, monkeypatch,
                                                                              register):
    """make_model raising from its 4th call: the pre-flight check and both trials build it, the MLflow Model
    at the end does not. Was: exit 2 'cannot build its model' after both trials were written, no summary."""
    experiment = hooked(workdir, monkeypatch, "model", start=4)
    out = cli_in_process("search", "--experiment", experiment, "--n-trials", 2, "--epochs-range", 2, 5,
                         "--pruner", "none", "--pairs", "sgd+l1", "--models", "all", "--no-progress",
                         *(["--register", "lr2-model"] if register else []), cwd=workdir)
    assert out.returncode == (1 if register else 0) and "Traceback" not in out.stderr, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "no MLflow Model logged: experiment 'lr2' cannot build its model" in line, line
    assert ("nothing registered as 'lr2-model'" in line) == register
    assert "top trials:" in out.stdout and "2 trials (2 complete)" in out.stdout, out.stdout
    assert [t.state.name for t in journal_study(workdir, "lr2-search").trials] == ["COMPLETE", "COMPLETE"]
    assert statuses(workdir) == ["FINISHED"] * 3
    client = client_for(workdir)
    assert client.search_logged_models([r.info.experiment_id for r in all_runs(workdir)][:1]) == []
    assert client.search_registered_models() == []


@pytest.mark.slow  # whole searches and trainings in-process
def test_a_signal_while_the_models_are_logged_stops_after_the_one_in_hand(workdir, cli_in_process, monkeypatch):
    """Was: 'interrupt received; finishing the record first, then stopping', then every model logged, exit 0.
    The model in hand is logged whole (signals are held), no other is started, exit 130."""
    import os
    import signal

    from harness import models, signals

    monkeypatch.setattr(signals, "_received", [])  # this process's signals: none before, none kept after
    monkeypatch.setattr(signals, "_acted", [0])
    real, calls = models.log_run_model, []

    def interrupted_while_logging(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "log_run_model", interrupted_while_logging)
    out = cli_in_process("search", "--n-trials", 3, "--epochs-range", 2, 5, "--pruner", "none", "--models", "all",
                         "--no-progress", cwd=workdir)
    assert out.returncode == 130 and "Traceback" not in out.stderr, out.stderr
    assert len(calls) == 1 and "harness: interrupted" in out.stderr, out.stderr
    client = client_for(workdir)
    [model] = client.search_logged_models([all_runs(workdir)[0].info.experiment_id])
    assert model.status.name == "READY" and model.source_run_id == calls[0]
    assert json.loads(model.tags[PROCESS_TAG])["pid"] == os.getpid()  # what `audit` tells a dead logger by
    assert "RUNNING" not in statuses(workdir)
    assert [t.state.name for t in journal_study(workdir).trials] == ["COMPLETE"] * 3


@pytest.mark.parametrize("hook,start,named", [("forward", 3, "the experiment's code raised at epoch 0"),
                                              ("scalars", 2, "scalars() raised"), ("plot", 1, None)])
@pytest.mark.slow  # whole searches and trainings in-process
def test_reproduce_of_an_experiment_whose_code_raises_says_it_in_one_line(workdir, cli_in_process, monkeypatch,
                                                                          hook, start, named):
    """Was: a traceback (reproduce trains before it logs: nothing is written). A plot that raises leaves
    out its figure, and the run is still reproduced."""
    experiment = hooked(workdir, monkeypatch, "none")
    assert cli_in_process("train", "--epochs", 3, "--experiment", experiment, cwd=workdir).returncode == 0
    [run] = all_runs(workdir)
    monkeypatch.setenv("HOOK", hook)
    monkeypatch.setenv("FROM", str(start))
    monkeypatch.setenv("TAG", os.environ["TAG"] + hook)  # counted anew
    out = cli_in_process("reproduce", run.info.run_id, "--experiment", experiment, cwd=workdir)
    assert "Traceback" not in out.stderr, out.stderr
    if named is None:
        assert out.returncode == 0 and "reproduced run" in out.stdout, out.stderr
        return
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"harness: error: {named}" + out.stderr.strip().split(named, 1)[1]], out.stderr
    assert f"user {hook} failed" in out.stderr and len(all_runs(workdir)) == 1


# Each command that calls the experiment's code outside training, at each place it calls it: (command,
# hook, the call that raises, the line's start). reproduce's pre-flight step builds the model and runs it
# first (refused there, exit 2, as train's): its calls after that are the ones here.
STOPS = [("predict", "data", 1, "predict stopped: the experiment's code raised"),
         ("predict", "model", 1, "predict stopped: the experiment's code raised"),
         ("predict", "forward", 1, "predict stopped: the experiment's code raised"),
         ("register", "data", 1, "register stopped: the experiment's code raised"),
         ("register", "model", 1, "register stopped: the experiment's code raised"),
         ("register", "forward", 1, "register stopped: the experiment's code raised"),  # its signature
         ("register", "forward", 2, "register stopped: the experiment's code raised"),  # torch.export's trace
         ("reproduce", "data", 1, "reproduce stopped: the experiment's code raised"),
         ("reproduce", "model", 2, "reproduce stopped: the experiment's code raised"),  # the logged weights' fit
         ("reproduce", "model", 3, "the experiment's code raised at epoch 0:"),  # the re-run's
         ("reproduce", "forward", 3, "the experiment's code raised at epoch 0:"),
         ("reproduce", "plot", 1, "the experiment's code raised at epoch 3:")]  # the re-run's record


# sys.exit() at every place; a BaseException of the code's own at one place of each command.
KINDS = [(*stop, "exit", "SystemExit: 3") for stop in STOPS] + \
    [(*STOPS[i], "base", "Custom: user base exception") for i in (2, 6, 10)]


# The fast tier: one place a command for sys.exit() (reproduce's at the re-run's record, the one that
# leaves a FAILED run), and one BaseException of the code's own; the whole suite every place.
FAST = [KINDS[0], KINDS[3], KINDS[11], KINDS[12]]


@pytest.mark.parametrize("command,hook,start,said,kind,named",
                         slow_cases(KINDS, slow=[k for k in KINDS if k not in FAST]))
def test_sys_exit_in_the_experiment_s_code_ends_every_command_in_one_line(workdir, cli_in_process, monkeypatch,
                                                                          command, hook, start, said, kind, named):
    """Was: predict, register and reproduce ended with the code's own exit status (3) and not a word, or
    a traceback for a BaseException of its own; register could leave its logged model PENDING. Now one
    line, exit 1, nothing half-written: no logged or registered model, no re-run but one that trained in
    full, FAILED with the reason."""
    experiment = hooked(workdir, monkeypatch, "none")
    (workdir / "in.json").write_text("[[0.5]]")
    assert cli_in_process("train", "--epochs", 3, "--experiment", experiment, cwd=workdir).returncode == 0
    [run] = all_runs(workdir)
    monkeypatch.setenv("HOOK", hook)
    monkeypatch.setenv("FROM", str(start))
    monkeypatch.setenv("KIND", kind)
    monkeypatch.setenv("TAG", os.environ["TAG"] + f"{command}-{hook}-{start}-{kind}")  # counted anew
    extra = {"predict": ["--input", "in.json"], "register": ["--name", "m"], "reproduce": []}[command]
    out = cli_in_process(command, run.info.run_id, *extra, "--experiment", experiment, cwd=workdir)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [f"harness: error: {said} {named}"], \
        out.stderr
    assert not out.stdout
    client = client_for(workdir)
    runs = all_runs(workdir)
    assert client.search_logged_models([run.info.experiment_id]) == [] and client.search_registered_models() == []
    if hook != "plot":
        assert [r.info.run_id for r in runs] == [run.info.run_id]
        return
    [again] = [r for r in runs if r.info.run_id != run.info.run_id]
    assert again.info.status == "FAILED" and again.data.tags["harness.fail_reason"] == f"{said} {named}"


def logged_model_statuses(workdir) -> list[str]:
    """Every logged model's status, deleted ones too (the API lists none of those): MLflow's table."""
    import sqlite3
    from contextlib import closing

    from mlflow.entities import LoggedModelStatus

    with closing(sqlite3.connect(workdir / "mlflow.db")) as db:
        return sorted(LoggedModelStatus.from_int(s).name for s, in db.execute("SELECT status FROM logged_models"))


SEARCH = ("search", "--n-trials", 2, "--epochs-range", 2, 4, "--pruner", "none", "--pairs", "sgd+l1", "--no-progress")
# Where the experiment's code runs after training, and the command line that gets there: a search's
# best trial's figures for its parent (plain, in threads, batched), its trials' figures, its best
# trial's MLflow Model (torch.export's trace), that and --register, register's own model, train's figures.
AFTER_TRAINING = {"search plot": ("plot", SEARCH), "search plot n-jobs": ("plot", (*SEARCH, "--n-jobs", 2)),
                  "search plot batch": ("plot", (*SEARCH, "--batch", 2)),
                  "search trial figures": ("plot", (*SEARCH, "--trial-figures")),
                  "search model": ("export", SEARCH), "search register": ("export", (*SEARCH, "--register", "m")),
                  "register": ("export", ("register",)), "train plot": ("plot", ("train", "--epochs", 3))}
STOPPED = [("exit", "SystemExit: 3"), ("interrupt", None), ("base", "Custom: user base exception")]


@pytest.mark.parametrize("where,kind,named", slow_cases(
    [(where, kind, named) for kind, named in STOPPED for where in AFTER_TRAINING]))
def test_the_experiment_s_code_asking_to_stop_after_training_leaves_nothing_running_or_pending(
        workdir, cli_in_process, monkeypatch, where, kind, named):
    """Was: a plot's sys.exit() at a search's end left its parent run RUNNING (exit 1, no summary),
    its trials' figures said 'tracking failed'; one in torch.export's trace left the logged model
    PENDING. Now sys.exit() or a BaseException of its own ends the command in one line, exit 1; a
    KeyboardInterrupt it raises as Ctrl-C does (exit 130, the resume hint); nothing is left RUNNING
    or PENDING, and a search's trials stand."""
    hook, args = AFTER_TRAINING[where]
    experiment = hooked(workdir, monkeypatch, "none")
    if args[0] == "register":
        assert cli_in_process("train", "--epochs", 3, "--experiment", experiment, cwd=workdir).returncode == 0
        args = ("register", all_runs(workdir)[0].info.run_id, "--name", "m")
    monkeypatch.setenv("HOOK", hook)
    monkeypatch.setenv("KIND", kind)
    out = cli_in_process(*args, "--experiment", experiment, cwd=workdir)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [l for l in out.stderr.strip().splitlines() if not l.startswith("harness: --batch")]  # its note
    command = args[0]
    if named is None:
        assert out.returncode == 130 and lines[-1].startswith("harness: interrupted"), out.stderr
        assert ("resume with: harness search" in lines[-1]) == (command == "search"), lines
    else:
        assert out.returncode == 1 and len(lines) == 1 and named in lines[0], out.stderr
        assert lines[0].startswith({"search": "harness: error: the search stopped: ",
                                    "register": "harness: error: register stopped: ",
                                    "train": "harness: error: run "}[command]), lines
    assert "RUNNING" not in statuses(workdir)
    assert "PENDING" not in logged_model_statuses(workdir) and client_for(workdir).search_registered_models() == []
    if command == "search":
        trials = journal_study(workdir, "lr2-search").trials
        assert trials and all(t.state.name == "COMPLETE" for t in trials), trials
        assert statuses(workdir) == ["FINISHED"] * (len(trials) + 1)
    if command == "train":
        assert statuses(workdir) == ["KILLED" if named is None else "FAILED"]
