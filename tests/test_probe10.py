"""What a tenth outside probe broke (issue 26) in the lead's part: a retry named the run of the
attempt it retried until it had its own, and a kill -9 in that window left the study with links no
`audit --fix` could take back."""
import os
import socket

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from harness import schema
from harness.search.durable import workers

SMALL = ["--n-trials", 2, "--epochs-range", 5, 10, "--no-progress", "--pruner", "none"]


def dead_worker() -> dict:
    """This host, this pid, another start time: the record of a process that is gone."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": "1"}


def test_a_retry_starts_without_the_attrs_of_the_attempt_it_retries():
    """Every way the harness queues a configuration again (workers.retry: interrupts, audit --fix,
    a failed write; and the RDB storages' heartbeat callback) leaves the attempt's own attrs behind
    and keeps the rest, and Optuna still finds the retry chain."""
    from harness.search.durable.retries import Retry

    study = optuna.create_study()
    attempt = {schema.RUN_ATTR: "r0", schema.WORKER_ATTR: dead_worker(), schema.FAIL_REASON_ATTR: "interrupted",
               schema.PROGRESS_ATTR: {"trial": 0}, "queued_by": "me"}
    assert set(attempt) - {"queued_by"} == set(schema.ATTEMPT_ATTRS)
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 1.0},
                                 distributions={"x": optuna.distributions.FloatDistribution(0, 2)}, user_attrs=attempt))
    assert workers.retry(study, study.trials[0])
    Retry(max_retry=3)(study, study.trials[1])  # what study.py hands the RDB storage: a retry of a retry
    first, second = study.trials[1:]
    for retried in (first, second):
        assert retried.state == TrialState.WAITING and retried.user_attrs == {"queued_by": "me"}
        assert retried.params == {"x": 1.0}
        assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retried) == 0
    assert workers.earlier_attempts(second) == [0, 1]
    assert study.trials[0].user_attrs == attempt  # the attempt keeps its own


@pytest.mark.slow  # whole searches and trainings in-process
def test_links_an_older_harness_s_retries_inherited_are_fixed_or_not_held_against_the_study(in_workdir,
                                                                                             cli_in_process):
    """A study written by a harness whose retries copied the run attr: a retry killed before its run
    was created names its earlier attempt's run. The one still RUNNING loses that link when --fix
    fails it (and gets a FAILED run of its own); the one already FAIL, whose attrs Optuna no longer
    lets anyone change, is not a violation: its run is the one tagged with its number. After one
    --fix the audit is clean (before: violations no --fix could clear, forever)."""
    from conftest import all_runs
    from search_helpers import journal_study

    assert cli_in_process("search", *SMALL, cwd=in_workdir).returncode == 0
    study = journal_study(in_workdir)
    earlier = study.trials[0]
    inherited = {**earlier.user_attrs, schema.WORKER_ATTR: dead_worker()}
    chain = {"failed_trial": 0, "retry_history": [0]}
    study.add_trial(create_trial(state=TrialState.FAIL, params=earlier.params, distributions=earlier.distributions,
                                 user_attrs={**inherited, schema.FAIL_REASON_ATTR: workers.WORKER_DIED},
                                 system_attrs=chain))
    finished = study.trials[-1].number
    storage = study._storage
    running = storage.create_new_trial(study._study_id)
    for name, value in {**earlier.params}.items():
        storage.set_trial_param(running, name, earlier.distributions[name].to_internal_repr(value),
                                earlier.distributions[name])
    for key, value in inherited.items():
        storage.set_trial_user_attr(running, key, value)
    storage.set_trial_system_attr(running, "failed_trial", 0)
    storage.set_trial_system_attr(running, "retry_history", [0, finished])
    out = cli_in_process("audit", "--study", "linear_regression-search", cwd=in_workdir)
    assert out.returncode == 1 and "is RUNNING but its worker" in out.stdout, out.stdout
    out = cli_in_process("audit", "--study", "linear_regression-search", "--fix", cwd=in_workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    out = cli_in_process("audit", "--study", "linear_regression-search", cwd=in_workdir)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout
    study = journal_study(in_workdir)
    by_number = {t.number: t for t in study.trials}
    was_running = by_number[finished + 1]
    assert was_running.state == TrialState.FAIL
    assert was_running.user_attrs.get(schema.RUN_ATTR) != earlier.user_attrs[schema.RUN_ATTR]
    for number in (finished, was_running.number):  # each its own FAILED run, tagged with its number
        [run] = [r for r in all_runs(in_workdir) if r.data.tags.get(schema.TRIAL_NUMBER_TAG) == str(number)]
        assert run.info.status == "FAILED" and run.info.run_id != earlier.user_attrs[schema.RUN_ATTR]
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert queued and all(schema.RUN_ATTR not in t.user_attrs for t in queued)


@pytest.mark.slow  # whole searches and trainings in-process
def test_a_train_resume_whose_checkpoint_is_refused_inside_says_it_resumed_at_epoch_0(in_workdir, cli_in_process):
    """The tag a --resume sets to where the run goes on from is set back to 0 when the checkpoint's
    inside is refused and the run trains again from epoch 0 (before: it kept saying epoch 9)."""
    import torch
    from conftest import artifact_folder, client_for
    from harness.schema import RESUMED_TAG, checkpoint_name

    flags = ["train", "--epochs", 12, "--checkpoint-every", 3, "--checkpoint-seconds", 0]
    assert cli_in_process(*flags, cwd=in_workdir).returncode == 0
    client = client_for(in_workdir)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    client.set_terminated(run.info.run_id, "KILLED")  # as a run stopped early leaves it
    for slot in (0, 1):
        path = artifact_folder(in_workdir, run.info.run_id) / checkpoint_name(slot)
        state = torch.load(path, weights_only=True)
        state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)  # passes the read, fails the restore
        torch.save(state, path)
    out = cli_in_process(*flags, "--resume", run.info.run_id, cwd=in_workdir)
    assert out.returncode == 0 and f"the checkpoint of run {run.info.run_id} refused" in out.stderr, out.stderr
    assert client.get_run(run.info.run_id).data.tags[RESUMED_TAG] == "0"


@pytest.mark.slow  # three in-process searches of digits
def test_a_retried_trial_whose_earlier_checkpoint_is_refused_inside_says_it_resumed_at_epoch_0(tmp_path, migrated_db,
                                                                                              cli_in_process):
    """The retry's run is created saying where it goes on from; when the earlier attempt's checkpoint
    is refused once loaded and the trial trains from epoch 0, its run says 0."""
    import torch
    from conftest import artifact_folder, new_store
    from harness.experiment import load
    from harness.schema import RESUMED_TAG, checkpoint_name
    from test_checkpoints import SEARCH, STOPPING, runs_of

    for name in ("never", "cut", "code"):
        (tmp_path / name).mkdir()
    never, cut = new_store(tmp_path / "never", migrated_db), new_store(tmp_path / "cut", migrated_db)
    code = tmp_path / "code"
    (code / "never.py").write_text(STOPPING.format(stop_at=-1, where=tmp_path))
    assert cli_in_process(*SEARCH, "--experiment", code / "never.py", cwd=never).returncode == 0
    calls = load(str(code / "never.py")).metrics.__globals__["CALLS"][0]
    (reference,) = [r for r in runs_of(never)[1].values() if "mlflow.parentRunId" in r.data.tags]
    per_epoch = (calls - 1) // int(reference.data.params["epochs"])
    (code / "cut.py").write_text(STOPPING.format(stop_at=1 + 4 * per_epoch + 1, where=tmp_path))
    assert cli_in_process(*SEARCH, "--experiment", code / "cut.py", cwd=cut).returncode == 130
    (first,) = [r for r in runs_of(cut)[1].values() if "mlflow.parentRunId" in r.data.tags]
    for slot in (0, 1):
        path = artifact_folder(cut, first.info.run_id) / checkpoint_name(slot)
        state = torch.load(path, weights_only=True)
        state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)  # passes the read, fails the restore
        torch.save(state, path)
    out = cli_in_process(*SEARCH, "--experiment", code / "cut.py", cwd=cut)
    assert out.returncode == 0 and "checkpoint refused" in out.stderr, out.stderr
    trials = [r for r in runs_of(cut)[1].values() if "mlflow.parentRunId" in r.data.tags]
    (retry,) = [r for r in trials if r.info.run_id != first.info.run_id]
    assert retry.info.status == "FINISHED" and retry.data.tags[RESUMED_TAG] == "0"


@pytest.mark.slow  # whole searches and trainings in-process
def test_audit_names_a_forged_worker_record_in_a_bounded_line_and_a_null_one_as_no_worker(in_workdir, cli_in_process):
    """The journal is anyone's to write: a worker record of a megabyte is shown cut to 200 characters,
    and a null one as no worker (it said "its worker None")."""
    from search_helpers import journal_study

    assert cli_in_process("search", *SMALL, cwd=in_workdir).returncode == 0
    study = journal_study(in_workdir)
    storage = study._storage
    for record in ({"host": socket.gethostname(), "pid": 1, "started": "1", "pad": "x" * 1_000_000}, None):
        trial = storage.create_new_trial(study._study_id)
        storage.set_trial_user_attr(trial, schema.WORKER_ATTR, record)
    out = cli_in_process("audit", "--study", "linear_regression-search", cwd=in_workdir)
    assert out.returncode == 1 and len(out.stdout) < 2000, len(out.stdout)
    assert "... (1000" in out.stdout and "with no worker recorded since" in out.stdout, out.stdout
