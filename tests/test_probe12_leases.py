"""What a twelfth outside probe broke (issue 26), each as its class: a live worker's lease looked for in
the checker's cache folder, which each process finds from its own environment."""
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from harness import user_cache
from harness.search.durable import workers

HOLD = ("import json, time\nfrom harness.search.durable.workers import identity\n"
        "print(json.dumps(identity()), flush=True)\ntime.sleep(600)")


@pytest.fixture
def worker_in(tmp_path):
    """A live harness process holding its lease, started with the environment given (HOME and
    XDG_CACHE_HOME as a user's other shell may set them); yields its worker record."""
    procs = []

    def start(**env):
        import json

        full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, env=full, text=True,
                                cwd=tmp_path)
        procs.append(proc)
        return json.loads(proc.stdout.readline())

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("cache", ["absolute", "relative", "unset"])
def test_a_live_worker_whose_cache_folder_is_not_the_checker_s_is_alive(worker_in, tmp_path, cache):
    """A worker started with another XDG_CACHE_HOME (a relative one, which the XDG spec says to ignore,
    or none) than the process checking it: audit --fix failed its trial while it trained, and the
    worker died on its own finished trial with a traceback, its training lost."""
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_CACHE_HOME": {"absolute": str(tmp_path / "other"), "relative": "cache",
                                                 "unset": ""}[cache]}
    record = worker_in(**env)
    expected = (tmp_path / "other") if cache == "absolute" else home / ".cache"
    assert record["leases"] == str(expected / "harness" / "leases" / socket.gethostname())
    assert not (tmp_path / "cache").exists()  # a relative cache is not made in the working directory
    assert workers.LEASES != workers.Path(record["leases"])
    assert workers.alive(record) is True
    assert workers.alive({k: v for k, v in record.items() if k != "leases"}) is False  # where it is not


@pytest.mark.parametrize("leases", [None, 3, "", "relative/leases", "/a\0b", "/" + "x" * 5000, ["/tmp"]])
def test_a_record_naming_no_absolute_lease_folder_names_no_worker(leases):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": workers._start_time(os.getpid()),
              "leases": leases}
    assert not workers.is_identity(record)
    assert workers.alive(record) is False


def test_a_recorded_lease_folder_anyone_else_may_enter_holds_no_lease(worker_in, tmp_path):
    """A forged record may name any folder: a lease counts only in one of this user's that only this
    user can enter (as the checker's own)."""
    record = worker_in(XDG_CACHE_HOME=str(tmp_path / "other"))
    os.chmod(record["leases"], 0o755)
    assert workers.alive(record) is False
    os.chmod(record["leases"], 0o700)
    assert workers.alive(record) is True


def test_the_user_s_cache_ignores_a_relative_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for value in ("cache", "./cache", ""):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert user_cache.user_cache() == tmp_path / ".cache"
    monkeypatch.setenv("HOME", "relative-home")
    assert user_cache.user_cache() is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert user_cache.user_cache() == tmp_path / "x"


@pytest.mark.slow  # a whole search in-process
def test_a_trial_another_process_closed_while_it_trained_is_one_line_and_the_search_goes_on(
        workdir, cli_in_process, monkeypatch):
    """Trial 0 is closed as FAIL by another process (audit --fix) while it trains: the worker died on
    Optuna's UpdateFinishedTrialError with a traceback, and the trials after it never ran."""
    import optuna
    from optuna.trial import TrialState

    from conftest import all_runs
    from harness.search import trials as trials_module

    train = trials_module.TrialRunner.train

    def closed_elsewhere(self, run):
        train(self, run)
        if run.trial.number == 0:  # as audit --fix does, in the storage, behind this worker's back
            run.trial.storage.set_trial_state_values(run.trial._trial_id, TrialState.FAIL)

    monkeypatch.setattr(trials_module.TrialRunner, "train", closed_elsewhere)
    out = cli_in_process("search", "--n-trials", 3, "--epochs-range", 2, 3, "--pruner", "none", "--models", "none",
                         "--no-progress", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if "closed by another process" in line] == [
        "harness: trial 0 was closed by another process while this one trained it: its result is not recorded, "
        "its configuration is queued again"]
    study = optuna.load_study(study_name="linear_regression-search",
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                                  str(workdir / "optuna_journal.log"))))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    trial_runs = {r.data.tags["optuna.trial_number"]: r.info.status for r in all_runs(workdir)
                  if "optuna.trial_number" in r.data.tags}
    assert trial_runs["1"] == trial_runs["2"] == "FINISHED" and trial_runs["0"] != "FINISHED"
