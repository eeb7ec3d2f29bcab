"""`harness cluster` on a machine shared with other users: loopback is no boundary between them.

Its PostgreSQL and its tracking server ask for passwords that only the user who started them can
read, and no password, generated or given, reaches a command line (`ps` shows every process's to
every user) or output.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import cli_env
from harness import cluster
from harness.cli import main
from harness.errors import HarnessError, UsageError


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


def as_another_user(*command, input: str | None = None) -> subprocess.CompletedProcess:
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
                          input=input, capture_output=True, text=True, errors="replace", timeout=60)


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


def in_a_shell(setup: str, path: str) -> subprocess.CompletedProcess:
    """In a shell of our own user: ``setup`` (sourcing the credentials), then curl on ``path`` of
    the tracking server with the login it exported, handed over on no command line."""
    if shutil.which("curl") is None:
        pytest.skip("needs curl to make requests from a shell")
    login = '<(printf \'user = "%s:%s"\' "$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD")'
    script = f'{setup} && curl -s -f -K {login} "$MLFLOW_TRACKING_URI{path}"'
    return subprocess.run(["bash", "-c", script], env=cli_env(), capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_harness_cluster_keeps_a_given_password_off_command_lines_output_and_logs(postgres, tmp_path):
    """`--postgres URL` with a password: the workers, the audit and `mlflow server` get it through a
    passfile named in their environment; `ps` never shows it, nor does anything printed or logged.
    The same holds for the tracking server's generated login, which another shell of the same user
    gets as --keep-running says."""
    started, _ = postgres
    secret = secret_of(started.passfile)
    url = f"postgresql://{cluster.DB_USER}:{secret}@127.0.0.1:{started.port}/postgres"
    seen: set[str] = set()
    done = threading.Event()
    command = [sys.executable, "-m", "harness", "cluster", "--postgres", url, "--workers", 2, "--max-trials", 2,
               "--server-workers", 1, "--dir", tmp_path / "c", "--keep-running", "--", "--epochs-range", 20, 40]
    # Started as a script's background job is (SIGINT ignored): Ctrl-C, or `kill -INT`, still stops it.
    process = subprocess.Popen(list(map(str, command)), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    # What the user typed: `harness cluster`'s own command line, also the one its children show for
    # the moment between their fork and their exec.
    own = " ".join(map(str, command))

    def watch():
        while not done.is_set():
            seen.update(line for line in command_lines().values() if line.strip() != own)
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = ""
        for line in process.stdout:  # until the services are up, the workers done
            out += line
            if line.startswith("press Ctrl-C"):
                break
        sources = [line.split("#")[0].strip() for line in out.splitlines() if line.strip().startswith("source ")]
        shell = in_a_shell(sources[0] if sources else "false", "/api/2.0/mlflow/experiments/search?max_results=10")
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=120)
        out += rest
    finally:
        done.set()
        watcher.join()
        if process.poll() is None:  # a failure above: the services are still up
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
    assert process.returncode == 0, out + err
    assert shell.returncode == 0 and json.loads(shell.stdout)["experiments"], (out, shell)  # 401 fails curl -f
    assert "audit of study 'cluster-search': 2 trials, 2 child runs: clean" in out
    assert any("harness search" in line for line in seen), sorted(seen)[:50]  # the watch saw them
    assert any("mlflow server" in line for line in seen), sorted(seen)[:50]
    credentials = tmp_path / "c" / cluster.CREDENTIALS
    assert f"login {cluster.ADMIN}, its password in {credentials}" in out
    login = dict(line.removeprefix("export ").split("=", 1) for line in credentials.read_text().splitlines())
    for secret in (secret, login["MLFLOW_TRACKING_PASSWORD"]):
        assert not [line.replace(secret, "***") for line in seen if secret in line]
        assert secret not in out + err
        logs = list((tmp_path / "c").glob("*.log"))
        assert len(logs) == 3  # two workers' and the tracking server's
        for log in logs:
            assert secret not in log.read_text(errors="replace"), log
    for private in (cluster.PASSFILE, cluster.CREDENTIALS):
        assert stat.S_IMODE((tmp_path / "c" / private).stat().st_mode) == 0o600


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`harness cluster`'s tracking server (on SQLite: the login is the server's, whatever its store),
    two processes sharing its auth database, and one run with a param and an artifact logged with
    the login."""
    from mlflow import MlflowClient

    # Where any user can look, as `harness cluster`'s default --dir in a home folder of mode 0755
    # (pytest's own folders are private to their owner).
    root = Path(tempfile.mkdtemp(prefix="harness-tracking-"))
    root.chmod(0o755)
    server = cluster.TrackingServer(f"sqlite:///{root / 'mlflow.db'}", root / "server", workers=2)
    try:
        server.start()
        with cluster.environment(server.login):
            client = MlflowClient(server.url)
            run = client.create_run(client.create_experiment("private-experiment"))
            client.log_param(run.info.run_id, "private_param", "private-value")
            client.log_text(run.info.run_id, "private-notes", "notes.txt")
        yield server, run
    finally:
        server.stop()
        shutil.rmtree(root)


