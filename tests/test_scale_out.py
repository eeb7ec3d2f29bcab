"""Many workers on PostgreSQL and an MLflow tracking server: the engines users scale out on.

The services are real: PostgreSQL from the system's packages and `mlflow server` with a PostgreSQL
backend store and served artifacts. CI starts PostgreSQL and passes it in $HARNESS_TEST_POSTGRES;
elsewhere the tests start their own when PostgreSQL is installed, and are skipped when it is not. The
services are the session's (conftest.cluster_services), shared with test_models and test_checkpoints.
"""
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import cli_env, run_cli, served_login
from harness import cluster
from harness.errors import HarnessError, UsageError
from harness.experiment import load as load_experiment
from harness.search import space as space_module
from harness.search.study import open_storage
from search_helpers import check_contract

CAP = 12
# Only the tests that drive a trial by hand (study.ask) see it; harness search uses study.optimize.
pytestmark = [pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize"),
              pytest.mark.slow]  # real processes: PostgreSQL, mlflow server, workers


def require_postgres_programs():
    try:
        cluster.postgres_bin()
    except UsageError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def services(cluster_services):
    """The session's services, their login in our environment for this module (cli_env leaves it out)."""
    with served_login(cluster_services):
        yield cluster_services


def env_for(services):
    return cli_env(MLFLOW_TRACKING_URI=services["tracking_uri"], **services["login"])


def client_of(services):
    from mlflow import MlflowClient

    return MlflowClient(services["tracking_uri"])


def worker(services, study, cwd, *extra):
    """One `harness search` worker process, as a user starts it on any machine."""
    cmd = [sys.executable, "-m", "harness", "search", "--storage", services["storage"], "--study-name", study,
           "--max-trials", CAP, "--n-trials", CAP, "--mlflow-experiment", study, "--no-progress",
           "--heartbeat", 1, *extra]
    return subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env_for(services),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load(services, study):
    return optuna.load_study(study_name=study, storage=open_storage(services["storage"]))


def in_process_env(services) -> dict:
    """What env_for adds, for cli_in_process (the rest of our environment is the services')."""
    return {"MLFLOW_TRACKING_URI": services["tracking_uri"], **services["login"]}


def audit(services, study, cwd, cli):
    """`harness audit` through ``cli`` (cli_in_process: the audits were real processes)."""
    return cli("audit", "--study", study, "--storage", services["storage"], cwd=cwd, env=in_process_env(services))


