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
