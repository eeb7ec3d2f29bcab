"""Failure modes through the CLI as real processes: every one ends with the two stores agreeing."""
import contextlib
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import all_runs, cli_env, copy_store, new_store, run_cli
from search_helpers import check_contract, journal_study, journal_trials

pytestmark = pytest.mark.slow  # the CLI as a subprocess: `pytest -m 'not slow'` skips it

# Trials long enough (~0.7 s each) to be caught in the middle.
LONG = ["--epochs-range", "3500", "4000", "--pruner", "none", "--no-progress", "--sampler", "random"]


def start_search(workdir, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", "search", *map(str, args)], cwd=workdir,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_running_trial(workdir, proc, completed: int, timeout: float = 120):
    """Wait until the study has ``completed`` finished trials and one running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        trials = journal_trials(workdir)
        if trials:
            done = sum(t.state == TrialState.COMPLETE for t in trials)
            if done >= completed and trials[-1].state == TrialState.RUNNING:
                time.sleep(0.2)  # well inside the trial
                return
        time.sleep(0.1)
    raise AssertionError("no trial started in time")


@pytest.fixture
def audit(cli_in_process):
    """`harness audit` of the study in ``workdir``, in-process (was a real process each time): what the
    stores hold after a real process was stopped is what it reads."""
    def run(workdir, *extra):
        return cli_in_process("audit", "--study", "linear_regression-search", *extra, cwd=workdir)

    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_ends_the_running_trial_cleanly_and_says_how_to_resume(workdir, signum, audit, cli_in_process):
    proc = start_search(workdir, "--n-trials", 30, "--seed", 0, *LONG)
    wait_for_running_trial(workdir, proc, completed=2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "resume with: harness search --study-name linear_regression-search" in stderr
    study = journal_study(workdir)
    if not [t for t in study.trials if t.state == TrialState.FAIL]:
        # The signal landed while a finished trial was being recorded (held there, so that Optuna's
        # tell is never cut): the study stopped right after it, with nothing to retry.
        assert all(t.state == TrialState.COMPLETE for t in study.trials) and len(study.trials) >= 3
        parent, _ = check_contract(workdir, study)
        assert parent.info.status == "FINISHED" and audit(workdir).returncode == 0
        return
    *done, last, retry = study.trials
    assert all(t.state == TrialState.COMPLETE for t in done) and len(done) >= 2
    assert last.state == TrialState.FAIL and last.user_attrs["fail_reason"] == "interrupted"
    # The interrupted configuration is queued again, the way Optuna retries a failed trial.
    assert retry.state == TrialState.WAITING and retry.params == last.params
    assert retry.system_attrs["failed_trial"] == last.number
    parent, runs = check_contract(workdir, study)
    assert runs[last.number].info.status == "KILLED"
    assert runs[last.number].data.tags["harness.fail_reason"] == "interrupted"
    assert parent.info.status == "FINISHED"
    out = audit(workdir)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout
    # The printed command resumes the same study (same space, so it is not refused) and runs the
    # queued configuration first (in-process, was a process: the printed words are the command line).
    before = len(study.trials)
    resume = shlex.split(stderr.split("resume with: ", 1)[1].strip())
    assert resume[:2] == ["harness", "search"]
    out = cli_in_process(*resume[1:], "--n-trials", 1, "--no-progress", cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    assert len(study.trials) == before and study.trials[retry.number].state == TrialState.COMPLETE, out.stdout


def test_sigterm_during_train_keeps_the_curves_so_far(workdir):
    from conftest import client_for

    proc = subprocess.Popen([sys.executable, "-m", "harness", "train", "--epochs", "200000"], cwd=workdir,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = client_for(workdir)
    assert proc.stdout.readline().startswith("Epoch: 0 | Loss: ")  # training is under way
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    [run] = all_runs(workdir)
    assert run.info.status == "KILLED" and run.data.tags["harness.fail_reason"] == "interrupted"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(steps) >= 1 and sorted(steps) == list(range(len(steps)))
    assert run.data.params["epochs"] == "200000"


@pytest.fixture(scope="module")
def killed_mid_trial(tmp_path_factory, migrated_db):
    """A search killed (kill -9) in its second trial, once for the module: the tests repair copies
    of its folder, each its own way (each killed a search of its own)."""
    folder = new_store(tmp_path_factory.mktemp("killed"), migrated_db)
    proc = start_search(folder, "--n-trials", 30, "--seed", 0, *LONG)
    wait_for_running_trial(folder, proc, completed=1)
    proc.kill()
    proc.communicate()
    return folder


def test_kill_9_mid_trial_is_repaired_by_the_next_search(killed_mid_trial, tmp_path, audit, cli_in_process):
    """The next search in-process (was a process): test_preemption's last invocation shows a user's."""
    workdir = copy_store(killed_mid_trial, tmp_path / "copy")
    study = journal_study(workdir)
    stale = study.trials[-1]
    assert stale.state == TrialState.RUNNING
    out = audit(workdir)
    assert out.returncode == 1 and f"trial {stale.number} is RUNNING but its worker" in out.stdout

    out = cli_in_process("search", "--n-trials", 2, *LONG, cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert f"trial(s) {stale.number} were left RUNNING" in out.stderr
    study = journal_study(workdir)
    assert study.trials[stale.number].state == TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == stale.number]
    assert len(retried) == 1 and retried[0].params == stale.params and retried[0].state == TrialState.COMPLETE
    _, runs = check_contract(workdir, study)
    assert runs[stale.number].info.status == "FAILED"
    assert runs[stale.number].data.tags["harness.fail_reason"] == "worker died"
    assert not [r for r in all_runs(workdir) if r.info.status == "RUNNING"]
    assert audit(workdir).returncode == 0


def test_audit_fix_repairs_a_crash_without_searching(killed_mid_trial, tmp_path, audit):
    workdir = copy_store(killed_mid_trial, tmp_path / "copy")
    out = audit(workdir, "--fix")
    assert out.returncode == 0, out.stdout
    assert "RUNNING with its worker gone -> FAIL, configuration retried" in out.stdout
    assert "-> FAILED" in out.stdout and "parent run" in out.stdout
    assert not [r for r in all_runs(workdir) if r.info.status == "RUNNING"]
    study = journal_study(workdir)
    assert study.trials[-1].state == TrialState.WAITING  # the retry, run by the next search
    assert audit(workdir).returncode == 0


@pytest.mark.parametrize("workers", [3])
def test_concurrent_workers_on_the_embedded_stores(tmp_path, workers, audit):
    """Started at the same moment on a fresh directory: no store exists yet, all race to create it."""
    procs = [start_search(tmp_path, "--n-trials", 3, "--epochs-range", "20", "80", "--no-progress",
                          "--pruner", "none") for _ in range(workers)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr
        assert "locked" not in stderr.lower() and "Traceback" not in stderr
    study = journal_study(tmp_path)
    assert len(study.trials) == 3 * workers
    assert sorted(t.number for t in study.trials) == list(range(3 * workers))
    parents = [r for r in all_runs(tmp_path) if r.data.tags.get("harness.role") == "study"]
    assert len(parents) == 1
    check_contract(tmp_path, study)
    assert audit(tmp_path).returncode == 0


def test_the_study_lock_never_blocks_optuna_s_own_journal_lock(tmp_path):
    """Workers hold the study lock while they set up; the journal must stay writable meanwhile."""
    import threading

    import optuna

    from harness.search.study import open_storage
    from harness.search.durable.storages import study_lock

    url = f"journal:{tmp_path / 'optuna_journal.log'}"
    storage = open_storage(url)
    study = optuna.create_study(storage=storage)
    written = threading.Event()
    with study_lock(storage, "parent"):
        threading.Thread(target=lambda: (study.set_user_attr("x", 1), written.set()), daemon=True).start()
        assert written.wait(timeout=10), "a journal write waited on the harness's lock"


def test_a_malicious_state_dict_is_refused(trained, tmp_path, cli_in_process):
    workdir = copy_store(trained[0], tmp_path / "copy")  # was a run trained for this test
    [run] = all_runs(workdir)
    marker = workdir / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = os.path.join(run.info.artifact_uri.removeprefix("file://"), "state_dict.pt")
    with open(path, "wb") as handle:
        pickle.dump({"weights": Exploit()}, handle)
    # predict as a user's process shows it; reproduce in-process (was a process): a pickle run here
    # would touch the marker all the same.
    for run_command, command in ((run_cli, ["predict", run.info.run_id, "--x", "1"]),
                                 (cli_in_process, ["reproduce", run.info.run_id])):
        out = run_command(*command, cwd=workdir)
        assert out.returncode == 1, out.stderr
        # A bare pickle is not even handed to torch.load (weights_only=True would refuse it too).
        assert "refused state_dict.pt" in out.stderr and "not a zip archive of torch.save" in out.stderr
        assert "Traceback" not in out.stderr
    assert not marker.exists()


def test_unreachable_stores_fail_fast_and_never_show_a_password(tmp_path, cli_in_process):
    cases = [
        (["search", "--storage", "postgresql://me:s3cret@127.0.0.1:9/db", "--n-trials", "1"], {}),
        (["train", "--epochs", "2"], {"MLFLOW_TRACKING_URI": "http://me:s3cret@127.0.0.1:9"}),
        # In-process: MLflow retrying a refused URL is not what it checks (the real process keeps the
        # harness's retry defaults and shows they end within the minute).
        (["search", "--n-trials", "1", "--no-progress"], {"MLFLOW_TRACKING_URI": "http://me:s3cret@127.0.0.1:9",
                                                          "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}),
    ]
    for number, (args, env) in enumerate(cases):
        started = time.time()
        if number == 1:  # a real process for one: what a user's terminal shows of it
            out = run_cli(*args, cwd=tmp_path, env=cli_env(**env))
        else:
            out = cli_in_process(*args, cwd=tmp_path, env=env)
        assert time.time() - started < 60
        assert out.returncode == 2, out.stderr
        assert "s3cret" not in out.stderr + out.stdout
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # neither store was created


def test_an_interrupted_batch_ends_every_member_s_trial_and_run_and_resumes(workdir, audit, cli_in_process):
    proc = start_search(workdir, "--n-trials", 8, "--batch", 4, "--seed", 0, "--pairs", "sgd+l1", *LONG)
    deadline = time.time() + 120
    while time.time() < deadline:  # the first batch asked and training
        assert proc.poll() is None, proc.communicate()
        trials = journal_trials(workdir)
        if trials:
            if sum(t.state == TrialState.RUNNING for t in trials) == 4:
                break
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    study = journal_study(workdir)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 4 and all(t.user_attrs["fail_reason"] == "interrupted" for t in failed)
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == [t.number for t in failed]
    parent, runs = check_contract(workdir, study)
    assert all(runs[t.number].info.status == "KILLED" for t in failed) and parent.info.status == "FINISHED"
    assert not [r for r in all_runs(workdir) if r.info.status == "RUNNING"]
    out = audit(workdir)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout
    # The printed resume goes on the same way: batched, same sampler and pruner (in-process, was a process).
    resume = shlex.split(stderr.split("resume with: ", 1)[1].strip())
    assert resume[:2] == ["harness", "search"] and "--batch" in resume and "none" in resume and "random" in resume
    out = cli_in_process(*resume[1:], "--n-trials", 4, cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    assert all(study.trials[t.number].state == TrialState.COMPLETE for t in waiting)
    # A retried configuration's trial does not keep the reason its first try failed.
    assert all(study.trials[t.number].user_attrs.get("fail_reason") is None for t in waiting)



# `harness search` whose sampler stops at trial 4's ask (Optuna's before_trial, after the trial is
# created) until the file "go" exists: a sampler slow at a known point of a batch's asks.
GATED_SEARCH = """
import os, sys, time, optuna
from harness.cli import main
from harness.search import study as study_module

class Gated(optuna.samplers.RandomSampler):
    def before_trial(self, study, trial):
        deadline = time.time() + 120
        while trial.number == 4 and not os.path.exists("go") and time.time() < deadline:
            time.sleep(0.05)

study_module.make_sampler = lambda name, seed, space: Gated(seed=seed)
sys.exit(main(sys.argv[1:]))
"""


# The gated searches stop in an ask, never inside a trial: theirs need not train long.
GATED = ["--epochs-range", "5", "10", *LONG[3:]]


def start_gated_search(workdir, *args) -> subprocess.Popen:
    """Started with --batch 3: the first batch (trials 0-2) trains, the second waits in trial 4's ask."""
    proc = subprocess.Popen([sys.executable, "-c", GATED_SEARCH, "search", "--batch", "3", *map(str, args)],
                            cwd=workdir, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while len(journal_trials(workdir)) < 5:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


def test_kill_9_while_a_batch_is_asked_leaves_no_trial_running_or_counted(workdir, audit, cli_in_process):
    """The next search in-process (was a process): test_preemption's last invocation shows a user's."""
    proc = start_gated_search(workdir, "--n-trials", 6, *GATED)
    proc.kill()
    proc.communicate()
    assert [t.state for t in journal_trials(workdir)] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING] * 2
    out = audit(workdir)
    assert out.returncode == 1 and all(f"trial {n} is RUNNING but its worker" in out.stdout for n in (3, 4))

    # The next search fails and retries them, so they count toward --max-trials no more.
    out = cli_in_process("search", "--n-trials", 3, "--max-trials", 6, *GATED, cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "trial(s) 3, 4 were left RUNNING" in out.stderr
    study = journal_study(workdir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL] * 2 + [
        TrialState.COMPLETE] * 3
    assert sorted(t.system_attrs.get("failed_trial", -1) for t in study.trials[5:]) == [-1, 3, 4]
    out = audit(workdir, "--fix")  # each gets its FAILED run: they died before their runs were created
    assert out.returncode == 0 and audit(workdir).returncode == 0, out.stdout


def test_a_signal_while_a_batch_is_asked_stops_the_asking_and_leaves_nothing_running(workdir):
    proc = start_gated_search(workdir, "--n-trials", 9, *GATED)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # held: acted on once the ask in progress returns
    (workdir / "go").touch()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    study = journal_study(workdir)
    asked = [t for t in study.trials if "failed_trial" not in t.system_attrs]
    assert [t.state for t in asked] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL] * 2  # trial 5 never asked
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in asked[3:])
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == [3, 4]


