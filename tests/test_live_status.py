"""While a search runs, its parent run's description shows the running trials (issue 28): which trial,
its params, epochs done, latest selection value, worker and run, read from the Optuna storage; the
end-of-search summary replaces it. The browser check of the same is in tests/test_mlflow_ui.py."""
import re
import socket

import optuna
import pytest

from harness import tracking
from harness.schema import PROGRESS_ATTR, RUN_ATTR, WORKER_ATTR
from harness.search import status
from search_helpers import journal_study

# An experiment that looks at its study's parent run while a trial trains: once the Optuna journal holds
# the trial's report of its second epoch (written as that epoch ends; the trial was linked to its run at
# its first), it waits (at most a minute) for a description that shows the trial past it, and keeps it.
LOOKING = """
import os
import re
import sqlite3
import time
from pathlib import Path
from contextlib import closing
from dataclasses import replace
from experiments.linear_regression import EXPERIMENT as BASE

SEEN = []
QUERY = ("SELECT value FROM tags WHERE key = 'mlflow.note.content' AND run_uuid IN "
         "(SELECT run_uuid FROM tags WHERE key = 'harness.role' AND value = 'study')")

def metrics(pred, y):
    if not SEEN and os.path.exists({journal!r}) and '"step":1,' in Path({journal!r}).read_text():
        deadline, row = time.time() + 60, None
        while time.time() < deadline:
            with closing(sqlite3.connect({store!r}, timeout=30)) as db:
                row = db.execute(QUERY).fetchone()
            if row and "**Running now:**" in row[0] and "trial-" in row[0] and re.search(r"\\| [2-9] / \\d+ \\|", row[0]):
                break
            time.sleep(0.05)
        SEEN.append(row[0] if row else "")  # what it showed (at the deadline: what it showed then)
    return {{}}

EXPERIMENT = replace(BASE, name="looking", metrics=metrics)
"""


@pytest.mark.slow  # a whole search in-process
def test_the_parent_run_shows_the_running_trial_while_it_trains_then_the_summary(in_workdir, cli_in_process,
                                                                                  tmp_path, monkeypatch):
    import os

    from mlflow import MlflowClient

    monkeypatch.setattr(tracking, "LIVE_SECONDS", 0.0)
    code = tmp_path / "looking.py"
    code.write_text(LOOKING.format(store=str(in_workdir / "mlflow.db"), journal=str(in_workdir / "optuna_journal.log")))
    out = cli_in_process("search", "--experiment", code, "--n-trials", 2, "--epochs-range", 7, 8, "--seed", 0,
                         "--report-every", 1, "--no-progress", cwd=in_workdir)
    assert out.returncode == 0, out.stderr
    from harness.experiment import load

    seen = load(str(code)).metrics.__globals__["SEEN"]
    assert seen and "**Running now:**" in seen[0], seen
    study = journal_study(in_workdir, "looking-search")
    row = re.search(r"\| (\d+) \| (\d+) / (\d+) \| (\S+) \| (.*) \| (.*) \| \[trial-\1\]\(#/experiments/\d+/runs/(\w+)\) \|",
                    seen[0])
    assert row, seen[0]
    number, done, epochs, value, params, worker, run_id = row.groups()
    trial = study.trials[int(number)]
    assert "**Running now:** 1 trial(s)" in seen[0] and "| trial | epochs done | valid_loss |" in seen[0]
    assert trial.user_attrs[RUN_ATTR] == run_id and worker == f"{socket.gethostname()} pid {os.getpid()}"
    assert f"lr={trial.params['lr']:.4g}" in params
    client = MlflowClient(f"sqlite:///{in_workdir / 'mlflow.db'}")
    curve = sorted(client.get_metric_history(run_id, "valid_loss"), key=lambda m: m.step)
    assert int(epochs) == trial.params["epochs"] and 1 <= int(done) < int(epochs) and value == f"{curve[int(done) - 1].value:.6g}"  # the value of the epoch shown

    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    note = parent.data.tags["mlflow.note.content"]
    assert "**Trials:** 2 (2 complete)" in note and "Running now" not in note  # the summary replaced it
    assert parent.info.status == "FINISHED"
    trials_csv = client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    assert PROGRESS_ATTR not in open(trials_csv).read()  # how far a trial got while it ran: not a result


