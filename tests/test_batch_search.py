"""`harness search --batch K` and ``Objective.run_batch``: K trials trained as one stack, each still
its own trial with exactly the numbers it gets alone (in-process, untracked: fast tier)."""
import optuna
import pytest
from optuna.trial import TrialState

from harness import Objective
from harness.fast import batched
from harness.experiment import load
from harness.search import loop
from harness.search import space as space_module

CONFIGS = [{"lr": lr, "epochs": epochs, "optimizer_loss": pair} for pair, lr, epochs in (
    ("sgd+l1", 0.01, 40), ("sgd+mse", 9.0, 30), ("sgd+l1", 0.05, 25), ("adam+mse", 0.02, 30), ("sgd+mse", 0.02, 30),
    ("sgd+l1", 0.0002, 40), ("sgd+mse", 0.004, 35), ("sgd+l1", 0.03, 33), ("sgd+mse", 0.1, 20))]


def study_of(configs, pruner=None):
    study = optuna.create_study(pruner=pruner or optuna.pruners.NopPruner(), sampler=optuna.samplers.RandomSampler(0))
    for params in configs:
        study.enqueue_trial(params)
    return study


def test_a_batched_study_holds_what_one_at_a_time_gives_trial_for_trial(monkeypatch):
    stacks = []
    train_stack = batched.train_stack
    monkeypatch.setattr(batched, "train_stack", lambda cfgs, *a, **k: stacks.append(len(cfgs)) or train_stack(cfgs, *a, **k))
    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"lr": [1e-4, 10.0], "epochs": [5, 60]})
    one, stacked = study_of(CONFIGS), study_of(CONFIGS)
    with Objective(experiment, space, track=False) as objective:
        one.optimize(objective, n_trials=len(CONFIGS))
    with Objective(experiment, space, track=False) as objective:
        loop.optimize(stacked, objective, len(CONFIGS), batch=9)
    assert stacks == [9]  # every pair in one stack
    assert [t.state for t in stacked.trials] == [t.state for t in one.trials]
    assert one.trials[1].state == TrialState.FAIL  # lr 9 diverges, alone and in its stack
    for a, b in zip(one.trials, stacked.trials):
        assert a.params == b.params and a.intermediate_values == b.intermediate_values
        assert (a.value == b.value) or (a.value is None and b.value is None), a.number


def test_pruned_members_stop_alone_and_are_told_pruned():
    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"lr": [1e-4, 10.0], "epochs": [5, 60]})

    class PruneTrialOneAtStepFive(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1 and trial.last_step is not None and trial.last_step >= 5

    l1 = [c for c in CONFIGS if c["optimizer_loss"] == "sgd+l1"]
    stacked = study_of(l1, PruneTrialOneAtStepFive())
    with Objective(experiment, space, track=False, report_every=1) as objective:
        loop.optimize(stacked, objective, 4, batch=4)
    assert [t.state for t in stacked.trials] == [TrialState.COMPLETE, TrialState.PRUNED] + [TrialState.COMPLETE] * 2
    assert max(stacked.trials[1].intermediate_values) == 5
    assert len(stacked.trials[0].intermediate_values) == 40  # its stack-mate went on to its own epochs


@pytest.mark.slow  # a whole batched search in-process
def test_a_model_that_cannot_be_stacked_runs_one_at_a_time_with_a_notice(capsys):
    experiment = load("binary_classification")
    space = space_module.resolve(experiment, overrides={"epochs": [3, 5]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    with Objective(experiment, space, track=False) as objective:
        loop.optimize(study, objective, 4, batch=4)
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    err = capsys.readouterr().err
    assert err.count("trained one at a time, not stacked") == 1 and "matrix products" in err  # once, not per pair


@pytest.mark.parametrize("argv, line", [
    (["search", "--batch", "0"], "--batch must be a positive integer, got '0'"),
    (["search", "--batch", "x"], "--batch must be a positive integer, got 'x'"),
    (["search", "--batch", "2", "--n-jobs", "2"], "--batch 2 with --n-jobs 2: choose one"),
    # Counts that are allocated up front (K trials asked, K threads started) are bounded.
    (["search", "--batch", "1000000000"], "--batch must be at most 256, got '1000000000'"),
    (["search", "--n-jobs", "100000"], "--n-jobs must be at most 64, got '100000'"),
])
def test_bad_batch_input_is_one_line_and_writes_nothing(argv, line, capsys, tmp_path, monkeypatch):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_every_member_of_a_batch_beats_its_heartbeat_on_an_rdb_storage(tmp_path, recwarn):
    """Optuna's optimize beats a trial's heartbeat; a batch does it for all its trials, or another
    worker would fail them as stale while they train."""
    import sqlite3

    from harness.search import study as study_module

    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"lr": [1e-4, 0.1], "epochs": [2500, 3000], "pairs": ["sgd+l1"]})
    storage = study_module.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=1)
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(0),
                                pruner=optuna.pruners.NopPruner())
    with Objective(experiment, space, track=False) as objective:
        loop.optimize(study, objective, 4, batch=4)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        beats = db.execute("SELECT COUNT(DISTINCT trial_id) FROM trial_heartbeats").fetchone()[0]
    assert beats == 4
    assert not [w for w in recwarn if "Heartbeat of storage" in str(w.message)]  # beaten here, as optimize would


