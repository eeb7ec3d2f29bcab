"""Who owns a RUNNING trial or `harness train` run (issue 26, probe 10 F1 and F5): the journal and a
run's tags are writable by whoever runs the study, so a worker record is untrusted. A record names a
live worker only when a live harness process holds the lease of the pid and start time it names;
anything else (null, junk, extra keys, init's real pid and start time, a live process that is no
harness worker) is dead, and the next search, `audit --fix` or `harness train` closes what it owns."""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import AUDITED, all_runs, cli_env, client_for, copy_store, slow_cases
from harness.schema import COMMAND_TAG, FAIL_REASON_TAG, PROCESS_TAG, WORKER_ATTR
from harness.search.durable.workers import OWNERLESS_S, identity
from harness.search.study import open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _start_of(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]


@pytest.fixture(scope="module")
def stranger():
    """A live process of this user that is no harness worker (it holds no lease)."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _forged(form: str, stranger: int):
    """The record a forged journal line or tag holds (as JSON), by name."""
    init = {**identity(), "pid": 1, "started": _start_of(1)}
    return {"null": None, "junk": "junk", "empty": {}, "init": init, "init plus a key": {**init, "evil": 1},
            "own plus a key": {**identity(), "evil": 1},
            "a live stranger": {**identity(), "pid": stranger, "started": _start_of(stranger)}}[form]


FORMS = ["null", "junk", "empty", "init", "init plus a key", "own plus a key", "a live stranger"]


@pytest.fixture
def study_folder(searched_once, tmp_path):
    return copy_store(searched_once, tmp_path / "copy")


def _audit(cli_in_process, folder, *extra):
    return cli_in_process("audit", "--study", AUDITED, "--storage", f"journal:{folder / 'j.log'}", *extra,
                          cwd=folder)


def _add_running(folder, **template) -> int:
    storage = open_storage(f"journal:{folder / 'j.log'}")
    study = optuna.load_study(study_name=AUDITED, storage=storage)
    trial = optuna.trial.create_trial(state=TrialState.RUNNING)
    for name, value in template.items():
        setattr(trial, name, value)
    storage.create_new_trial(study._study_id, trial)
    return len(study.trials) - 1


def _state(folder, number: int) -> TrialState:
    study = optuna.load_study(study_name=AUDITED, storage=open_storage(f"journal:{folder / 'j.log'}"))
    return study.trials[number].state


@pytest.mark.parametrize("form", slow_cases(FORMS))  # each an audit --fix
def test_a_trial_whose_worker_record_names_no_live_worker_is_closed_by_audit_fix(study_folder, cli_in_process,
                                                                              stranger, form):
    """F1: `null` waited an hour; init's pid with its real start time, or it with one more key, counted
    alive for good; audit and --fix said clean with the trial RUNNING."""
    number = _add_running(study_folder, user_attrs={WORKER_ATTR: _forged(form, stranger)})
    out = _audit(cli_in_process, study_folder)
    said = "with no worker recorded" if form == "null" else "but its worker"
    assert out.returncode == 1 and f"trial {number} is RUNNING {said}" in out.stdout, out.stdout
    out = _audit(cli_in_process, study_folder, "--fix")
    assert _state(study_folder, number) == TrialState.FAIL, out.stdout
    assert _audit(cli_in_process, study_folder).returncode == 0


def test_a_trial_with_no_worker_and_no_start_is_closed_by_audit_fix(study_folder, cli_in_process):
    """F1: a trial with neither an owner nor a start time was never stale (its age unknown)."""
    number = _add_running(study_folder, datetime_start=None)
    out = _audit(cli_in_process, study_folder)
    assert out.returncode == 1 and f"trial {number} is RUNNING with no worker recorded" in out.stdout, out.stdout
    _audit(cli_in_process, study_folder, "--fix")
    assert _state(study_folder, number) == TrialState.FAIL
    assert _audit(cli_in_process, study_folder).returncode == 0


def test_a_trial_of_a_live_worker_is_left_running(study_folder, cli_in_process):
    """This process holds its lease (identity() took it): its trial is nobody's to close."""
    number = _add_running(study_folder, user_attrs={WORKER_ATTR: identity()})
    _audit(cli_in_process, study_folder, "--fix")
    assert _state(study_folder, number) == TrialState.RUNNING


def _running_train_run(folder, tags: dict, age_s: float = 0) -> str:
    """A RUNNING `harness train` run of the MLflow experiment `harness train` logs into by default."""
    client = client_for(folder)
    found = client.get_experiment_by_name("linear_regression")
    experiment = found.experiment_id if found else client.create_experiment("linear_regression")
    start = int((time.time() - age_s) * 1000)
    return client.create_run(experiment, start_time=start, tags={COMMAND_TAG: "train", **tags}).info.run_id


