"""What an eleventh outside probe broke (issue 26) in the workers' leases, each as its class: a study
shared by users of another uid, a lease folder another user can take first, and what can sit where a
lease is looked for."""
import os
import socket
import subprocess
import sys
import threading

import pytest

from harness.errors import HarnessError
from harness.search.durable import workers


def record_of(pid: int) -> dict:
    return {"host": socket.gethostname(), "pid": pid, "started": workers._start_time(pid)}


@pytest.fixture
def stranger():
    """A live process that is no harness worker: it never takes a lease."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_the_lease_folder_is_in_the_user_s_cache_where_no_other_user_can_make_it_first():
    """A folder named in /tmp could be made first by anyone, who then blocked every search and train
    of its user (/tmp is sticky: the user cannot remove it). The leases live under the user's cache
    folder, one folder per host."""
    assert workers.LEASES.parent == workers.Path(os.environ["XDG_CACHE_HOME"]) / "harness" / "leases"
    assert workers.LEASES.name == socket.gethostname()


def test_a_fifo_where_a_lease_is_looked_for_never_blocks_the_check(stranger, monkeypatch, tmp_path):
    """The folder's own user can put anything there: a FIFO named as a live process's lease made the
    audit hang for good (the check opened it and waited for a writer)."""
    folder = tmp_path / "leases"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(workers, "LEASES", folder)
    record = record_of(stranger)
    os.mkfifo(folder / workers._lease_name(record["pid"], record["started"]))
    answer = []
    checker = threading.Thread(target=lambda: answer.append(workers.alive(record)), daemon=True)
    checker.start()
    checker.join(10)
    assert answer == [False]


def test_what_is_not_a_plain_file_in_the_lease_folder_is_left_or_refused_in_one_line(monkeypatch, tmp_path):
    """A folder named as a dead process's lease is left where it is (it stopped every search with
    IsADirectoryError); one named as this process's own lease is one line saying what is allowed."""
    folder = tmp_path / "leases"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(workers, "LEASES", folder)
    monkeypatch.setattr(workers, "_leases", {})
    (folder / "99999999-1").mkdir()
    workers.identity()
    assert (folder / "99999999-1").is_dir()
    monkeypatch.setattr(workers, "_leases", {})
    own = folder / workers._lease_name(os.getpid(), workers._start_time(os.getpid()))
    own.unlink()
    own.mkdir()
    with pytest.raises(HarnessError, match="it must be a plain file or nothing|not a plain file"):
        workers.identity()


@pytest.mark.parametrize("command, store", [
    (["compare", "--study", "z"], "mlflow.db"),
    (["predict", "0" * 32, "--x", "1"], "mlflow.db"),
    (["audit", "--study", "z", "--storage", "sqlite:///o.db"], "o.db"),
])
def test_reading_commands_do_not_build_a_store_in_an_empty_file(tmp_path, cli_in_process, command, store):
    """`touch mlflow.db` then a reading command: MLflow (or Optuna) wrote its whole schema into the
    empty file (954 KB) to read nothing. Reading never writes: one line, exit 2, the file still empty."""
    (tmp_path / store).touch()
    out = cli_in_process(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no " in out.stderr, out.stderr
    assert (tmp_path / store).stat().st_size == 0


def test_a_user_with_no_home_folder_gets_one_line_not_a_failed_import(monkeypatch):
    """Path.home() raises for a container's user with no home and no $HOME: the lease folder is then
    unknown, and taking a lease says so in one line (importing the harness failed with a traceback)."""
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(workers.Path, "home", staticmethod(no_home))
    assert workers._lease_root() is None
    monkeypatch.setattr(workers, "LEASES", None)
    monkeypatch.setattr(workers, "_leases", {})
    with pytest.raises(HarnessError, match="set XDG_CACHE_HOME"):
        workers.identity()
    assert workers.alive(record_of(os.getpid())) is False