@pytest.mark.slow  # a whole batched search in-process
def test_a_tracked_batch_writes_its_runs_together_and_keeps_the_contract(workdir, monkeypatch):
    """Tracked, a batch's runs are created in one transaction and its records written in another,
    and the store holds what one trial at a time leaves: one complete run per trial, audit clean."""
    from harness.search.durable import audit
    from harness.search import study as study_module
    from harness.sink import MlflowSink
    from search_helpers import check_contract

    class PruneTrialTwoAtStepFive(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 2 and trial.last_step is not None and trial.last_step >= 5

    calls = {"create_runs": [], "write_many": []}
    for name in calls:
        real = getattr(MlflowSink, name)
        monkeypatch.setattr(MlflowSink, name, lambda self, *a, _real=real, _name=name: calls[_name].append(len(a[-1]))
                            or _real(self, *a))
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"lr": [1e-4, 10.0], "epochs": [5, 60]})
    storage = study_module.open_storage(f"journal:{workdir / 'optuna_journal.log'}")
    study = optuna.create_study(study_name="batched", storage=storage, pruner=PruneTrialTwoAtStepFive(),
                                sampler=optuna.samplers.RandomSampler(0))
    for params in CONFIGS:
        study.enqueue_trial(params)
    with Objective(experiment, space, report_every=1) as objective:
        loop.optimize(study, objective, len(CONFIGS), batch=len(CONFIGS))
    assert calls["create_runs"] == [9] and calls["write_many"][0] == 9  # one transaction each for the batch
    assert [t.state for t in study.trials][:3] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    _, runs = check_contract(workdir, study, figures_for={study.best_trial.number})
    assert runs[1].data.tags["harness.fail_reason"].startswith("diverged")
    from harness.tracking import read_client

    report = audit.audit(study, storage, read_client())
    assert not report.violations, report.violations


