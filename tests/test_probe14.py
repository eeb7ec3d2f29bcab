"""What a fourteenth outside probe broke (issue 26), each as its class: a forged worker record naming
another user's process, names in the lease folder that are no leases, and environment variables
naming paths that cannot be stored."""
import os
import socket

import pytest

from harness.search.durable import workers

# Names no lease has (_lease_name writes "PID-START" in ASCII digits, or "PID-None"): str.isdigit()
# took '²' (which int() refuses) and '٣' (which int() reads as 3).
NOT_LEASES = ["²-5", "٣-5", "5-²", "9" * 200 + "-1", "-1-5", "007-1", " 5-1", "5-1 ", "5-", "-", "abc",
              "5-1-1", "5_0-1"]
KINDS = ["file", "folder", "symlink", "fifo"]


def _make(path, kind):
    {"file": lambda: path.touch(), "folder": path.mkdir, "symlink": lambda: path.symlink_to("/nonexistent"),
     "fifo": lambda: os.mkfifo(path)}[kind]()


@pytest.fixture
def lease_folder(monkeypatch, tmp_path):
    """A lease folder of its own, and this process not holding its lease yet (identity() takes it)."""
    folder = tmp_path / "leases"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(workers, "LEASES", folder)
    monkeypatch.setattr(workers, "_leases", {})
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_a_name_in_the_lease_folder_that_is_no_lease_is_left_and_a_dead_lease_is_cleared(lease_folder, kind):
    for name in NOT_LEASES:
        _make(lease_folder / name, kind)
    _make(lease_folder / "99999999-1", "file" if kind == "folder" else kind)  # a dead process's lease
    record = workers.identity()
    assert sorted(p.name for p in lease_folder.iterdir()) == sorted(
        [*NOT_LEASES, workers._lease_name(os.getpid(), record["started"])])
    assert workers.alive(record) is True