@pytest.mark.slow  # a whole search in-process
def test_a_failing_description_write_fails_no_trial(in_workdir, cli_in_process, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("the description cannot be written")

    monkeypatch.setattr(tracking, "LIVE_SECONDS", 0.0)
    monkeypatch.setattr(status, "running_lines", failing)
    out = cli_in_process("search", "--n-trials", 3, "--epochs-range", 5, 6, "--seed", 0, "--report-every", 1, "--no-progress",
                         cwd=in_workdir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    study = journal_study(in_workdir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    from conftest import client_for

    note = client_for(in_workdir).get_run(study.user_attrs["mlflow_parent_run_id"]).data.tags["mlflow.note.content"]
    assert "**Trials:** 3 (3 complete)" in note


def test_every_workers_running_trials_are_shown_and_an_inherited_or_odd_progress_is_not():
    """The table is the storage's: a trial of another host's worker shows as its worker wrote it; a
    retried trial's progress copied from the try before it (another trial number), or one that is not
    numbers, shows "-"."""
    study = optuna.create_study()
    done = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)})
    study.tell(done, 0.25)
    other, retried, odd = (study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)})
                           for _ in range(3))
    other.set_user_attr(WORKER_ATTR, {"host": "gpu-7", "pid": 4242, "started": "1"})
    other.set_user_attr(PROGRESS_ATTR, {"trial": other.number, "done": 12, "epochs": 40, "value": 0.125})
    other.set_user_attr(RUN_ATTR, "abc123")
    retried.set_user_attr(PROGRESS_ATTR, {"trial": other.number, "done": 30, "epochs": 40, "value": 0.5})
    odd.set_user_attr(PROGRESS_ATTR, {"trial": odd.number, "done": "12|x", "epochs": 40, "value": "low"})
    odd.set_user_attr(WORKER_ATTR, {"host": "a|b", "pid": 1})
    lines = status.running_lines(study.get_trials(), "7", "valid_loss", "minimize")
    text = "\n".join(lines)
    assert "**Running now:** 3 trial(s)" in text
    assert f"| {other.number} | 12 / 40 | 0.125 | lr={other.params['lr']:.4g} | gpu-7 pid 4242 | " \
           f"[trial-{other.number}](#/experiments/7/runs/abc123) |" in lines
    assert any(line.startswith(f"| {retried.number} | - | - | lr=") and line.endswith("| - | - |") for line in lines)
    assert any(line.startswith(f"| {odd.number} | - | - | lr=") and "| a\\|b pid 1 |" in line for line in lines)
    assert f"**Best so far:** trial {done.number}, valid_loss 0.25 (of 1 complete)" in text
    study.tell(other, 0.5)
    study.tell(retried, 0.5)
    study.tell(odd, 0.5)
    assert status.running_lines(study.get_trials(), "7", "valid_loss", "minimize") == []


def test_the_description_is_written_at_most_every_interval_and_only_when_something_changed(monkeypatch):
    """A fake clock: the first trial's start is written at once; epochs that move on within the interval
    wait for it; nothing is written while nothing changes."""
    import threading

    written, now, landed = [], [100.0], threading.Event()

    class Client:
        def set_tag(self, run_id, key, value):
            written.append((now[0], value))
            landed.set()

    study = optuna.create_study()
    trial = study.ask()

    class Parent:
        sink, run_id, experiment_id, params = type("Sink", (), {"client": Client()})(), "p", "0", {}
        experiment = type("E", (), {"name": "e"})()

    Parent.study = study
    live = status.LiveStatus(Parent(), ("valid_loss",), seconds=10.0, clock=lambda: now[0])
    monkeypatch.setattr(status, "IDLE_CHECK_S", 0.01)

    def wait_write(count):
        while len(written) < count:
            assert landed.wait(30), written
            landed.clear()

    class History:
        values = {"train_loss": [], "valid_loss": []}

    history = History()
    live.started(trial, 40)
    live.watch(trial.number, history)
    wait_write(1)
    history.values["train_loss"].append(1.0)
    history.values["valid_loss"].append(0.75)
    now[0] += 5  # within the interval: nothing yet
    threading.Event().wait(0.2)
    assert len(written) == 1
    now[0] += 5
    wait_write(2)
    assert "| 1 / 40 | 0.75 |" in written[1][1] and written[1][0] - written[0][0] >= 10
    now[0] += 30  # nothing moved: nothing written
    threading.Event().wait(0.2)
    live.ended(trial.number)
    wait_write(3)
    live.close()
    assert len(written) == 3
    assert study.trials[0].user_attrs[PROGRESS_ATTR] == {"trial": 0, "done": 1, "epochs": 40, "value": 0.75}