def http_as_another_user(server, path: str, method: str = "GET", body: str | None = None,
                         login: str | None = None) -> tuple[int, str]:
    """``curl`` as ``nobody``: the status and body; ``login`` (USER:PASSWORD) given on its stdin."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs curl to make requests as another user")
    data = ["-H", "Content-Type: application/json", "--data", body] if body is not None else []
    result = as_another_user(curl, "-s", "-K", "-", "-X", method, *data, "-w", "\n%{http_code}", server.url + path,
                             input=f'user = "{login}"\n' if login else "")
    text, _, status = result.stdout.rpartition("\n")
    assert status.isdigit(), result.stdout + result.stderr
    return int(status), text


@pytest.mark.slow
def test_another_local_user_reads_and_changes_nothing_on_the_tracking_server_without_its_login(tracking_server):
    server, run = tracking_server
    run_id = run.info.run_id
    artifact = run.info.artifact_uri.removeprefix("mlflow-artifacts:/") + "/notes.txt"
    reads = ["/api/2.0/mlflow/experiments/search?max_results=100", f"/api/2.0/mlflow/runs/get?run_id={run_id}",
             f"/ajax-api/2.0/mlflow/runs/get?run_id={run_id}", f"/api/2.0/mlflow-artifacts/artifacts/{artifact}"]
    writes = [("/api/2.0/mlflow/runs/delete", {"run_id": run_id}),
              ("/api/2.0/mlflow/runs/log-parameter", {"run_id": run_id, "key": "planted", "value": "1"}),
              ("/api/2.0/mlflow/users/create", {"username": "nobody", "password": "a-password-of-nobody"})]
    for login in (None, f"{cluster.ADMIN}:wrong-password", "nobody:a-password-of-nobody"):
        for path in reads:
            status, text = http_as_another_user(server, path, login=login)
            assert status == 401 and "private" not in text, (login, path, status, text)
        for path, body in writes:
            assert http_as_another_user(server, path, "POST", json.dumps(body), login)[0] == 401, (login, path)
    # Still as it was logged; and the refusals were the login's: with it, the same user gets in.
    from mlflow import MlflowClient

    with cluster.environment(server.login):
        kept = MlflowClient(server.url).get_run(run_id)
    assert kept.info.lifecycle_stage == "active" and kept.data.params == {"private_param": "private-value"}
    login = f"{cluster.ADMIN}:{server.password}"
    assert http_as_another_user(server, f"/api/2.0/mlflow-artifacts/artifacts/{artifact}", login=login) == (
        200, "private-notes")
    assert http_as_another_user(server, "/health") == (200, "OK")  # what start() waits for stays open
    # MLflow answers server-info without a login by design (a client reads it before logging in):
    # the store's kind and which features are on, nothing of any run.
    for path in ("/api/3.0/mlflow/server-info", "/ajax-api/3.0/mlflow/server-info"):
        status, text = http_as_another_user(server, path)
        assert status in (200, 404) and run_id not in text and "private" not in text and server.password not in text
        assert status == 404 or set(json.loads(text)) <= SERVER_INFO_KEYS, text


# What server-info may say (MLflow 3.17's build_server_info_payload): a new key is read before it is allowed.
SERVER_INFO_KEYS = {"store_type", "workspaces_enabled", "trace_archival_enabled", "multipart_uploads_enabled",
                    "multipart_downloads_enabled", "presigned_upload_run_id_supported",
                    "presigned_upload_model_id_supported", "features_enabled"}


@pytest.mark.slow
def test_the_tracking_server_s_login_and_files_are_readable_by_their_owner_only(tracking_server):
    server, run = tracking_server
    secret = server.password
    assert stat.S_IMODE(server.credentials.stat().st_mode) == 0o600
    assert server.credentials.stat().st_uid == os.geteuid()
    artifact = server.artifacts / run.info.artifact_uri.removeprefix("mlflow-artifacts:/") / "notes.txt"
    assert artifact.read_text() == "private-notes"
    for path in (server.credentials, server.root / "mlflow-auth.db", server.root / "mlflow-auth.ini", artifact):
        unread = as_another_user("cat", path)
        assert unread.returncode != 0 and not unread.stdout, path
    assert secret not in server.log.read_text(errors="replace")
    assert not [c for c in command_lines().values() if secret in c]
    shell = in_a_shell(f"source {server.credentials}", "/api/2.0/mlflow/experiments/search?max_results=10")
    assert shell.returncode == 0 and "private-experiment" in shell.stdout, shell.stdout + shell.stderr


@pytest.mark.parametrize("url, allowed", [
    ("mysql://u:hunter22@127.0.0.1/db", "not a PostgreSQL URL"),
    ("postgresql://u:hunter22@127.0.0.1:port/db", "the port must be a number from 1 to 65535, got 'port'"),
    ("postgresql://u:hunter22@127.0.0.1/db?colour=blue", 'invalid URI query parameter: "colour"'),
    ("postgresql://u:hunter22@[::1/db", "Invalid IPv6 URL; expected postgresql://USER@HOST[:PORT]/DATABASE"),
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


@pytest.mark.parametrize("made_by", ["another user", "anyone (mode 777)", "a link to a folder of another user"])
def test_a_dir_another_user_can_write_is_refused_before_anything_is_opened(made_by, tmp_path, capsys, monkeypatch):
    """Whoever can write --dir can put a link (to a file of theirs, or one of ours) or a FIFO where
    a log goes; harness cluster, as root too, would write through it or hang on it."""
    planted = tmp_path / "theirs"
    planted.mkdir()
    (planted / "worker-0.log").symlink_to(tmp_path / "target")
    os.mkfifo(planted / "mlflow-server.log")
    target = planted
    if made_by == "another user":
        os.chown(planted, 65534, 65534)  # nobody
    elif made_by == "anyone (mode 777)":
        planted.chmod(0o777)
    else:
        os.chown(planted, 65534, 65534)
        target = tmp_path / "link"
        target.symlink_to(planted)
    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "--dir", str(target), "--postgres", "postgresql://h@127.0.0.1:9/postgres"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no other user can write" in err, err
    assert not (tmp_path / "target").exists()


def test_a_link_or_fifo_where_a_log_goes_is_never_opened_through(tmp_path):
    (tmp_path / "log").symlink_to(tmp_path / "target")
    os.mkfifo(tmp_path / "fifo")
    for name in ("log", "fifo"):
        for flag in (os.O_TRUNC, os.O_APPEND):
            with pytest.raises(UsageError, match="not a regular file"):
                cluster.open_private(tmp_path / name, flag)
    assert not (tmp_path / "target").exists()
    with cluster.open_private(tmp_path / "fresh") as log:
        log.write(b"x")
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o600


@pytest.mark.slow
def test_no_piece_of_a_password_is_shown_whatever_libpq_or_the_port_check_reads_out_of_it(tmp_path, capsys):
    """libpq's parser stops inside a password at an '=', a space, a '#' or a '/' and prints what it read
    as a port, a query parameter or a host: no run of the password's characters may reach the line."""
    import socket
    import string

    with socket.socket() as closed:  # a port nothing listens on: a URL that parses is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    shapes = ["Hunter2{}Secret", "{}Hunter2{}Secret{}", "a/b?Hunter2{}Secret=d&e", "x/y?a=Hunter2{}Secret",
              "x#Hunter2{}/Secret", "Hunter2Secret/x{}"]
    for char in string.punctuation + " \u00e9":
        for shape in shapes:
            url = f"postgresql://evil:{shape.format(char, char, char)}@127.0.0.1:{port}/evildb"
            code = main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")])
            err = capsys.readouterr().err
            assert code in (1, 2) and len(err.strip().splitlines()) == 1, (url, err)
            assert "Hunter2" not in err and "Secret" not in err, (url, err)
    assert not (tmp_path / "c").exists()