@pytest.mark.slow  # a whole search in-process
def test_a_stray_name_in_the_lease_folder_leaves_search_working(lease_folder, workdir, cli_in_process):
    """The probe: a file `²-5` there ended every command in a ValueError traceback."""
    (lease_folder / "²-5").touch()
    out = cli_in_process("search", "--n-trials", 1, "--epochs-range", 2, 3, "--pruner", "none", "--no-progress",
                         cwd=workdir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert (lease_folder / "²-5").exists()


@pytest.mark.parametrize("number", ["²", "٣", "9" * 5000, "-1", " 1"])
def test_a_run_s_trial_number_that_is_no_number_is_a_run_of_no_trial_in_audit(searched_once, tmp_path,
                                                                               cli_in_process, number):
    """The same rule for a record's field: a trial number tag `²` ended audit in a traceback."""
    from conftest import AUDITED, all_runs, client_for, copy_store
    from harness.schema import TRIAL_NUMBER_TAG

    folder = copy_store(searched_once, tmp_path / "copy")
    run = next(r for r in all_runs(folder) if r.data.tags.get(TRIAL_NUMBER_TAG) == "1")
    client_for(folder).set_tag(run.info.run_id, TRIAL_NUMBER_TAG, number)
    out = cli_in_process("audit", "--study", AUDITED, "--storage", f"journal:{folder / 'j.log'}", cwd=folder)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "trial 1" in out.stdout, out.stdout


@pytest.mark.parametrize("port", ["²", "٣", "9" * 5000, "+5432"])
def test_a_postgres_port_of_no_ascii_digits_is_one_line(port):
    from harness import cluster
    from harness.errors import UsageError

    with pytest.raises(UsageError, match="the port must be a number from 1 to 65535"):
        cluster.check_server(f"postgresql://u@localhost/db?port={port}")


@pytest.mark.parametrize("value, expected", [("1", True), ("0x1", True), ("٣", False), ("²", False), ("yes", True)])
def test_sqlite_uri_booleans_take_ascii_digits_as_sqlite_does(value, expected):
    from harness.urls import uri_boolean

    assert uri_boolean(value) is expected


ENVIRONMENT = ["XDG_CACHE_HOME", "HOME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
               "MLFLOW_RUN_ID", "PGPASSFILE"]


@pytest.mark.parametrize("command", ["search", "train"])
@pytest.mark.parametrize("name", ENVIRONMENT)
def test_an_environment_variable_that_is_not_utf8_is_one_line_before_anything_is_made(tmp_path, cli_in_process,
                                                                                      monkeypatch, name, command):
    """The probe: XDG_CACHE_HOME=$'/tmp/y/\\xffcache' made the MLflow store, its lock and the cache's lease
    folders, then blamed the store ("cannot reach the MLflow tracking store ... 'utf-8' codec can't
    encode"). Every variable the harness reads as a path or a stored name is UTF-8 text or refused."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    value = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/\udcffstore.db", "MLFLOW_EXPERIMENT_ID": "1\udcff",
             "MLFLOW_RUN_ID": "ab\udcff"}.get(name, f"{tmp_path}/\udcffplace")
    if name == "HOME":
        monkeypatch.delenv("XDG_CACHE_HOME")
    args = ["--epochs", 2] if command == "train" else ["--n-trials", 1, "--epochs-range", 2, 3, "--no-progress"]
    out = cli_in_process(command, *args, cwd=fresh, env={name: value})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"environment variable {name}=" in out.stderr and "not UTF-8" in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"] and list(fresh.iterdir()) == []


def test_a_relative_xdg_cache_home_leaves_home_checked_and_a_good_one_does_not(tmp_path, cli_in_process, monkeypatch):
    """$HOME is read only where it names the cache folder (~/.cache)."""
    monkeypatch.setenv("HOME", f"{tmp_path}/\udcffhome")
    out = cli_in_process("compare", cwd=tmp_path, env={"XDG_CACHE_HOME": "relative"})
    assert out.returncode == 2 and "environment variable HOME=" in out.stderr, out.stderr
    out = cli_in_process("compare", "--top", 0, cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert "environment variable" not in out.stderr, out.stderr


def _as_another_user(check):
    """``check()`` run as another user: as root, in a child switched to nobody (65534), where the
    kernel itself says whose processes are whose; else this user's processes are taken for another's."""
    import pickle

    if os.getuid() != 0:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(workers, "_owner", lambda pid: os.getuid() + 1)
            return check()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # never back into pytest: os._exit whatever happens
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            answer = pickle.dumps(check())
        except BaseException as exc:  # noqa: BLE001 - said to the parent, which fails the test
            answer = pickle.dumps(repr(exc))
        os.write(write, answer)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    return pickle.loads(data)


HOLD = ("import json, time\nfrom harness.search.durable.workers import identity\n"
        "print(json.dumps(identity()), flush=True)\ntime.sleep(600)")
SLEEP = "import json, os, time\nprint(json.dumps({'pid': os.getpid()}), flush=True)\ntime.sleep(600)"


@pytest.fixture
def process(tmp_path):
    """A live process of this user running ``code``, as the `harness` console script (``script``) or
    as ``python -c``; yields its worker record (a record of its pid where it takes no lease)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    procs = []

    def start(code, script):
        if script:
            path = tmp_path / f"bin{len(procs)}" / "harness"
            path.parent.mkdir()
            path.write_text(f"#!{sys.executable}\n{code}\n")
            path.chmod(0o755)
            argv = [str(path)]
        else:
            argv = [sys.executable, "-c", code]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        record = json.loads(proc.stdout.readline())
        pid = record["pid"]
        return {"host": socket.gethostname(), "pid": pid, "started": workers._start_time(pid), **record}

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_another_user_s_process_names_a_live_worker_only_when_it_is_provably_a_harness_process(process):
    """The probe: as another user, a record of pid 1 (or sshd, cron, a shell) with its real start time
    was a live worker for good, its trial RUNNING forever, on pid and start time alone. A worker of
    another user sharing the study (the `harness` command, holding its lease) is still alive."""
    init = {"host": socket.gethostname(), "pid": 1, "started": workers._start_time(1), "leases": "/nonexistent"}
    harness_worker = process(HOLD, script=True)
    records = {"init": init, "a harness worker": harness_worker,
               "a harness command holding no lease": process(SLEEP, script=True),
               "a lease holder that is no harness command": process(HOLD, script=False),
               "a stranger": process(SLEEP, script=False),
               "a harness worker, started at another time": {**harness_worker, "started": "1"}}

    def check():
        return {name: (workers.alive(record), workers.owner_gone(record, None)) for name, record in records.items()}

    assert _as_another_user(check) == {name: (True, False) if name == "a harness worker" else (False, True)
                                       for name in records}


@pytest.mark.parametrize("argv, expected", [
    ([b"/usr/bin/python3", b"-m", b"harness", b"search"], True),
    ([b"python3.11", b"-u", b"-mharness", b"train"], True),
    ([b"/venv/bin/python", b"-m", b"harness.cli"], True),
    ([b"/venv/bin/python", b"/venv/bin/harness", b"search"], True),
    ([b"/sbin/init"], False), ([b"sshd: alice [priv]"], False), ([b"flock", b"harness", b"sleep", b"9"], False),
    ([b"bash", b"harness"], False), ([b"python3", b"-c", b"import harness"], False),
    ([b"python3", b"train.py", b"-m"], False), ([b"python3", b"-m", b"harnessx"], False), ([b""], False)])
def test_a_harness_command_line_is_the_console_script_or_python_dash_m_harness(argv, expected):
    assert workers.harness_command(argv) is expected


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("form", ["init", "a stranger", "a harness worker"])
def test_audit_fix_closes_a_trial_another_user_s_non_worker_keeps_and_leaves_a_live_worker_s(
        searched_once, tmp_path, cli_in_process, monkeypatch, process, form):
    """What a forged record did to the study: audit said clean, --fix never retried the trial."""
    import optuna
    from optuna.trial import TrialState

    from conftest import AUDITED, copy_store
    from harness.schema import WORKER_ATTR
    from harness.search.study import open_storage

    folder = copy_store(searched_once, tmp_path / "copy")
    record = {"init": {**workers.identity(), "pid": 1, "started": workers._start_time(1)},
              "a stranger": process(SLEEP, script=False), "a harness worker": process(HOLD, script=True)}[form]
    storage = open_storage(f"journal:{folder / 'j.log'}")
    study = optuna.load_study(study_name=AUDITED, storage=storage)
    number = len(study.trials)
    storage.create_new_trial(study._study_id, optuna.trial.create_trial(state=TrialState.RUNNING,
                                                                        user_attrs={WORKER_ATTR: record}))
    monkeypatch.setattr(workers, "_owner", lambda pid: os.getuid() + 1)  # every process another user's
    audit = ["audit", "--study", AUDITED, "--storage", f"journal:{folder / 'j.log'}"]
    out = cli_in_process(*audit, cwd=folder)
    assert (out.returncode == 0) is (form == "a harness worker"), out.stdout
    cli_in_process(*audit, "--fix", cwd=folder)
    state = optuna.load_study(study_name=AUDITED, storage=open_storage(f"journal:{folder / 'j.log'}")).trials[number].state
    assert state == (TrialState.RUNNING if form == "a harness worker" else TrialState.FAIL)