def check_cluster_study(services, study_name, cwd, cli, *, failed: int):
    """Exactly CAP trials that count, all finished, one run each, artifacts served, audit clean."""
    study = load(services, study_name)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == CAP + failed
    counted = [t for t in study.trials if t.state != TrialState.FAIL]
    assert len(counted) == CAP
    assert {t.state for t in counted} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert sum(t.state == TrialState.FAIL for t in study.trials) == failed
    client = client_of(services)
    parents = client.search_runs([client.get_experiment_by_name(study_name).experiment_id],
                                 filter_string="tags.`harness.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs["mlflow_parent_run_id"]
    # check_contract downloads every COMPLETE trial's state_dict.pt through the server.
    _, runs = check_contract(cwd, study, client=client)
    for run in runs.values():  # served artifacts: uploaded through the server, not written by the worker
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    result = audit(services, study_name, cwd, cli)
    assert result.returncode == 0 and "clean" in result.stdout, result.stdout + result.stderr
    return study


@pytest.fixture(scope="module")
def capped_study(services, tmp_path_factory):
    """Three workers started together on a study that does not exist yet, sharing a cap of CAP."""
    cwd = tmp_path_factory.mktemp("workers")
    workers = [worker(services, "capped", cwd) for _ in range(3)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err
        assert "locked" not in err and "Traceback" not in err
    return cwd, outputs


def test_three_workers_share_one_study_and_stop_at_exactly_the_cap(services, capped_study, cli_in_process):
    cwd, outputs = capped_study
    study = check_cluster_study(services, "capped", cwd, cli_in_process, failed=0)
    # Every worker took part: the cap is shared, not reached by one of them alone.
    assert len({t.user_attrs["harness.worker"]["pid"] for t in study.trials}) == 3


def test_compare_predict_reproduce_and_audit_work_against_the_server(services, capped_study, cli_in_process):
    """compare and predict in-process (were real processes); reproduce as a user's process runs it."""
    cwd, _ = capped_study
    env = env_for(services)
    study = load(services, "capped")
    compared = cli_in_process("compare", "--study", "capped", "--top", 3, "--out", cwd / "top.png", cwd=cwd,
                              env=in_process_env(services))
    assert compared.returncode == 0, compared.stderr
    assert (cwd / "top.png").stat().st_size > 0
    best = study.best_trial.user_attrs["mlflow_run_id"]
    assert best in compared.stdout
    predicted = cli_in_process("predict", best, "--x", 0.5, cwd=cwd, env=in_process_env(services))
    assert predicted.returncode == 0, predicted.stderr
    reproduced = run_cli("reproduce", best, cwd=cwd, env=env)
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr


def test_a_worker_killed_mid_trial_is_replaced_and_the_study_ends_clean(services, tmp_path, cli_in_process):
    workers = [worker(services, "killed", tmp_path) for _ in range(3)]
    victim = workers[0]
    storage = open_storage(services["storage"])
    deadline = time.time() + 120
    doomed = None
    while doomed is None and time.time() < deadline:
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # not created yet
            trials = []
        for t in trials:
            if t.user_attrs.get("harness.worker", {}).get("pid") == victim.pid and "mlflow_run_id" in t.user_attrs:
                doomed = t.number
        time.sleep(0.05)
    assert doomed is not None, "the victim never ran a trial"
    victim.send_signal(signal.SIGKILL)
    for w in workers[1:]:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    # Whatever the survivors left (a retry queued after they stopped), the next worker picks up.
    late = worker(services, "killed", tmp_path)
    late.communicate(timeout=600)
    assert late.returncode == 0
    study = check_cluster_study(services, "killed", tmp_path, cli_in_process, failed=1)
    [failed] = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed.number == doomed
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == doomed]
    assert len(retries) == 1 and retries[0].params == failed.params


def silent_trial(services, study_name: str, cwd, cli):
    """A study with one trial RUNNING on 'another machine' that beat once and went silent, and its run.
    Its first trial searched through ``cli`` (cli_in_process: it was a real process)."""
    first = cli("search", "--storage", services["storage"], "--study-name", study_name, "--n-trials", 1,
                "--mlflow-experiment", study_name, "--no-progress", cwd=cwd, env=in_process_env(services))
    assert first.returncode == 0, first.stderr
    storage = open_storage(services["storage"], heartbeat=1)
    study = optuna.load_study(study_name=study_name, storage=storage)
    trial = study.ask()
    space_module.sample(trial, space_module.resolve(load_experiment("linear_regression")))
    trial.set_user_attr("harness.worker", {"host": "another-machine", "pid": 1, "started": "1"})
    client = client_of(services)
    parent = study.user_attrs["mlflow_parent_run_id"]
    run = client.create_run(client.get_run(parent).info.experiment_id, run_name=f"trial-{trial.number}", tags={
        "mlflow.parentRunId": parent, "optuna.trial_number": str(trial.number), "optuna.study_name": study_name})
    optimizer, loss = trial.params["optimizer_loss"].split("+")
    for key, value in {"lr": trial.params["lr"], "epochs": trial.params["epochs"], "optimizer": optimizer,
                       "loss": loss, "trial_number": trial.number}.items():
        client.log_param(run.info.run_id, key, value)
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    storage.record_heartbeat(trial._trial_id)  # then the machine goes silent
    time.sleep(3 * 1 + 1)  # past the grace period of a 1 s heartbeat
    return storage, trial, run.info.run_id


def test_the_heartbeat_fails_a_silent_worker_s_trial_from_another_machine(services, tmp_path, cli_in_process):
    """A worker elsewhere cannot be checked by pid: its trial is failed when its heartbeat stops. The
    resuming search in-process (was a real process): the silent trial's host is another machine's
    either way, and a real worker on these services is test_three_workers_share_one_study_..."""
    storage, trial, run_id = silent_trial(services, "silent", tmp_path, cli_in_process)
    resumed = cli_in_process("search", "--storage", services["storage"], "--study-name", "silent", "--n-trials", 1,
                             "--mlflow-experiment", "silent", "--no-progress", "--heartbeat", 1,
                             cwd=tmp_path, env=in_process_env(services))
    assert resumed.returncode == 0, resumed.stderr
    assert f"trial(s) {trial.number} were left RUNNING" in resumed.stderr
    study = optuna.load_study(study_name="silent", storage=storage)
    assert study.trials[trial.number].state == TrialState.FAIL
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.params == trial.params
    assert client_of(services).get_run(run_id).info.status == "FAILED"
    result = audit(services, "silent", tmp_path, cli_in_process)
    assert result.returncode == 0, result.stdout


def test_audit_fix_applies_the_heartbeat_to_a_silent_worker_s_trial(services, tmp_path, cli_in_process):
    """In-process (the search and the audits were real processes)."""
    storage, trial, run_id = silent_trial(services, "silent-audit", tmp_path, cli_in_process)
    fixed = cli_in_process("audit", "--study", "silent-audit", "--storage", services["storage"], "--fix",
                           "--heartbeat", 1, cwd=tmp_path, env=in_process_env(services))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"fixed: trial {trial.number}: RUNNING with its heartbeat silent -> FAIL" in fixed.stdout
    assert f"fixed: run {run_id} of trial {trial.number}: RUNNING with its trial FAIL -> FAILED" in fixed.stdout
    study = optuna.load_study(study_name="silent-audit", storage=storage)
    assert study.trials[trial.number].state == TrialState.FAIL
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert retry.state == TrialState.WAITING and retry.params == trial.params  # the next worker runs it
    assert client_of(services).get_run(run_id).info.status == "FAILED"
    assert audit(services, "silent-audit", tmp_path, cli_in_process).returncode == 0


def test_storage_connections_survive_being_dropped_by_the_server(services):
    """What an idle timeout or a database restart does to pooled connections: the next call works."""
    import psycopg

    storage = open_storage(services["storage"])
    study = optuna.create_study(study_name="dropped", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    database = services["storage"].rsplit("/", 1)[1]
    with psycopg.connect(services["storage"].rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        dropped = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchone()[0]
    assert dropped >= 1  # the pooled connection of this storage among them
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="dropped", storage=storage).trials) == 2


def test_a_capped_study_refuses_trials_beyond_the_cap_but_not_retries(services):
    from harness.search.loop import StudyFull, ask, optimize

    storage = open_storage(services["storage"])
    study = optuna.create_study(study_name="cap-unit", storage=storage)
    optimize(study, lambda t: t.suggest_float("x", 0, 1), n_trials=3, max_trials=2)  # stops at the cap
    with pytest.raises(StudyFull):
        ask(study, 2)
    assert len(study.trials) == 2
    study.enqueue_trial({"x": 0.5})  # a retry or an enqueued trial comes with a template: always let in
    assert len(study.trials) == 3
    assert ask(study, 2).suggest_float("x", 0, 1) == 0.5  # and is asked in the full study


def test_harness_cluster_runs_workers_on_its_own_services_then_stops_them(tmp_path):
    import re
    import socket

    require_postgres_programs()
    result = run_cli("cluster", "--workers", 2, "--max-trials", 4, "--server-workers", 1, "--dir", tmp_path / "c", "--",
                     "--epochs-range", 20, 40, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit of study 'cluster-search': 4 trials, 4 child runs: clean" in result.stdout
    assert "exit statuses [0, 0]" in result.stdout
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", result.stdout)]
    assert len(ports) == 2  # PostgreSQL's and the tracking server's, both on loopback
    for port in ports:  # and both stopped
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port


@pytest.mark.parametrize("flag, value", [("--workers", "0"), ("--server-workers", "0"), ("--server-workers", "two")])
def test_harness_cluster_refuses_bad_input_in_one_line(tmp_path, flag, value, cli_in_process):
    """In-process (was a real process per case): test_bad_input's real-process test shows a refusal as
    a user's process does."""
    result = cli_in_process("cluster", flag, value, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"harness: error: {flag} must be a positive integer, got {value!r}"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value, limit", [("--workers", "100000", 64), ("--workers", "65", 64),
                                                ("--server-workers", "17", 16), ("--workers", "9" * 40, 64)])
def test_harness_cluster_refuses_more_processes_than_one_machine_runs(tmp_path, flag, value, limit, cli_in_process):
    """Probe 8: --workers 100000 passed, and with a reachable server it would start 100,000 searches."""
    result = cli_in_process("cluster", flag, value, cwd=tmp_path)
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"harness: error: {flag} must be at most {limit}, got ") and "Traceback" not in line
    assert not any(tmp_path.iterdir())


def test_a_postgres_that_fails_to_start_leaves_no_temp_folder_behind(tmp_path):
    """As root the cluster lives in a temp folder made for the postgres user: a start that fails
    (here, its port taken) removes it, since no caller holds a stop() to call yet."""
    import socket

    require_postgres_programs()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        postgres = cluster.Postgres(tmp_path / "pg", port=taken.getsockname()[1])
        with pytest.raises(HarnessError, match="pg_ctl"):
            postgres.start()
    assert not postgres.root.exists() if postgres.as_root else postgres.root == tmp_path / "pg"
