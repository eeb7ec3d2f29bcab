"""Crashes, full disks and signals in the worst places, through the CLI as real processes.

Each test names a class of failure and drives several of its cases. The full-disk tests put the
stores on a tiny tmpfs in a private mount namespace (``unshare``), fill it, and grow it again.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import all_runs, cli_env, client_for, copy_store, main_in, new_store, run_cli
from conftest import run_cli as real_run_cli
from search_helpers import journal_study, journal_trials
from test_reliability import LONG, start_search, wait_for_running_trial

pytestmark = pytest.mark.slow  # the CLI as a subprocess: `pytest -m 'not slow'` skips it

SHORT = ["--epochs-range", "5", "20", "--no-progress"]
STUDY = "linear_regression-search"


def plain_optuna_trials(path: Path) -> list:
    """The study as plain Optuna reads it (no harness code involved)."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=STUDY, storage=storage).trials


def no_running_runs(workdir: Path) -> list:
    return [(r.info.run_name, r.info.status) for r in all_runs(workdir) if r.info.status == "RUNNING"]


# ---- a torn journal ------------------------------------------------------------------------------

def _truncate(journal: Path) -> None:
    data = journal.read_bytes()
    journal.write_bytes(data[:-50])


def _garbage_line(journal: Path) -> None:
    with journal.open("ab") as f:
        f.write(b'{"op_code": garbage\n')


def _garbage_without_newline(journal: Path) -> None:
    with journal.open("ab") as f:
        f.write(b'{"op_code":5,"worker_id":"x","tri')


def _appended_after_a_tear(journal: Path) -> None:
    """What plain Optuna (or an older harness) leaves: a complete operation written right after
    the cut bytes of a torn one, with more operations after it."""
    lines = journal.read_bytes().splitlines(keepends=True)
    torn = lines[-3][:-40]  # an operation cut short ...
    journal.write_bytes(b"".join(lines[:-3]) + torn + lines[-2] + lines[-1])  # ... then two appended


@pytest.fixture(scope="module")
def searched(tmp_path_factory, migrated_db):
    """A finished three-trial search to damage copies of: in-process (was a process; the torn journal's
    tests run theirs on copies)."""
    path = new_store(tmp_path_factory.mktemp("searched"), migrated_db)
    assert main_in(path, "search", "--n-trials", 3, "--seed", 0, *SHORT) == 0
    return path


@pytest.mark.parametrize("damage", [_truncate, _garbage_line, _garbage_without_newline, _appended_after_a_tear])
def test_a_torn_journal_is_repaired_before_anything_is_appended(searched, tmp_path, cli_in_process, damage):
    workdir = copy_store(searched, tmp_path / "copy")
    # One damage's search as a user's process shows it; the audits in-process (were processes): they read.
    run_cli = real_run_cli if damage is _garbage_line else cli_in_process
    journal = workdir / "optuna_journal.log"
    intact = journal.read_bytes()
    damage(journal)
    damaged = journal.read_bytes()
    complete_before = [t.number for t in plain_optuna_trials(journal) if t.state == TrialState.COMPLETE] \
        if damage is not _appended_after_a_tear else None

    # audit reads without writing: the damage is reported, the file untouched.
    out = cli_in_process("audit", "--study", STUDY, cwd=workdir)
    if damage is _appended_after_a_tear:  # Optuna cannot read past it at all
        assert out.returncode == 1 and "audit --fix" in out.stderr and "Traceback" not in out.stderr
    else:
        assert out.returncode == 1 and "violation: the journal" in out.stdout, out.stdout + out.stderr
    assert journal.read_bytes() == damaged

    out = run_cli("search", "--n-trials", 2, "--seed", 1, *SHORT, cwd=workdir)
    assert out.returncode == 0, out.stderr
    notices = [line for line in out.stderr.splitlines() if "the journal" in line]
    assert len(notices) == 1 and "removed the damaged bytes, kept a copy in" in notices[0], out.stderr
    [copy] = workdir.glob("optuna_journal.log.torn-*")
    assert copy.read_bytes() and copy.read_bytes() in damaged  # exactly what was cut
    # Plain Optuna reads every operation: nothing complete was lost, and the new trials are there.
    trials = plain_optuna_trials(journal)
    if complete_before is not None:
        assert set(complete_before) <= {t.number for t in trials if t.state == TrialState.COMPLETE}
    # Every line before the damage is kept byte for byte (other workers' offsets into it stay valid).
    undamaged = os.path.commonprefix([intact, damaged])
    assert journal.read_bytes().startswith(undamaged[: undamaged.rfind(b"\n") + 1])
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 3
    # The search alone leaves the stores agreeing (a trial whose end was cut is failed and retried).
    out = cli_in_process("audit", "--study", STUDY, cwd=workdir)
    assert out.returncode == 0, out.stdout
    assert f"note: the journal was repaired before; what was removed is kept in {copy.name}" in out.stdout
    assert not no_running_runs(workdir)


