"""Opening what a search wrote, and checking the tracking contract between the two stores."""
import warnings

import optuna
import torch
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import client_for
from harness import schema
from harness.experiment import load

STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


def journal_study(workdir, name="linear_regression-search"):
    """The study a CLI search left in the default embedded storage of ``workdir``."""
    storage = JournalStorage(JournalFileBackend(str(workdir / "optuna_journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def journal_trials(workdir, name="linear_regression-search") -> list:
    """The trials so far of a search still starting: none while the journal file or the study in it
    is not there yet (the file is made before the study's first record)."""
    if not (workdir / "optuna_journal.log").exists():
        return []
    try:
        return journal_study(workdir, name).trials
    except KeyError:
        return []


def check_refused_in_process(argv, line, capsys, folder, monkeypatch) -> None:
    """``harness ARGV`` run in-process in the empty ``folder``: exit 2, one line holding ``line``, and
    nothing written there (no store created)."""
    from harness.cli import main

    monkeypatch.chdir(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err, err
    assert list(folder.iterdir()) == []


def check_contract(workdir, study, *, figures_for=None, client=None):
    """Every point of the tracking contract, one to one between the trials and the child runs.

    ``client`` reads another store than ``workdir``'s (a tracking server). Returns (parent run,
    {trial number: child run}).
    """
    client = client or client_for(workdir)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    tags = parent.data.tags
    assert tags["optuna.study_name"] == study.study_name
    assert tags["optuna.direction"] == " ".join(d.name for d in study.directions)
    assert {"optuna.storage", "optuna.sampler", "optuna.pruner"} <= set(tags)
    assert parent.info.status == "FINISHED"
    # What the parent run shows in `mlflow ui`: its space and settings as params, its description.
    assert {"space.lr", "space.epochs", "space.optimizer_loss", "study.sampler", "study.pruner",
            "study.direction"} <= set(parent.data.params)
    assert parent.data.params["study.direction"] == " ".join(d.name.lower() for d in study.directions)
    note = tags["mlflow.note.content"]
    assert note.startswith(f"### Optuna study `{study.study_name}`") and "**Search space:**" in note
    if len(study.directions) > 1:  # two objectives: the front's first trial, by test loss
        best = sorted(study.best_trials, key=lambda t: (*t.values, t.number))[:1]
    else:
        best = [study.best_trial] if any(t.state == TrialState.COMPLETE for t in study.trials) else []
    for trial in best:  # a link to the best run
        assert f"/runs/{trial.user_attrs['mlflow_run_id']})" in note
    children = client.search_runs([parent.info.experiment_id], max_results=5000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_id = {r.info.run_id: r for r in children}
    started = [t for t in study.trials if t.state != TrialState.WAITING]  # a queued retry has no run yet
    assert len(by_id) == len(started)  # exactly one run per trial ...
    runs = {}
    for trial in started:
        run = by_id.pop(trial.user_attrs["mlflow_run_id"])  # ... and one trial per run
        runs[trial.number] = run
        reason = run.data.tags.get("harness.fail_reason", "")
        if trial.state == TrialState.PRUNED and reason.startswith("pruned at epoch"):
            # Visibly pruned: KILLED is drawn like a failure in the UI.
            assert run.info.run_name == f"trial-{trial.number} ({reason})"
            assert reason in run.data.tags["mlflow.note.content"]
            assert reason == f"pruned at epoch {max(trial.intermediate_values)}"
        else:
            assert run.info.run_name == f"trial-{trial.number}"
        assert run.data.tags["optuna.study_name"] == study.study_name
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["optuna.trial_state"] == trial.state.name
        interrupted = trial.state == TrialState.FAIL and run.data.tags.get("harness.fail_reason") == "interrupted"
        assert run.info.status == ("KILLED" if interrupted else STATUS[trial.state])
        params = run.data.params
        assert params["trial_number"] == str(trial.number)
        assert float(params["lr"]) == trial.params["lr"]
        assert int(params["epochs"]) == trial.params["epochs"]
        assert f"{params['optimizer']}+{params['loss']}" == trial.params["optimizer_loss"]
        for key in ("train_loss", "valid_loss", "test_loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)) and sorted(steps) == list(range(len(steps)))
            if trial.state == TrialState.COMPLETE:
                assert len(steps) == trial.params["epochs"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        if trial.state == TrialState.COMPLETE:
            objective = study.user_attrs.get(schema.OBJECTIVES_ATTR, ["valid_loss"])[0]
            assert objective.startswith("valid_")  # selected on validation data
            assert run.data.metrics[f"final_{objective}"] == trial.values[0]
            # The trial keeps its final values on the data it was selected on (for the tables of the
            # best trials), the selection metric first; its test values stay in its run.
            measured = trial.user_attrs[schema.METRICS_ATTR]
            assert list(measured)[0] == objective and measured == {
                k.removeprefix("final_"): v for k, v in run.data.metrics.items() if k.startswith("final_valid_")}
            assert {"state_dict.pt", "config.json"} <= artifacts
            state = torch.load(client.download_artifacts(run.info.run_id, "state_dict.pt", str(workdir)),
                               weights_only=True)
            assert set(state) == set(load(params["experiment"]).make_model().state_dict())
        else:
            assert "final_test_loss" not in run.data.metrics
        has_figures = {"loss_curves.png", "predictions.png"} <= artifacts
        if figures_for is not None:
            assert has_figures == (trial.number in figures_for), trial.number
    assert not by_id
    return parent, runs

# An experiment file whose model raises from its 31st call on: past the pre-flight batch, a bug that
# shows in the middle of training (tests of user code that breaks).
BREAKS = '''import torch
from torch import nn
from harness.experiment import Data, Experiment

class Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(1, 1), 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 30:  # past the pre-flight batch: a bug that shows in the middle of training
            raise RuntimeError("user code broke at call 31")
        return self.lin(x)

def data():
    X = torch.linspace(0, 1, 50).unsqueeze(1)
    return Data(X[:40], 0.7 * X[:40] + 0.3, X[40:], 0.7 * X[40:] + 0.3)

EXPERIMENT = Experiment("breaks", data, Breaks, search_space={"epochs": [20, 30], "pairs": ["sgd+l1"]})
'''


def with_warnings_printed(cli_in_process, *args, cwd):
    """``cli_in_process``'s result with the warnings a process of its own would have printed on its
    stderr (Python's default filters, not pytest's, which keeps them to itself) added to its stderr."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)
        out = cli_in_process(*args, cwd=cwd)
    out.stderr += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown)
    return out