def full_disk_batch(workdir, monkeypatch, journal_full: bool = False):
    """A tracked batch of 4 (3 complete, 1 diverges) whose records cannot be written: the MLflow
    store refuses them (a full disk), and with ``journal_full`` the Optuna journal then refuses
    writes too, as when both live on that disk. Returns the study, its storage and close()'s errors."""
    from harness.fast import mlflow_sql
    from harness.search import study as study_module

    real = mlflow_sql.DirectWriter.write_many

    def full_disk(self, records):  # the params at the runs' creation go in; the batch's records do not
        if any(metrics for _, metrics, *_ in records):
            raise OSError("database or disk is full")
        return real(self, records)

    monkeypatch.setattr(mlflow_sql.DirectWriter, "write_many", full_disk)
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = load("linear_regression")
    space = space_module.resolve(experiment, overrides={"lr": [1e-4, 10.0], "epochs": [5, 60]})
    storage = study_module.open_storage(f"journal:{workdir / 'optuna_journal.log'}")
    study = optuna.create_study(study_name="full", sampler=optuna.samplers.RandomSampler(0),
                                pruner=optuna.pruners.NopPruner(), storage=storage)
    for params in CONFIGS[:4]:
        study.enqueue_trial(params)
    objective = Objective(experiment, space)
    loop.optimize(study, objective, 4, batch=4)
    with monkeypatch.context() as disk:
        if journal_full:
            disk.setattr(storage, "create_new_trial", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
        errors = objective.close()
    assert len(errors) == 1 and "disk is full" in str(errors[0])
    return study, storage


@pytest.mark.slow  # a whole batched search in-process
def test_a_batch_whose_records_fail_to_write_closes_every_run_incomplete_and_queues_them_again(workdir, monkeypatch):
    """One transaction for a batch's records: when it fails (a full disk), none of them is in, so
    every run is closed FAILED as incomplete and each completed configuration is queued again."""
    from conftest import all_runs

    study, _ = full_disk_batch(workdir, monkeypatch)
    trials = {str(t.number): t for t in study.trials}
    children = [r for r in all_runs(workdir) if "optuna.trial_number" in r.data.tags]
    assert len(children) == 4
    for run in children:
        assert run.info.status == "FAILED" and "disk is full" in run.data.tags["harness.record_incomplete"]
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    completed = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == completed and len(completed) == 3
    assert set(trials) >= {r.data.tags["optuna.trial_number"] for r in children}


@pytest.mark.slow  # a whole batched search in-process
def test_when_the_journal_cannot_queue_them_either_audit_says_so_and_fix_queues_them(workdir, monkeypatch):
    """The journal on the same full disk: the worker's own retry fails. Audit's advice is then
    true: it names each configuration not queued, and --fix queues each once."""
    from harness.search.durable import audit
    from harness.tracking import read_client

    study, storage = full_disk_batch(workdir, monkeypatch, journal_full=True)
    completed = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(completed) == 3 and not [t for t in study.trials if t.state == TrialState.WAITING]
    advice = [v for v in audit.audit(study, storage, read_client()).violations if "--fix queues it" in v]
    assert [int(v.split()[1].rstrip(":")) for v in advice] == completed
    fixed = audit.audit(study, storage, read_client(), fix=True)
    assert not [v for v in fixed.violations if "--fix queues it" in v], fixed.violations
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == completed
    again = audit.audit(study, storage, read_client(), fix=True)  # queued once, not at every --fix
    assert len([t for t in study.trials if t.state == TrialState.WAITING]) == 3 and not again.violations


def test_a_trial_left_running_with_no_worker_is_failed_and_retried_once_it_is_old(tmp_path):
    """What a search killed between asking a trial and naming its worker left (every harness before
    the worker was written with the trial): after OWNERLESS_S it is dead, for the next search and
    audit, and it stops counting toward --max-trials; a young one is left alone."""
    from datetime import datetime, timedelta

    from harness.search.durable import audit
    from harness.search import study as study_module
    from harness.search.loop import StudyFull
    from harness.search.durable.workers import OWNERLESS_S

    storage = study_module.open_storage(f"journal:{tmp_path / 'optuna_journal.log'}")
    study = optuna.create_study(study_name="s", storage=storage)
    for age in (OWNERLESS_S + 60, 0):  # as Optuna creates a trial, RUNNING with no user attrs, that long ago
        template = optuna.trial.create_trial(state=TrialState.RUNNING)
        template.datetime_start = datetime.now() - timedelta(seconds=age)
        storage.create_new_trial(study._study_id, template)
    with pytest.raises(StudyFull):  # both count: the study is full (--max-trials 2)
        loop.ask(study, 2)
    assert [t.number for t in audit.stale_trials(study)] == [0]  # what audit reports and --fix fails
    assert audit.recover_stale(study, storage) == ([0], [])
    old, young, retried = study.get_trials()
    assert (old.state, young.state, retried.state) == (TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
    assert retried.system_attrs["failed_trial"] == 0 and old.user_attrs["fail_reason"] == "worker died"


@pytest.mark.slow  # a whole batched search in-process
def test_a_late_heartbeat_fails_a_trial_only_when_its_worker_on_this_machine_is_gone(tmp_path, recwarn):
    """Optuna's stale check, as every worker runs it before a trial: a heartbeat far past the grace
    fails the trial of a dead worker, never that of one that lives (a starved one: its beat is late)."""
    import sqlite3

    from optuna.storages import fail_stale_trials

    from harness.search import study as study_module

    storage = study_module.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=1)
    study = optuna.create_study(storage=storage)
    live, dead = study.ask(), study.ask()  # both owned by this process from their creation
    dead.set_user_attr("harness.worker", {**dead.user_attrs["harness.worker"], "started": "0"})  # a pid reused
    for trial in (live, dead):
        storage.record_heartbeat(trial._trial_id)
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00'")
    fail_stale_trials(study)
    assert [t.state for t in study.get_trials()[:2]] == [TrialState.RUNNING, TrialState.FAIL]


@pytest.mark.slow  # a whole batched search in-process
def test_a_batch_whose_trial_another_machine_failed_as_stale_tells_the_rest(tmp_path, recwarn):
    """A worker elsewhere cannot be checked by pid: starved past the grace, its trial is failed
    (and retried) there. When the batch ends, the others are told and the failed one is left as is."""
    from harness.search import study as study_module

    storage = study_module.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=1)
    study = optuna.create_study(storage=storage, pruner=optuna.pruners.NopPruner())
    for params in CONFIGS[:4]:
        study.enqueue_trial(params)

    class FailedElsewhere(Objective):
        def run_batch(self, trials):
            outcomes = super().run_batch(trials)
            storage.set_trial_state_values(trials[2]._trial_id, TrialState.FAIL)  # as fail_stale_trials does
            return outcomes

    with FailedElsewhere("linear_regression", track=False) as objective:
        loop.optimize(study, objective, 4, batch=4)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                               TrialState.COMPLETE]