def test_an_empty_postgres_url_is_refused_not_taken_for_libpqs_defaults(tmp_path, capsys):
    assert main(["cluster", "--postgres", "", "--dir", str(tmp_path / "c")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("harness: error: --postgres : not a PostgreSQL URL"), line
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_the_tracking_server_starts_no_job_runner_and_no_queue_in_shared_memory(tracking_server):
    """MLflow's job runner left a folder in /dev/shm after every stop (87 of them on a machine after a
    day of clusters); the harness's runs need no MLflow jobs."""
    server, _ = tracking_server
    group = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == server.process.pid:
                    group.append(Path(entry.path, "environ").read_bytes())
            except OSError:
                pass
    assert len(group) >= 2  # the server and its workers
    assert not [env for env in group if b"_MLFLOW_HUEY_STORAGE_PATH" in env or b"HUEY_STORAGE_PATH" in env]
    assert not [c for c in command_lines().values() if "huey" in c.lower()]


@pytest.mark.parametrize("extra, line", [
    (["--max-trials", "3"], "--max-trials after --: harness cluster sets its workers' --max-trials itself"),
    (["--max-tri", "3"], "--max-trials after --: harness cluster sets its workers' --max-trials itself"),
    (["--n-trials=5"], "--n-trials after --: harness cluster sets its workers' --n-trials itself"),
    (["--study-name", "other"], "--study-name after --: harness cluster sets its workers' --study-name itself"),
    (["--storage", "postgresql://u:hunter22@10.255.255.1/db"], "--storage after --: harness cluster sets"),
    (["--config", "/nonexistent"], "cannot read config file '/nonexistent'"),
    (["--epochs-range", "9", "5"], "epochs"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_the_workers_search_arguments_are_checked_before_anything_starts(tmp_path, capsys, extra, line):
    """Third probe: arguments after -- reached the workers unchecked, after the cluster's own: they
    overrode the cap and the storage (its password then on every worker's command line), and a bad one
    failed only once PostgreSQL and the tracking server were up."""
    code = main(["cluster", "--dir", str(tmp_path / "c"), "--workers", "1", "--max-trials", "1",
                 "--postgres", "postgresql://u@127.0.0.1:9/db", "--", *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and line in err, err
    assert "hunter22" not in err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("password", ["Qz#Wm1xK", "Qz?Wm1xK", "Qz#W?m&1=xK"])
def test_a_password_is_split_off_where_libpq_ends_it_not_where_urllib_does(password):
    """Probe 6, F1/F2: urllib ends a password at an unencoded '#' or '?', libpq (which connects) does not;
    the URL handed on is rebuilt from libpq's reading, so no piece of the password stays in it."""
    url = f"postgresql://harness:{password}@127.0.0.1:55432/postgres?sslmode=disable"
    plain, found = cluster.split_password(url)
    assert (plain, found) == ("postgresql://harness@127.0.0.1:55432/postgres?sslmode=disable", password)


@pytest.mark.parametrize("key", ["sslpassword", "oauth_client_secret"])
def test_a_secret_libpq_reads_only_from_the_url_is_refused_naming_the_key(key, tmp_path, capsys):
    """Probe 6, F3: such a secret would be on the workers' and the tracking server's command lines."""
    url = f"postgresql://harness:PW@127.0.0.1:55432/postgres?{key}=SSLSECRET9&sslmode=disable"
    assert main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f": {key} is a secret that would be on the command lines" in line and "SSLSECRET9" not in line, line
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("password", ["Line1Secret%0ALine2Secret", "Line1Secret%0DLine2Secret"])
def test_a_password_no_passfile_can_hold_is_refused_before_anything_is_made(password, tmp_path, capsys):
    """Probe 7: a line break splits the passfile's entry, so the workers would log in with another
    password than the check's: a traceback after --dir and its passfile were made."""
    url = f"postgresql://u1:{password}@127.0.0.1:55432/postgres"
    assert main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "holds a line break" in line and "Secret" not in line, line
    assert not (tmp_path / "c").exists()


def test_the_urls_own_passfile_gives_way_to_the_one_the_password_is_handed_on_in():
    """Probe 7: libpq takes a URL's passfile over PGPASSFILE, so the password handed on was never read."""
    plain, found = cluster.split_password("postgresql://u:PW@127.0.0.1:55432/db?passfile=/nonexistent&sslmode=disable")
    assert (plain, found) == ("postgresql://u@127.0.0.1:55432/db?sslmode=disable", "PW")
    plain, found = cluster.split_password("postgresql://u@127.0.0.1:55432/db?passfile=/mine")  # no password: theirs
    assert (plain, found) == ("postgresql://u@127.0.0.1:55432/db?passfile=%2Fmine", None)


@pytest.mark.parametrize("password", ["Ab/CdEf9", "x/Hunter2Secret", "Qz/a", "Hunter2Secret/Ab"])
def test_no_short_piece_of_a_password_is_quoted_as_a_port_or_host(password, tmp_path, capsys):
    """Probe 6, smaller 2: libpq reads 'Ab' of 'harness:Ab/CdEf9@h' as the port; a piece that short
    passed the scrubbing of runs of 4 characters."""
    url = f"postgresql://harness:{password}@127.0.0.1:5/db"
    code = main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")])
    [line] = capsys.readouterr().err.strip().splitlines()
    pieces = [p for p in password.split("/") if p]
    assert code == 2 and not [p for p in pieces if f"'{p}'" in line or f'"{p}"' in line], line
    assert not (tmp_path / "c").exists()


def databases(url: str, password: str) -> set[str]:
    import psycopg

    with psycopg.connect(url, password=password) as connection:
        return {name for (name,) in connection.execute("SELECT datname FROM pg_database")}


@pytest.mark.slow
def test_a_password_with_hash_and_question_mark_works_off_command_lines_and_a_failed_start_drops_its_databases(
        postgres, tmp_path, monkeypatch):
    """Probe 6, F1/F2: `Qz#Wm1xK` went on `mlflow server`'s command line split around the inserted
    database name, and the server could not log in; every run, failed or not, left two databases."""
    import psycopg

    started, _ = postgres
    admin = secret_of(started.passfile)
    password = "Qz#Wm1?xK"
    with psycopg.connect(started.url(), password=admin, autocommit=True) as connection:
        connection.execute("DROP ROLE IF EXISTS probe6")
        connection.execute(f"CREATE ROLE probe6 LOGIN CREATEDB PASSWORD '{password}'")
    url = f"postgresql://probe6:{password}@127.0.0.1:{started.port}/postgres"
    launched = []
    real_popen = subprocess.Popen

    def recording_popen(command, *args, **kwargs):
        launched.append(" ".join(map(str, command)))
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(cluster.subprocess, "Popen", recording_popen)
    monkeypatch.delenv("PGPASSFILE", raising=False)
    before = databases(started.url(), admin)
    cluster.check_server(url)
    with cluster.services(tmp_path / "c", url, 1) as (storage, _):
        psycopg.connect(storage).close()  # the passfile services() names lets the workers in
        made = databases(started.url(), admin) - before
        assert made == {storage.rsplit("/", 1)[1], cluster.mlflow_database(storage)}
    assert launched and not [c for c in launched for piece in ("Qz", "Wm1", "xK") if piece in c], launched
    assert made <= databases(started.url(), admin)  # the services ran: what they hold stays

    def failing_start(self):
        raise HarnessError("the tracking server did not start")

    monkeypatch.setattr(cluster.TrackingServer, "start", failing_start)
    kept = databases(started.url(), admin)
    with pytest.raises(HarnessError), cluster.services(tmp_path / "d", url, 1):
        pass
    assert databases(started.url(), admin) == kept


@pytest.mark.slow
@pytest.mark.parametrize("option, said", [
    ("connect_timeout=abc", "bad value for connect_timeout: 'abc'; allowed: a number of seconds"),
    ("replication=bogus", 'invalid value for parameter "replication": "bogus" HINT: Valid values are: "false", 0,'),
])
def test_an_option_refused_by_a_server_that_answers_is_bad_input_too(postgres, option, said, tmp_path, capsys):
    """Issue 26, an eleventh probe (F3): with a server that answers, `connect_timeout=abc` passed the
    check (which connected with a timeout of its own) and exit 1 "bad value for connect_timeout" came
    after it; a value only the server reads (replication) was "cannot connect", exit 1."""
    started, _ = postgres
    password = secret_of(started.passfile)
    url = started.url().replace("@", f":{password}@") + f"?{option}"
    assert main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("harness: error: --postgres postgresql://") and said in line, line
    assert password not in line and not (tmp_path / "c").exists()
