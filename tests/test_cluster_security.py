"""`harness cluster` on a machine shared with other users: loopback is no boundary between them.

Its PostgreSQL asks for a password that only the user who started it can read, and no password,
generated or given, reaches a command line (`ps` shows every process's to every user) or output.
"""
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import cli_env
from harness import cluster
from harness.cli import main
from harness.errors import UsageError


def require_postgres_programs():
    try:
        cluster.postgres_bin()
    except UsageError as exc:
        pytest.skip(str(exc))


def secret_of(passfile: Path) -> str:
    return passfile.read_text().rstrip("\n").rsplit(":", 1)[1]


def command_lines() -> dict[int, str]:
    """Every process's command line, as any user of the machine reads them (/proc/PID/cmdline)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A cluster as `harness cluster` starts one, and every command line its start ran."""
    require_postgres_programs()
    commands = []
    real_run = subprocess.run

    def recording_run(command, *args, **kwargs):
        commands.append(" ".join(map(str, command)))
        return real_run(command, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.subprocess, "run", recording_run)
        started = cluster.Postgres(tmp_path_factory.mktemp("security") / "postgres").start()
    try:
        yield started, commands
    finally:
        started.stop()


def as_another_user(*command) -> subprocess.CompletedProcess:
    """``command`` run as ``nobody``, with none of our libpq settings (it could not read them anyway)."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("acting as another local user needs root and runuser")
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to act as")
    env = {k: v for k, v in cli_env().items() if not k.startswith("PG")}
    return subprocess.run(["runuser", "-u", "nobody", "--", *map(str, command)], env=env, cwd="/",
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_another_local_user_cannot_connect_to_the_cluster_or_read_its_password(postgres):
    started, _ = postgres
    psql = shutil.which("psql") or started.bin / "psql"
    # The superuser's way to a shell as PostgreSQL's OS account, tried without the password.
    refused = as_another_user(psql, "-w", "-h", "127.0.0.1", "-p", started.port, "-U", cluster.DB_USER,
                              "-d", "postgres", "-c", "COPY (SELECT 1) TO PROGRAM 'id'")
    assert refused.returncode != 0 and "password" in refused.stderr, refused.stdout + refused.stderr
    unread = as_another_user("cat", started.passfile)
    assert unread.returncode != 0 and secret_of(started.passfile) not in unread.stdout
    assert stat.S_IMODE(started.passfile.stat().st_mode) == 0o600
    assert started.passfile.stat().st_uid == os.geteuid()
    # Whoever holds the passfile gets in: the refusal above is the password's, not a server that is down.
    import psycopg

    with cluster.libpq_passfile(started.passfile), psycopg.connect(started.url()) as connection:
        assert connection.execute("SELECT current_user").fetchone() == (cluster.DB_USER,)


@pytest.mark.slow
def test_the_generated_password_is_on_no_command_line(postgres):
    started, commands = postgres
    secret = secret_of(started.passfile)
    assert any("initdb" in c for c in commands) and any("pg_ctl" in c for c in commands)
    assert not [c for c in commands if secret in c]
    assert not [c for c in command_lines().values() if secret in c]
    assert not list(started.root.glob("initdb-password*"))  # initdb's copy is gone once it has read it


@pytest.mark.slow
def test_harness_cluster_keeps_a_given_password_off_command_lines_output_and_logs(postgres, tmp_path):
    """`--postgres URL` with a password: the workers, the audit and `mlflow server` get it through a
    passfile named in their environment; `ps` never shows it, nor does anything printed or logged."""
    started, _ = postgres
    secret = secret_of(started.passfile)
    url = f"postgresql://{cluster.DB_USER}:{secret}@127.0.0.1:{started.port}/postgres"
    seen: set[str] = set()
    done = threading.Event()
    command = [sys.executable, "-m", "harness", "cluster", "--postgres", url, "--workers", 2, "--max-trials", 2,
               "--server-workers", 1, "--dir", tmp_path / "c", "--", "--epochs-range", 20, 40]
    process = subprocess.Popen(list(map(str, command)), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    def watch():
        while not done.is_set():
            seen.update(line for pid, line in command_lines().items() if pid != process.pid)
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out, err = process.communicate(timeout=600)
    finally:
        done.set()
        watcher.join()
    assert process.returncode == 0, out + err
    assert "audit of study 'cluster-search': 2 trials, 2 child runs: clean" in out
    assert any("harness search" in line for line in seen), sorted(seen)[:50]  # the watch saw them
    assert any("mlflow server" in line for line in seen), sorted(seen)[:50]
    assert not [line.replace(secret, "***") for line in seen if secret in line]
    assert secret not in out + err
    logs = list((tmp_path / "c").glob("*.log"))
    assert len(logs) == 3  # two workers' and the tracking server's
    for log in logs:
        assert secret not in log.read_text(errors="replace"), log
    assert stat.S_IMODE((tmp_path / "c" / cluster.PASSFILE).stat().st_mode) == 0o600


@pytest.mark.parametrize("url, allowed", [
    ("mysql://u:hunter22@127.0.0.1/db", "not a PostgreSQL URL"),
    ("postgresql://u:hunter22@127.0.0.1:port/db", "the port must be a number from 1 to 65535, got 'port'"),
    ("postgresql://u:hunter22@127.0.0.1/db?colour=blue", 'invalid URI query parameter: "colour"'),
])
def test_a_malformed_postgres_url_is_refused_in_one_line_before_anything_is_made(tmp_path, capsys, url, allowed):
    assert main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and allowed in err, err
    assert "hunter22" not in err
    assert not (tmp_path / "c").exists()


def test_an_unreachable_postgres_is_one_line_without_its_password_and_nothing_made(tmp_path, capsys):
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgresql://u:hunter22@127.0.0.1:{port}/db"
    assert main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    [line] = err.strip().splitlines()
    assert line.startswith(f"harness: --postgres postgresql://u@127.0.0.1:{port}/db: cannot connect: "), line
    assert "Connection refused" in err and "hunter22" not in err
    assert not (tmp_path / "c").exists()


def test_a_password_leaves_the_url_for_the_passfile():
    assert cluster.split_password("postgresql://u:p%40ss@h:5/db?sslmode=require") == (
        "postgresql://u@h:5/db?sslmode=require", "p@ss")
    assert cluster.split_password("postgresql://u@h/db?password=x&sslmode=require") == (
        "postgresql://u@h/db?sslmode=require", "x")
    assert cluster.split_password("postgresql://u@h/db") == ("postgresql://u@h/db", None)
    assert cluster.passfile_line("*", "*", "a:b", "c\\d:e") == "*:*:*:a\\:b:c\\\\d\\:e\n"