def test_a_worker_paused_past_its_heartbeat_s_grace_keeps_its_trial(workdir, cli_in_process):
    """A starved worker's heartbeat comes late; it is not dead. Paused (SIGSTOP) for longer than the
    grace of a 1 s heartbeat while another worker starts trials, it then finishes its own."""
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    args = ["--storage", storage, "--heartbeat", 1, *LONG]
    paused = start_search(workdir, "--n-trials", 2, "--seed", 0, *args)
    deadline, trial = time.time() + 120, None
    while trial is None:  # its trial started and beaten
        assert paused.poll() is None and time.time() < deadline, paused.communicate()
        with contextlib.suppress(KeyError):
            running = optuna.load_study(study_name="linear_regression-search", storage=storage).get_trials(
                states=(TrialState.RUNNING,))
            trial = running[0] if running and "mlflow_run_id" in running[0].user_attrs else None
        time.sleep(0.1)
    paused.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3 * 1 + 2)  # silent for longer than the grace
        # In-process (was a process): another worker, whose pid is not the paused one's either way.
        other = cli_in_process("search", "--n-trials", 1, "--seed", 1, *args, cwd=workdir)
        assert other.returncode == 0, other.stderr
    finally:
        paused.send_signal(signal.SIGCONT)
    out, err = paused.communicate(timeout=300)
    assert paused.returncode == 0, err
    study = optuna.load_study(study_name="linear_regression-search", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert cli_in_process("audit", "--study", "linear_regression-search", "--storage", storage,
                          cwd=workdir).returncode == 0  # in-process (was a real process)
