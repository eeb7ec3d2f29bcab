"""`harness cluster` against another local user who races it: for the services' ports (a process of
theirs listening where the harness's server should, answering in its place and reading the login sent
to it) and for `--dir` (a folder of theirs swapped in for it through a folder above it).

The fourth outside probe's findings F1 and F3 (issue 26); each test acts as user ``nobody``.
"""
import os
import shutil
import signal
import socket
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import cli_env
from harness import cluster
from harness.cli import main
from harness.errors import HarnessError, UsageError
from test_cluster_security import as_another_user as runs_as_another_user, require_postgres_programs

NOBODY = 65534


def as_another_user(*command) -> subprocess.Popen:
    """``command`` started as ``nobody``, its stdout a pipe; stopped with ``stop``."""
    # Skips where no other user can be acted as.
    assert runs_as_another_user("true").returncode == 0
    env = {k: v for k, v in cli_env().items() if not k.startswith("PG")}
    return subprocess.Popen(["runuser", "-u", "nobody", "--", *map(str, command)], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop(process: subprocess.Popen) -> str:
    """What ``process`` printed, once it and its children are stopped."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    return process.communicate(timeout=30)[0]


def a_python_for_nobody() -> str:
    """The system's Python (the test's own may sit in a folder ``nobody`` cannot enter)."""
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.skip("needs a system python3 to run a process as another user")
    return python


# The probe's squatter, on one port (any other may be another test's): listens on it at once
# ("now"), or ("watch") once a `... mlflow ... server --port PORT` shows in /proc, answers 200 to
# everything and prints what each request carried.
SQUATTER = textwrap.dedent("""
    import os, socket, sys, threading, time
    def serve(sock):
        while True:
            connection, _ = sock.accept()
            head = b""
            while b"\\r\\n\\r\\n" not in head:
                data = connection.recv(65536)
                if not data:
                    break
                head += data
            print("REQUEST", head.decode(errors="replace").replace("\\r\\n", " | "), flush=True)
            connection.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nOK")
            connection.close()
    def squat(port):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(50)
        except OSError as exc:
            print("REFUSED", port, exc, flush=True)
            return
        print("LISTENING", port, flush=True)
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
    port, when = int(sys.argv[1]), sys.argv[2]
    if when == "now":
        squat(port)
    wanted, seen = str(port).encode(), set()
    while True:
        for pid in os.listdir("/proc"):
            if pid.isdigit() and pid not in seen:
                try:
                    words = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
                except OSError:
                    continue
                if b"mlflow" in words and b"server" in words and b"--port" in words:
                    if words[words.index(b"--port") + 1] == wanted:
                        seen.add(pid)
                        print("SAW", port, flush=True)
                        if when == "watch":
                            squat(port)
        time.sleep(0.005)
""")


def squatter(port: int, when: str) -> subprocess.Popen:
    process = as_another_user(a_python_for_nobody(), "-c", SQUATTER, port, when)
    if when == "now":  # listening before the test goes on
        line = process.stdout.readline()
        assert line.startswith("LISTENING"), line + stop(process)
    return process


def a_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_squatter_watching_for_the_tracking_server_never_gets_its_login(tmp_path):
    """The probe: `mlflow server --port N` shows in `ps` seconds before it binds; a process of another
    user bound N first, answered /health, and every request of the workers brought it the login."""
    from mlflow import MlflowClient

    port = a_port()
    watcher = squatter(port, "watch")
    server = cluster.TrackingServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "server", port, workers=1)
    try:
        server.start()
        with cluster.environment(server.login):
            experiments = MlflowClient(server.url).search_experiments()
    finally:
        server.stop()
        seen = stop(watcher)
    assert f"SAW {port}" in seen and f"REFUSED {port}" in seen, seen  # it saw the server's command line
    assert f"LISTENING {port}" not in seen and "REQUEST" not in seen, seen
    assert [e.name for e in experiments] == ["Default"]  # the answer was the server's


@pytest.mark.slow  # a squatter process run as another user
def test_a_port_another_user_listens_on_is_refused_before_anything_is_sent(tmp_path):
    port = a_port()
    theirs = squatter(port, "now")
    try:
        with pytest.raises(HarnessError) as refused:
            cluster.check_listener(port, os.getpid(), "mlflow server")
        # A server of ours asking for the port it was told: refused at once, nothing sent.
        with pytest.raises(HarnessError, match=f"cannot listen on 127.0.0.1:{port}"):
            cluster.TrackingServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "server", port=port)
    finally:
        seen = stop(theirs)
    assert str(refused.value) == (
        f"mlflow server: 127.0.0.1:{port} is listened on by a process of uid {NOBODY}, not the mlflow server "
        "started here (another user's process took the port?); stopped before sending it anything")
    assert "REQUEST" not in seen, seen


def test_a_port_is_ours_only_while_the_process_started_here_listens_on_it():
    listener = cluster.listening_socket()
    port = listener.getsockname()[1]
    child = subprocess.Popen(["sleep", "60"], stdin=listener, start_new_session=True)
    try:
        cluster.check_listener(port, child.pid, "server")  # the child holds it: no error
        with pytest.raises(HarnessError, match=f"127.0.0.1:{port} is listened on by a process of uid"):
            cluster.check_listener(port, os.getpid() + 10_000_000, "server")  # not the process started
    finally:
        child.kill()
        child.wait()
    with pytest.raises(HarnessError, match="stopped before sending it anything"):
        cluster.check_listener(port, child.pid, "server")  # the process started is gone
    listener.close()
    with pytest.raises(HarnessError, match=f"127.0.0.1:{port} is listened on by no process"):
        cluster.check_listener(port, os.getpid(), "server")


@pytest.mark.slow
def test_postgres_refuses_a_port_another_user_took_and_never_talks_to_it(tmp_path):
    require_postgres_programs()
    port = a_port()
    theirs = squatter(port, "now")
    try:
        postgres = cluster.Postgres(tmp_path / "pg", port=port)
        with pytest.raises(HarnessError) as refused:
            postgres.start()
    finally:
        seen = stop(theirs)
    assert str(refused.value) == (f"pg_ctl start failed: 127.0.0.1:{port} is listened on by a process of uid "
                                  f"{NOBODY}, not the PostgreSQL started here")
    assert "REQUEST" not in seen, seen


@pytest.fixture
def reachable():
    """A folder of ours that ``nobody`` can enter (pytest's own are their owner's only)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="harness-takeover-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def nobodys(folder: Path) -> Path:
    assert runs_as_another_user("true").returncode == 0  # skips where there is no other user to give it to
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    return folder