def test_a_worker_killed_and_not_yet_reaped_is_gone(tmp_path):
    """A killed worker whose parent has not waited for it yet (a zombie) still answers signal 0
    and keeps its start time: its trial is stale all the same, by pid and by heartbeat alike."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from harness.search.durable import audit
    from harness.search import study as study_module
    from harness.search.durable.workers import identity

    # A worker holds its lease from its first identity() on (a bare `sleep` was one before leases).
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom harness.search.durable.workers import "
                             "identity\nidentity()\nprint(flush=True)\ntime.sleep(600)"],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        proc.stdout.readline()  # its lease is held
        storage = study_module.open_storage(f"journal:{tmp_path / 'optuna_journal.log'}")
        study = optuna.create_study(storage=storage)
        owner = {**identity(), "pid": proc.pid}
        owner["started"] = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        storage.create_new_trial(study._study_id, optuna.trial.create_trial(
            state=TrialState.RUNNING, user_attrs={"harness.worker": owner}))
        assert audit.stale_trials(study) == []  # its worker lives
        proc.kill()
        while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        assert [t.number for t in audit.stale_trials(study)] == [0]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow  # a whole batched search in-process
def test_a_signal_while_a_trial_s_run_is_created_leaves_the_trial_pointing_at_it(in_workdir, monkeypatch, capsys):
    """Ctrl-C landing as a trial's run is being created (its creation submitted, its future not yet
    kept): the trial still ends interrupted, linked to its run, which is KILLED."""
    import os
    import signal

    from conftest import all_runs
    from harness.cli import main
    from harness.search.recorder import TrialRecorder
    from search_helpers import journal_study

    real = TrialRecorder.start_trials

    def interrupted_on_return(self, trials):
        futures = real(self, trials)
        os.kill(os.getpid(), signal.SIGINT)
        return futures

    monkeypatch.setattr(TrialRecorder, "start_trials", interrupted_on_return)
    from harness import signals

    monkeypatch.setattr(signals, "_received", [])  # this process's signals: none before, none kept after
    monkeypatch.setattr(signals, "_acted", [0])
    workdir = in_workdir  # its store named absolutely: MLflow keeps the relative default of the first folder
    assert main(["search", "--n-trials", "3", "--no-progress", "--epochs-range", "5", "10"]) == 130
    [trial] = journal_study(workdir).trials[:1]
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted"
    [run] = [r for r in all_runs(workdir) if r.data.tags.get("optuna.trial_number") == "0"]
    assert trial.user_attrs.get("mlflow_run_id") == run.info.run_id and run.info.status == "KILLED"


@pytest.mark.slow  # a whole batched search in-process
def test_a_signal_while_a_batch_is_asked_leaves_every_asked_trial_with_its_run(in_workdir, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) between two asks of a batch: the trials asked so far are FAIL, interrupted,
    queued again, and each has its FAILED run, so the audit finds the stores in step (an outside probe
    found asked trials with no run after repeated signals)."""
    import os
    import signal

    from conftest import all_runs
    from harness import signals
    from harness.cli import main
    from search_helpers import journal_study

    real, asked = optuna.Study.ask, []

    def ask_then_signal(self, *args, **kwargs):
        trial = real(self, *args, **kwargs)
        asked.append(trial.number)
        if len(asked) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask_then_signal)
    monkeypatch.setattr(signals, "_received", [])  # this process's signals: none before, none kept after
    monkeypatch.setattr(signals, "_acted", [0])
    workdir = in_workdir  # its store named absolutely: MLflow keeps the relative default of the first folder
    # Named absolutely: MLflow keeps one store object per URI, and the relative default may be bound
    # to another test's folder in this process.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    assert main(["search", "--batch", "4", "--n-trials", "4", "--no-progress", "--epochs-range", "5", "10"]) == 130
    trials = journal_study(workdir).trials
    interrupted = [t for t in trials if t.number in asked]
    assert len(interrupted) == 2 and all(t.state == TrialState.FAIL for t in interrupted)
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in interrupted)
    runs = {r.data.tags.get("optuna.trial_number"): r for r in all_runs(workdir)}
    for trial in interrupted:
        run = runs[str(trial.number)]
        assert run.info.status == "FAILED" and trial.user_attrs.get("mlflow_run_id") == run.info.run_id
        assert run.data.tags["harness.fail_reason"] == "interrupted"
    assert sum(t.state == TrialState.WAITING for t in trials) == 2  # both queued again
    capsys.readouterr()
    assert main(["audit", "--study", "linear_regression-search"]) == 0, capsys.readouterr()


