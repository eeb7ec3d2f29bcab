"""`harness cluster` against another local user who races it: for the services' ports (a process of
theirs listening where the harness's server should, answering in its place and reading the login sent
to it) and for `--dir` (a folder of theirs swapped in for it through a folder above it).

The fourth outside probe's findings F1 and F3 (issue 26); each test acts as user ``nobody``.
"""
import os
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import cli_env
from harness import cluster
from harness.errors import HarnessError
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