def test_audit_fix_repairs_the_journal_without_searching(searched, tmp_path, cli_in_process):
    """On a copy of the module's search, in-process (was a search and an audit of its own, as real
    processes): the test above shows both from a real process."""
    workdir = copy_store(searched, tmp_path / "copy")
    journal = workdir / "optuna_journal.log"
    trials = len(plain_optuna_trials(journal))
    _garbage_line(journal)
    out = cli_in_process("audit", "--study", STUDY, "--fix", cwd=workdir)
    assert out.returncode == 0 and "fixed: the journal" in out.stdout, out.stdout + out.stderr
    assert not journal.read_bytes().endswith(b"garbage\n")
    assert len(plain_optuna_trials(journal)) == trials


# ---- full disks ----------------------------------------------------------------------------------

def tiny_disk_script(script: str, tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a bash ``script`` in a private mount namespace where $DISK is a 3 MB tmpfs; $OUT (outside
    it) keeps what the script copies there for the test to read."""
    prefix = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"needs a private mount namespace for a small tmpfs (unshare: {probe.stderr.decode().strip()})")
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    env = cli_env(DISK=str(disk), OUT=str(out), PY=sys.executable)
    body = f'set -u\nmount -t tmpfs -o size=3M tmpfs "$DISK"\ncd "$DISK"\n{script}'
    return subprocess.run([*prefix, "bash", "-c", body], env=env, capture_output=True, text=True, timeout=timeout)


def test_a_full_journal_disk_ends_the_search_cleanly_and_the_study_survives(tmp_path, cli_in_process):
    """The searches on the tiny disk are real processes; what follows, on a copy of the journal (and
    its lock files) as the full disk left it, is in-process (was three more processes, on the disk
    grown again)."""
    # The MLflow store stays on a disk with room; the journal's disk fills up mid-search.
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = "journal:$DISK/j.log"
    script = f'''
cd "{tmp_path}"
export MLFLOW_TRACKING_URI={mlflow_uri}
"$PY" -m harness search --n-trials 2 --storage {journal} {" ".join(SHORT)} >/dev/null 2>&1
head -c 10000000 /dev/zero > "$DISK/fill" 2>/dev/null; truncate -s -40k "$DISK/fill"
"$PY" -m harness search --n-trials 60 --storage {journal} {" ".join(SHORT)} > "$OUT/full.out" 2> "$OUT/full.err"
echo $? > "$OUT/full.rc"
cp "$DISK/j.log" "$OUT/j-full.log"
mkdir "$OUT/journal"; cp -a "$DISK"/j.log* "$OUT/journal/"
'''
    proc = tiny_disk_script(script, tmp_path)
    out = tmp_path / "out"
    full_err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "1", proc.stderr + full_err
    assert "Traceback" not in full_err
    [line] = [l for l in full_err.splitlines() if l.startswith("harness: ")]
    assert "cannot write the Optuna journal" in line and "No space left on device" in line and "resume with:" in line
    # What the full disk left is readable by plain Optuna, with no half-written operation in it.
    assert (out / "j-full.log").read_bytes().endswith(b"\n")
    assert len(plain_optuna_trials(out / "j-full.log")) > 2
    storage = f"journal:{out / 'journal' / 'j.log'}"
    fix = cli_in_process("audit", "--study", STUDY, "--storage", storage, "--fix", cwd=tmp_path)
    after = cli_in_process("search", "--n-trials", 2, "--storage", storage, *SHORT, cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    audit = cli_in_process("audit", "--study", STUDY, "--storage", storage, cwd=tmp_path)
    assert audit.returncode == 0, fix.stdout + fix.stderr + audit.stdout + audit.stderr
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def test_a_full_mlflow_disk_stops_the_search_at_the_first_failed_write_and_audit_fix_restores_it(tmp_path,
                                                                                                 cli_in_process):
    """The search that fills the disk is a real process; the audits and the search after it, on a copy
    of both stores as the full disk left them, are in-process (were four more processes, on the disk
    grown again)."""
    # As the outside probe did it: both stores on a 3 MB disk, a 30-trial search.
    script = f'''
cp "{tmp_path / 'template.db'}" mlflow.db
"$PY" -m harness search --n-trials 30 --seed 3 --no-progress > "$OUT/full.out" 2> "$OUT/full.err"
echo $? > "$OUT/full.rc"
mkdir "$OUT/disk"; cp -a . "$OUT/disk/"
'''
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'template.db'}").search_experiments()
    proc = tiny_disk_script(script, tmp_path)
    out = tmp_path / "out"
    full_err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "1", proc.stderr + full_err
    assert "Traceback" not in full_err
    lines = [l for l in full_err.splitlines() if l.startswith("harness: ")]
    # Whichever store's write fails first (both live on the full disk) stops the search.
    assert len(lines) == 1 and "audit --study" in lines[0] and "resume with:" in lines[0], full_err
    assert "tracking failed" in lines[0] or "cannot write the Optuna journal" in lines[0], full_err
    # The disk's folder as it was, its runs' artifacts in the copy: $DISK named the folder the disk was on.
    workdir = copy_store(out / "disk", tmp_path / "grown", made_in=tmp_path / "disk")
    before = cli_in_process("audit", "--study", STUDY, cwd=workdir)
    fix = cli_in_process("audit", "--study", STUDY, "--fix", cwd=workdir)
    audit = cli_in_process("audit", "--study", STUDY, cwd=workdir)
    after = cli_in_process("search", "--n-trials", 3, "--seed", 4, "--no-progress", cwd=workdir)
    trials = plain_optuna_trials(workdir / "optuna_journal.log")
    # It stopped at the first failure instead of training the other trials into a failing store.
    assert len([t for t in trials if t.state != TrialState.WAITING]) < 30
    assert "violation" in before.stdout + before.stderr
    assert audit.returncode == 0, fix.stdout + fix.stderr + audit.stdout + audit.stderr
    assert after.returncode == 0, after.stderr
    assert not no_running_runs(workdir)
    # Every configuration that did not get a whole record was queued again and has run since.
    study = journal_study(workdir)
    incomplete = [r for r in all_runs(workdir) if "harness.record_incomplete" in r.data.tags]
    retried = {t.system_attrs.get("failed_trial") for t in study.trials}
    for run in incomplete:
        assert run.info.status == "FAILED"
        if run.data.tags.get("optuna.trial_state") == "COMPLETE":
            assert int(run.data.tags["optuna.trial_number"]) in retried


# ---- signals and killed processes during clean-up -----------------------------------------------

def _finish_checks(workdir, proc, stderr, cli_in_process):
    assert "Traceback" not in stderr, stderr
    assert "resume with: harness search" in stderr, stderr
    assert not no_running_runs(workdir)
    study = journal_study(workdir)
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    parent = client_for(workdir).get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and "best_value" in parent.data.metrics
    out = cli_in_process("audit", "--study", STUDY, cwd=workdir)  # in-process (was a real process)
    assert out.returncode == 0, out.stdout
    return study


@pytest.mark.parametrize("gap", [0.05, 0.4])
def test_a_second_ctrl_c_during_the_wrap_up_cuts_nothing_short(workdir, gap, cli_in_process):
    proc = start_search(workdir, "--n-trials", 30, "--seed", 0, *LONG)
    wait_for_running_trial(workdir, proc, completed=1)
    proc.send_signal(signal.SIGINT)
    time.sleep(gap)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    study = _finish_checks(workdir, proc, stderr, cli_in_process)
    stopped = [t for t in study.trials if t.state == TrialState.FAIL]
    if not stopped:  # the first signal landed while a finished trial was recorded: held, then the study stopped
        assert all(t.state == TrialState.COMPLETE for t in study.trials)
        return
    [stopped] = stopped
    run = client_for(workdir).get_run(stopped.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["harness.fail_reason"] == "interrupted"
    assert client_for(workdir).get_metric_history(run.info.run_id, "train_loss")  # its curve so far
    assert [t.params for t in study.trials if t.system_attrs.get("failed_trial") == stopped.number] == [stopped.params]


def test_signals_after_the_last_trial_still_close_the_study_and_print_the_resume_hint(workdir, cli_in_process):
    proc = start_search(workdir, "--n-trials", 2, "--seed", 0, *SHORT)
    deadline = time.time() + 120
    while time.time() < deadline:  # until both trials are told to Optuna, then signal every 50 ms
        if sum(t.state.is_finished() for t in journal_trials(workdir)) == 2:
            break
        time.sleep(0.02)
    while proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the search ended before the first signal")  # a machine faster than the poll
    assert proc.returncode == 130, stderr
    _finish_checks(workdir, proc, stderr, cli_in_process)


# ---- studies with no parent run ------------------------------------------------------------------

def _deleted_experiment(workdir):
    client = client_for(workdir)
    client.delete_experiment(client.create_experiment("gone"))
    return ["--mlflow-experiment", "gone"], {}


@pytest.mark.parametrize("case", ["deleted", "no such id", "name too long"])
def test_a_search_into_an_unusable_mlflow_experiment_writes_nothing(workdir, case, cli_in_process):
    args, env = {"deleted": lambda: _deleted_experiment(workdir),
                 "no such id": lambda: ([], {"MLFLOW_EXPERIMENT_ID": "999"}),
                 "name too long": lambda: (["--mlflow-experiment", "x" * 5000], {})}[case]()
    runs_before = len(all_runs(workdir))
    # One case's search as a user's process shows it; the rest in-process (that case's train was a process too).
    if case == "no such id":
        out = real_run_cli("search", "--n-trials", 2, *SHORT, *args, cwd=workdir, env=cli_env(**env))
    else:
        out = cli_in_process("search", "--n-trials", 2, *SHORT, *args, cwd=workdir, env=env)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "MLflow experiment" in out.stderr or "MLFLOW_EXPERIMENT_ID" in out.stderr
    assert not (workdir / "optuna_journal.log").exists()  # no study, no trial
    assert len(all_runs(workdir)) == runs_before
    out = cli_in_process("train", "--epochs", 2, *args, cwd=workdir, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(all_runs(workdir)) == runs_before


def test_audit_fix_closes_out_a_study_whose_parent_run_was_never_created(workdir, cli_in_process):
    """In-process (was three real processes)."""
    # What an older harness left when it crashed after creating the study: a FAIL trial, no runs.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "optuna_journal.log")))
    study = optuna.create_study(study_name=STUDY, storage=storage)
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    study.tell(trial, state=TrialState.FAIL)
    assert cli_in_process("audit", "--study", STUDY, cwd=workdir).returncode == 1
    out = cli_in_process("audit", "--study", STUDY, "--fix", cwd=workdir)
    assert "created" in out.stdout and "configuration retried" in out.stdout, out.stdout
    out = cli_in_process("audit", "--study", STUDY, cwd=workdir)
    assert out.returncode == 0, out.stdout
    [run] = [r for r in all_runs(workdir) if r.data.tags.get("optuna.trial_number") == "0"]
    assert run.info.status == "FAILED" and float(run.data.params["lr"]) == trial.params["lr"]