@pytest.mark.parametrize("form", slow_cases([*FORMS, "not json"]))  # each two trainings
def test_a_train_run_whose_process_record_names_no_live_process_is_closed_and_resumes(in_workdir, cli_in_process,
                                                                                    stranger, form):
    """F5: junk, {}, null, init's real record (with or without one more key): the next `harness train`
    closed none, and `--resume` refused for good ("trained by a process unknown")."""
    tag = "{not json" if form == "not json" else json.dumps(_forged(form, stranger))
    left = _running_train_run(in_workdir, {PROCESS_TAG: tag})
    out = cli_in_process("train", "--epochs", 3, cwd=in_workdir)
    assert out.returncode == 0 and f"run {left} was left RUNNING" in out.stderr, out.stderr
    run = client_for(in_workdir).get_run(left)
    assert run.info.status == "KILLED" and run.data.tags[FAIL_REASON_TAG] == "worker died"
    client_for(in_workdir).update_run(left, status="RUNNING")  # as the forger leaves it again
    out = cli_in_process("train", "--epochs", 3, "--resume", left, cwd=in_workdir)
    assert out.returncode == 0, out.stderr
    assert client_for(in_workdir).get_run(left).info.status == "FINISHED"


@pytest.mark.slow  # two trainings in-process
def test_a_train_run_with_no_process_record_is_closed_only_once_old(in_workdir, cli_in_process):
    """A run another `harness train` just created names its process in its next write: left alone
    while young; one older than OWNERLESS_S is from a process that died before it."""
    young = _running_train_run(in_workdir, {})
    old = _running_train_run(in_workdir, {}, age_s=OWNERLESS_S + 60)
    out = cli_in_process("train", "--epochs", 3, cwd=in_workdir)
    assert out.returncode == 0, out.stderr
    client = client_for(in_workdir)
    assert (client.get_run(young).info.status, client.get_run(old).info.status) == ("RUNNING", "KILLED")
    out = cli_in_process("train", "--epochs", 3, "--resume", young, cwd=in_workdir)
    assert out.returncode == 2 and "trained by a process that has not named itself yet" in out.stderr, out.stderr


@pytest.mark.slow  # two trainings in-process
def test_a_train_run_of_a_live_process_is_neither_closed_nor_resumed(in_workdir, cli_in_process):
    live = _running_train_run(in_workdir, {PROCESS_TAG: json.dumps(identity())})
    assert cli_in_process("train", "--epochs", 3, cwd=in_workdir).returncode == 0
    assert client_for(in_workdir).get_run(live).info.status == "RUNNING"
    out = cli_in_process("train", "--epochs", 3, "--resume", live, cwd=in_workdir)
    assert out.returncode == 2 and f"trained by process {os.getpid()}" in out.stderr, out.stderr


@pytest.mark.slow  # a real `harness search` process
def test_a_live_search_s_running_trial_is_not_closed_by_audit_fix(workdir, cli_in_process):
    """The positive case through real processes: a searching worker holds its lease, so `audit --fix`
    leaves its trial RUNNING; once it is killed with -9 the kernel drops the lease and the trial is stale."""
    from search_helpers import journal_trials

    proc = subprocess.Popen([sys.executable, "-m", "harness", "search", "--n-trials", "3", "--epochs-range",
                             "200000", "200001", "--pruner", "none", "--no-progress"], cwd=workdir,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not [t for t in journal_trials(workdir) if WORKER_ATTR in t.user_attrs]:
            assert time.time() < deadline and proc.poll() is None, "no trial started in time"
            time.sleep(0.2)
        audit = ["audit", "--study", "linear_regression-search"]
        out = cli_in_process(*audit, "--fix", cwd=workdir)
        assert "RUNNING but its worker" not in out.stdout, out.stdout
        assert [t.state for t in journal_trials(workdir)] == [TrialState.RUNNING]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    out = cli_in_process(*audit, cwd=workdir)
    assert out.returncode == 1 and "trial 0 is RUNNING but its worker" in out.stdout, out.stdout


@pytest.mark.parametrize("command, mode", [("train", 0o755), ("train", 0o770), ("search", 0o755)])
def test_a_lease_folder_others_may_enter_is_refused_before_anything_is_written(in_workdir, cli_in_process,
                                                                              monkeypatch, tmp_path, command, mode):
    """Another user who could write the lease folder could hold any lease: it is refused in one line."""
    from harness.search.durable import workers

    folder = tmp_path / "leases"
    folder.mkdir()
    folder.chmod(mode)
    monkeypatch.setattr(workers, "LEASES", folder)
    monkeypatch.setattr(workers, "_leases", {})  # this process's own lease is in the real folder
    args = ["--epochs", 3] if command == "train" else ["--n-trials", 1, "--epochs-range", 3, 4, "--no-progress"]
    out = cli_in_process(command, *args, cwd=in_workdir)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"{folder} must be a folder of yours" in out.stderr
    assert all_runs(in_workdir) == [] and list(folder.iterdir()) == []
    assert not (in_workdir / "optuna_journal.log").exists()