@pytest.mark.parametrize("above", ["writable by all, not sticky", "another user's", "two levels up"])
def test_a_dir_another_user_could_swap_through_a_folder_above_it_is_refused(above, reachable, capsys):
    """The probe: in a folder of mode 777, another user renamed `--dir` away once made and put their own
    in its place, an `artifacts` link in it: harness cluster, as root, wrote everything there."""
    if above == "another user's":
        parent = nobodys(reachable / "pub")
    else:
        parent = reachable / "pub"
        parent.mkdir()
        parent.chmod(0o777)
    if above == "two levels up":
        parent = parent / "mine"
        parent.mkdir(mode=0o700)
    # They can, indeed, put a folder of theirs in --dir's place.
    planted = as_another_user("mkdir", parent.parent / "planted" if above == "two levels up" else parent / "cl")
    assert planted.wait(timeout=60) == 0, stop(planted)
    shutil.rmtree(parent / "cl", ignore_errors=True)
    code = main(["cluster", "--dir", str(parent / "cl"), "--postgres", "postgresql://h@127.0.0.1:9/postgres"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "can be written by another user" in err and "every folder above --dir must be writable by you" in err
    assert not (parent / "cl").exists()


def test_a_sticky_folder_above_dir_is_no_way_in_but_a_dir_squatted_there_is_refused(reachable):
    shared = reachable / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    cluster.check_dir(shared / "cl")  # like /tmp: only an entry's owner may rename it
    squatted = as_another_user("mkdir", "-m", "700", shared / "cl")
    assert squatted.wait(timeout=60) == 0, stop(squatted)
    with pytest.raises(UsageError, match=f"owner uid {NOBODY} and mode 700: it must be a folder of yours"):
        cluster.check_dir(shared / "cl")


def test_an_existing_dir_others_may_read_is_refused(tmp_path):
    (tmp_path / "cl").mkdir(mode=0o755)
    with pytest.raises(UsageError, match="no other user can write or read"):
        cluster.check_dir(tmp_path / "cl")
    (tmp_path / "cl").chmod(0o700)
    cluster.check_dir(tmp_path / "cl")


def test_a_link_inside_dir_is_never_followed_nor_its_target_chmodded(tmp_path):
    """The probe's `artifacts` link, to a folder elsewhere: the server would write the artifacts there
    and the harness chmodded it to 0700 (as root, another user's folder)."""
    elsewhere = nobodys(tmp_path / "elsewhere")
    elsewhere.chmod(0o755)
    root = tmp_path / "cl"
    root.mkdir(mode=0o700)
    (root / "artifacts").symlink_to(elsewhere)
    server = cluster.TrackingServer(f"sqlite:///{tmp_path / 'mlflow.db'}", root, workers=1)
    try:
        with pytest.raises(UsageError, match="artifacts is not a folder of yours"):
            server.start()
        assert server.process is None  # nothing started
    finally:
        server.stop()
    found = elsewhere.stat()
    assert (stat.S_IMODE(found.st_mode), found.st_uid) == (0o755, NOBODY)
    assert not any(elsewhere.iterdir())


def test_connections_the_server_accepts_on_the_socket_handed_to_it_send_at_once():
    """uvicorn takes a socket it inherits for a Unix one (socket.fromfd(fd, AF_UNIX, ...)), so asyncio
    never sets TCP_NODELAY on what it accepts: every MLflow request waited on Nagle, twice as slow."""
    listener = cluster.listening_socket()
    as_uvicorn_sees_it = socket.fromfd(listener.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    with listener, as_uvicorn_sees_it, socket.create_connection(listener.getsockname()):
        accepted, _ = as_uvicorn_sees_it.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