@pytest.mark.parametrize("forged", [
    {"pid": 1}, {"pid": 0}, {"pid": -1}, {"pid": True}, {"pid": 2 ** 70}, {"pid": "1"}, {"pid": None},
    {"pid": 1, "started": None}, {"pid": 1, "started": "0"}, {"started": "0"}, {"pid": "own"},
    {"pid": "own", "started": None}, {"pid": "own", "started": 12},
])
def test_a_worker_record_that_names_no_live_worker_leaves_its_trial_stale(tmp_path, forged):
    """Probe 8: a trial whose journal record names this host's pid 1 (or 0: the process group) with no
    start time stayed RUNNING forever: audit said clean, --fix did nothing, and it counted toward
    --max-trials. A record names a live worker only with a pid and start time of a running process."""
    import os

    from harness.search import study as study_module
    from harness.search.durable import audit
    from harness.search.durable.workers import identity

    storage = study_module.open_storage(f"journal:{tmp_path / 'optuna_journal.log'}")
    study = optuna.create_study(storage=storage)
    owner = {**identity(), **forged}
    if owner.get("pid") == "own":
        owner["pid"] = os.getpid()
    if "started" not in forged:
        owner.pop("started")
    storage.create_new_trial(study._study_id, optuna.trial.create_trial(
        state=TrialState.RUNNING, user_attrs={"harness.worker": owner}))
    storage.create_new_trial(study._study_id, optuna.trial.create_trial(  # this process, as it records itself
        state=TrialState.RUNNING, user_attrs={"harness.worker": identity()}))
    assert [t.number for t in audit.stale_trials(study)] == [0]
    assert audit.recover_stale(study, storage)[0] == [0]


@pytest.mark.parametrize("record", ["junk", {}, [], 7, {"host": "", "pid": 5, "started": "1"},
                                    {"host": 5, "pid": 5}, {"pid": 5, "started": "1"}])
def test_a_worker_record_of_no_shape_a_worker_writes_leaves_its_trial_stale(tmp_path, record):
    """Probe 9: a record that is not a dict of this host ("junk", {}) made `alive` say "elsewhere", so the
    trial was never stale: audit clean, --fix idle, RUNNING for good. Only identity()'s shape names a worker."""
    from harness.search import study as study_module
    from harness.search.durable import audit

    storage = study_module.open_storage(f"journal:{tmp_path / 'optuna_journal.log'}")
    study = optuna.create_study(storage=storage)
    storage.create_new_trial(study._study_id, optuna.trial.create_trial(
        state=TrialState.RUNNING, user_attrs={"harness.worker": record}))
    assert [t.number for t in audit.stale_trials(study)] == [0]
    assert audit.recover_stale(study, storage)[0] == [0]
