"""A scale-out setup on one machine: PostgreSQL from the system's packages and an MLflow tracking
server (PostgreSQL backend store, served artifacts), both on 127.0.0.1 only.

The same two services that many machines share; here they let a user try the setup, and the tests
and the scaling benchmark run against the real engines rather than stand-ins.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .errors import HarnessError, UsageError

DB_USER = "harness"
# `mlflow server --workers`: on 2 cores, 1, 2 and 4 carry the same load (benchmarks/capacity.py);
# a machine of the server's own takes more.
SERVER_WORKERS = 2


def postgres_bin() -> Path:
    """The folder holding initdb and pg_ctl: on PATH, or where Debian's packages put them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return versions[-1].parent
    raise UsageError("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
                     "on Debian or Ubuntu: apt-get install postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, what: str, seconds: float, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise HarnessError(f"{what} did not become ready in {seconds:.0f}s; its log ({log}) ends:\n{tail}")


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1, trusting local connections, for user ``harness``.

    PostgreSQL refuses to run as root: as root, the cluster runs as the ``postgres`` user that
    Debian's package creates, in a folder under the system's temp dir that this user can reach.
    """

    def __init__(self, root: Path, port: int | None = None):
        self.bin = postgres_bin()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            import pwd

            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise UsageError("PostgreSQL refuses to run as root and there is no 'postgres' user to run it "
                                 "as; run as another user, or install Debian's postgresql package") from None
            root = Path(tempfile.mkdtemp(prefix="harness-postgres-"))
            os.chown(root, owner.pw_uid, owner.pw_gid)
        self.root = Path(root)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = port or free_port()

    def _run(self, *command: str) -> None:
        full = [str(self.bin / command[0]), *command[1:]]
        if self.as_root:
            full = ["runuser", "-u", "postgres", "--", *full]
        result = subprocess.run(full, capture_output=True, text=True)
        if result.returncode:
            raise HarnessError(f"{' '.join(full)} failed: {(result.stderr or result.stdout).strip()}")

    def start(self) -> "Postgres":
        """Started, or (a failed initdb or start, Ctrl-C meanwhile) stopped again, with the temp
        folder made for root removed: callers register ``stop`` only once this returns."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not (self.data / "PG_VERSION").exists():
                self._run("initdb", "-D", str(self.data), "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--no-sync")
            # Loopback only, and the socket in the data folder (the system's socket folder may not exist).
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} -c max_connections=200"
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        with contextlib.suppress(HarnessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        if self.as_root:
            shutil.rmtree(self.root, ignore_errors=True)


def create_database(server_url: str, name: str) -> None:
    """``CREATE DATABASE name`` on the server of ``server_url`` (which names an existing database)."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')


class TrackingServer:
    """``mlflow server`` on 127.0.0.1: runs in ``backend_uri``, artifacts served from ``artifacts``."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path, port: int | None = None,
                 workers: int = SERVER_WORKERS):
        self.backend_uri, self.artifacts, self.log = backend_uri, Path(artifacts), Path(log)
        self.port = port or free_port()
        self.workers = workers
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise HarnessError(f"mlflow server exited with status {self.process.returncode}; "
                               f"its log ({self.log}) ends:\n{self.log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self) -> "TrackingServer":
        self.artifacts.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                   "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", str(self.workers)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self._healthy, f"mlflow server on {self.url}", 180, self.log)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


@contextlib.contextmanager
def services(root: Path, postgres_url: str | None = None, server_workers: int = SERVER_WORKERS):
    """PostgreSQL (started here unless ``postgres_url`` names a running server) with fresh ``optuna``
    and ``mlflow`` databases, and a tracking server (``server_workers`` processes) on the latter.
    Yields (optuna_url, tracking_uri)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    with stack:
        if postgres_url is None:
            postgres = Postgres(root / "postgres").start()
            stack.callback(postgres.stop)
            postgres_url = postgres.url()
        suffix = f"{os.getpid()}_{int(time.time() * 1000)}"
        server_base = postgres_url.rsplit("/", 1)[0]
        for name in (f"optuna_{suffix}", f"mlflow_{suffix}"):
            create_database(postgres_url, name)
        from .urls import engine_url

        server = TrackingServer(engine_url(f"{server_base}/mlflow_{suffix}"), root / "artifacts", root / "mlflow-server.log",
                                workers=server_workers)
        stack.callback(server.stop)
        server.start()
        yield f"{server_base}/optuna_{suffix}", server.url


def _serve_postgres() -> None:
    """``python -m harness.cluster``: PostgreSQL on 127.0.0.1 until SIGTERM or Ctrl-C, its URL on the
    first line of stdout. For CI, which needs it before the virtual environment exists: this module
    uses the standard library only."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="harness-postgres-") as tmp:
        postgres = Postgres(Path(tmp)).start()
        try:
            print(postgres.url(), flush=True)
            signal.pause()
        finally:
            postgres.stop()


if __name__ == "__main__":
    _serve_postgres()
