"""A scale-out setup on one machine: PostgreSQL from the system's packages and an MLflow tracking
server (PostgreSQL backend store, served artifacts, MLflow's basic-auth app), both on 127.0.0.1 only.

The same two services that many machines share; here they let a user try the setup, and the tests
and the scaling benchmark run against the real engines rather than stand-ins.

Loopback is no boundary between the users of one machine: PostgreSQL asks for a password
(SCRAM) and the tracking server for a login (HTTP basic auth), both passwords generated here and
kept in files only their owner reads. No password is ever put on a command line (``ps`` shows those
to everyone) or printed: children find them in their environment (PGPASSFILE, MLFLOW_TRACKING_USERNAME
and MLFLOW_TRACKING_PASSWORD), which only their own user can read.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from .errors import HarnessError, UsageError
from .numbers import natural
from .urls import check_credentials, engine_url, libpq_options, quoted_value, redact, scrub

DB_USER = "harness"
PASSFILE = "pgpass"
# The tracking server's only account: an admin, whom MLflow's auth app lets do anything.
ADMIN = "admin"
# Beside the server's log: the exports that give a shell the server and its login (0600).
CREDENTIALS = "mlflow-credentials"
# Where MLflow's client reads a login from, at every request.
LOGIN_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# `mlflow server --workers`: on 2 cores, 1, 2 and 4 carry the same load (benchmarks/capacity.py);
# a machine of the server's own takes more.
SERVER_WORKERS = 2


def postgres_bin() -> Path:
    """The folder holding initdb and pg_ctl: on PATH, or where Debian's packages put them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: natural(p.parts[-3]) or 0)
    if versions:
        return versions[-1].parent
    raise UsageError("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
                     "on Debian or Ubuntu: apt-get install postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_socket(port: int | None = None) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` (one the kernel picks when None), for a server to
    inherit: the port is this process's from the moment it is chosen, never free for another user's
    process to bind first and answer in the server's place."""
    sock = socket.socket()
    # uvicorn takes an inherited socket for a Unix one and so leaves Nagle on for the connections it
    # accepts (each request then waits ~40 ms for a delayed ACK); Linux's accepted sockets inherit this.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(("127.0.0.1", port or 0))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise HarnessError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    return sock


def _listeners(port: int) -> dict[int, int]:
    """The sockets listening on TCP ``port``, any address, IPv4 or IPv6: inode -> owner's uid."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                # sl local rem st queues tr retrnsmt uid timeout inode
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found[int(fields[9])] = int(fields[7])
    return found


def _group(pid: int) -> list[int]:
    """``pid`` and the processes of its process group (a server started in a session of its own)."""
    found = [pid]
    for entry in os.scandir("/proc"):
        other = natural(entry.name)
        if other is not None:
            with contextlib.suppress(OSError, IndexError, ValueError):
                # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
                if int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[2]) == pid:
                    found.append(other)
    return found


def _sockets_of(pids: list[int]) -> set[int]:
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        found.add(int(target[8:-1]))
    return found


def check_listener(port: int, pid: int, what: str) -> None:
    """Refuse, before anything is sent to it, a port of 127.0.0.1 that some process other than the
    one started here (``pid`` and its process group) listens on, or that no process listens on: a
    squatter that bound it first would read every login sent to it."""
    if not os.path.exists("/proc/net/tcp"):
        return  # not Linux: no way to ask who listens (the tracking server's port is bound here anyway)
    listening = _listeners(port)
    alive = os.path.exists(f"/proc/{pid}")
    strangers = sorted({uid for inode, uid in listening.items()
                        if not alive or inode not in _sockets_of(_group(pid))})
    if strangers or not listening or not alive:
        holder = f"a process of uid {', '.join(map(str, strangers))}" if strangers else "no process"
        raise HarnessError(f"{what}: 127.0.0.1:{port} is listened on by {holder}, not the {what} started here "
                           "(another user's process took the port?); stopped before sending it anything")


def _wait(ready, what: str, seconds: float, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise HarnessError(f"{what} did not become ready in {seconds:.0f}s; its log ({log}) ends:\n{tail}")


def write_private(path: Path, text: str, owner=None) -> None:
    """``text`` in a file that is 0600 from the moment it exists (O_EXCL: never through a link
    someone else planted), owned by ``owner`` (a pwd entry) when given."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def passfile_line(host: str, port: str, user: str, password: str) -> str:
    """One entry of a libpq passfile, for any database; '*' in host, port or user means any."""
    def escape(field: str) -> str:
        return field.replace("\\", "\\\\").replace(":", "\\:")

    fields = [f if f == "*" else escape(f) for f in (host, port, "*", user)]
    return ":".join([*fields, escape(password)]) + "\n"


def url_passfile(path: Path, url: str, password: str) -> None:
    """A 0600 passfile at ``path`` giving ``password`` to the user of ``url`` (split_password's URL) on
    any host, port and database: how the check, the workers and the tracking server all log in."""
    from psycopg.conninfo import conninfo_to_dict

    write_private(path, passfile_line("*", "*", conninfo_to_dict(url).get("user") or "*", password))


@contextlib.contextmanager
def environment(values: dict[str, str], unset: tuple[str, ...] = ()):
    """``values`` set and ``unset`` removed in os.environ, for this process and the children it
    starts meanwhile; what was there before is back afterwards."""
    before = {key: os.environ.pop(key, None) for key in (*values, *unset)}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def libpq_passfile(path: Path):
    """PGPASSFILE set to ``path`` meanwhile: libpq (psycopg, SQLAlchemy, Optuna, mlflow server)
    reads it at every connection. PGPASSWORD, which libpq would take first, is out of the way."""
    return environment({"PGPASSFILE": str(path)}, unset=("PGPASSWORD",))


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 for user ``harness``, whose generated password is
    in ``passfile`` (0600, its owner the user running this).

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
        self.owner = owner if self.as_root else None
        self.root = Path(root)
        self.data = self.root / "data"
        self.passfile = self.root / PASSFILE
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
            if not self.as_root:  # root's is the temp folder made for the postgres user
                private_dir(self.root)
            if (self.data / "PG_VERSION").exists():
                password = self._password()
            else:
                password = secrets.token_urlsafe(32)
                self._initdb(password)
            write_private(self.passfile, passfile_line("127.0.0.1", str(self.port), DB_USER, password))
            # Loopback only, and the socket in the data folder (the system's socket folder may not exist).
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} -c max_connections=200"
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                          "start")
            except HarnessError:
                # PostgreSQL binds its port itself, after free_port let it go: say who took it meanwhile.
                taken = sorted(set(_listeners(self.port).values()))
                if taken:
                    raise HarnessError(f"pg_ctl start failed: 127.0.0.1:{self.port} is listened on by a process of "
                                       f"uid {', '.join(map(str, taken))}, not the PostgreSQL started here") from None
                raise
            check_listener(self.port, self._postmaster(), "PostgreSQL")
        except BaseException:
            self.stop()
            raise
        return self

    def _postmaster(self) -> int:
        """The server's process id, the first line of the postmaster.pid it wrote."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def _initdb(self, password: str) -> None:
        # SCRAM on TCP and on the socket alike: DB_USER is the superuser, who may run programs as
        # the server's OS account (COPY ... TO PROGRAM), so no one gets in without the password.
        pwfile = self.root / "initdb-password"
        write_private(pwfile, password + "\n", self.owner)  # initdb runs as the postgres user when root
        try:
            self._run("initdb", "-D", str(self.data), "-U", DB_USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                      "-E", "UTF8", "--no-sync")
        finally:
            pwfile.unlink(missing_ok=True)

    def _password(self) -> str:
        """The password of the cluster already in ``data``, from the passfile written with it."""
        try:
            return self.passfile.read_text().rstrip("\n").rsplit(":", 1)[1]
        except (OSError, IndexError):
            raise UsageError(f"{self.data} holds a PostgreSQL cluster with no passfile beside it ({self.passfile}): "
                             "an older harness made it trusting every local user; remove it or use another --dir") from None

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


def drop_database(server_url: str, name: str) -> None:
    """``DROP DATABASE name`` (connections to it closed first), or nothing when the server is gone."""
    import psycopg

    with contextlib.suppress(psycopg.Error), psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead of its own (its query, if any, kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def secret_options() -> frozenset[str]:
    """The connection options libpq itself flags as secrets (password, sslpassword, oauth_client_secret...)."""
    return frozenset(key for key, shown in libpq_options().items() if shown == "*")


def split_password(url: str) -> tuple[str, str | None]:
    """``url`` as libpq reads it, rebuilt percent-encoded without its password, and that password.

    Every part is libpq's reading (the authority on what the URL means, for it is what connects),
    not urllib's: an unencoded '#' or '?' in a password ends it for urllib only. A secret other than
    the password is refused: the rebuilt URL goes on command lines (`mlflow server`, the workers),
    and libpq reads such a secret from no file or variable a child could be handed instead."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = {k: str(v) for k, v in conninfo_to_dict(url).items()}
    except psycopg.Error as exc:  # libpq's own parser: what a driver would refuse, refused now
        raise UsageError(f"--postgres {redact(url)}: {' '.join(scrub(str(exc), url).split())}") from None
    password = params.pop("password", None)
    if password is not None:
        if "\n" in password or "\r" in password:  # a passfile entry is one line: libpq would read another password
            raise UsageError(f"--postgres {redact(url)}: the password holds a line break, which no libpq passfile "
                             "can hand on to the workers and the tracking server; give the role another password")
        params.pop("passfile", None)  # the password is handed on in the harness's own passfile, which this would override
    other = sorted(secret_options() & params.keys())
    if other:
        raise UsageError(f"--postgres {redact(url)}: {other[0]} is a secret that would be on the command lines of "
                         "the workers and the tracking server (libpq reads it from no file or variable); leave it "
                         "out (for sslpassword: a key file without a passphrase, readable by you only, as sslkey)")
    return server_url(params), password


def server_url(params: dict[str, str]) -> str:
    """The ``postgresql://`` URL of libpq's connection ``params``, every part percent-encoded."""
    params = dict(params)
    user = quote(params.pop("user", ""), safe="")
    dbname = quote(params.pop("dbname", ""), safe="")
    hosts, ports = params.get("host", ""), params.get("port", "")
    netloc = ""
    if not any(h.startswith(("/", "@")) for h in hosts.split(",")):  # socket folders stay in the query
        params.pop("host", None), params.pop("port", None)
        host_list, port_list = hosts.split(","), ports.split(",")
        if len(port_list) == 1:
            port_list *= len(host_list)
        netloc = ",".join((f"[{h}]" if ":" in h else quote(h, safe="")) + (f":{p}" if p else "")
                          for h, p in zip(host_list, port_list))
        if netloc in ("", ":"):
            netloc = ""
    netloc = f"{user}@{netloc}" if user else netloc
    query = urlencode(params, quote_via=quote)
    return f"postgresql://{netloc}/{dbname}" + (f"?{query}" if query else "")


# libpq's words for a connection option it refuses before any server has a say (an sslmode it does
# not know, a keepalives that is no number, a hostaddr that is no address), psycopg's for a timeout,
# and the server's for an option it reads at the start (replication): the URL is wrong.
_REFUSED_OPTION = re.compile(r'invalid "?(\w+)"? (?:value|method)|bad value for (\w+)|invalid value for parameter '
                             r'"(\w+)"|could not parse network address|could not match \d+ ')
# The values libpq takes for the options it names in such a message without them, for the one line
# that refuses one (the server lists its own: replication).
OPTION_VALUES = {
    "sslmode": "disable, allow, prefer, require, verify-ca, verify-full",
    "sslcertmode": "disable, allow, require",
    "require_auth": "password, md5, gss, sspi, scram-sha-256, oauth, none, several joined by ',', each or all "
                    "negated by a leading '!'",
    "min_protocol_version": "3.0, 3.2, latest",
    "max_protocol_version": "3.0, 3.2, latest",
    "connect_timeout": "a number of seconds",
    "gssencmode": "disable, prefer, require",
    "channel_binding": "disable, prefer, require",
    "target_session_attrs": "any, read-write, read-only, primary, standby, prefer-standby",
    "load_balance_hosts": "disable, random",
    "sslnegotiation": "postgres, direct",
    "ssl_min_protocol_version": "TLSv1, TLSv1.1, TLSv1.2, TLSv1.3",
    "ssl_max_protocol_version": "TLSv1, TLSv1.1, TLSv1.2, TLSv1.3",
    "integer": "a whole number",
}


def refused_option(message: str) -> str | None:
    """libpq's refusal of a connection option in ``message`` (psycopg's error, scrubbed), with the
    values allowed where known; None for a failure to reach or enter the server."""
    found = _REFUSED_OPTION.search(message)
    if found is None:
        return None
    refusal = message[found.start():]
    allowed = OPTION_VALUES.get(next((name for name in found.groups() if name), ""))
    return f"{refusal}; allowed: {allowed}" if allowed else refusal


def refused_offline(plain: str) -> str | None:
    """What libpq and psycopg refuse in the connection options of ``plain`` (no password in it)
    before they connect to anything, in their words; None where they take every value.

    They are asked to connect to a port of this machine that this process holds without listening:
    a value they do not take is refused first (a connect_timeout psycopg cannot read, a require_auth
    libpq does not know), and otherwise the port refuses the connection. Nothing is sent anywhere."""
    import errno

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        # hostaddr too: a PGHOSTADDR in the environment would take its place.
        params = {**conninfo_to_dict(plain), "host": "127.0.0.1", "hostaddr": "127.0.0.1",
                  "port": str(held.getsockname()[1])}
        try:
            psycopg.connect(make_conninfo("", **params)).close()
        except psycopg.Error as exc:
            message = " ".join(str(exc).split())
            return None if os.strerror(errno.ECONNREFUSED) in message else message
    return None


def check_server(url: str) -> None:
    """``harness cluster --postgres URL``, refused in one line before anything is made: exit 2 for a
    URL that is not a PostgreSQL one, exit 1 for a server that does not answer, let us in, or let us
    create databases. It connects with the URL services() hands on (split_password's), so that
    what goes on is what was checked."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    check_credentials(url, "--postgres")
    shown = f"--postgres {redact(url)}"
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # an unclosed '[' of an IPv6 host
        raise UsageError(f"{shown}: {exc}; expected postgresql://USER@HOST[:PORT]/DATABASE") from None
    if scheme != "postgresql":
        raise UsageError(f"{shown}: not a PostgreSQL URL; expected postgresql://USER@HOST[:PORT]/DATABASE "
                         "(the password in PGPASSFILE, ~/.pgpass or the URL)")
    try:
        ports = conninfo_to_dict(url).get("port", "5432")
    except psycopg.Error as exc:  # libpq's own parser: what a driver would refuse, refused now
        raise UsageError(f"{shown}: {' '.join(scrub(str(exc), url).split())}") from None
    if not all(0 < (natural(p) or 0) < 65536 for p in str(ports).split(",")):
        raise UsageError(f"{shown}: the port must be a number from 1 to 65535, got {quoted_value(str(ports), url)}")
    plain, password = split_password(url)
    refused = refused_offline(plain)
    if refused:
        refused = scrub(refused, url)
        raise UsageError(f"{shown}: {refused_option(refused) or refused}")
    # Connected as the workers and the server will be: the rebuilt URL, the password from a passfile.
    with tempfile.TemporaryDirectory(prefix="harness-check-") as tmp, contextlib.ExitStack() as stack:
        if password is not None:
            passfile = Path(tmp) / PASSFILE
            url_passfile(passfile, plain, password)
            stack.enter_context(libpq_passfile(passfile))
        try:
            with psycopg.connect(plain, connect_timeout=10) as c:
                may_create = c.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
                                       ).fetchone()[0]
        except psycopg.Error as exc:
            message = " ".join(scrub(str(exc), url).split())
            refused = refused_option(message)
            if refused:
                raise UsageError(f"{shown}: {refused}") from None
            raise HarnessError(f"{shown}: cannot connect: {message}") from None
    if not may_create:
        raise HarnessError(f"{shown}: its user may not create databases (the cluster makes two); "
                           "ALTER ROLE ... CREATEDB, or use another user")


class TrackingServer:
    """``mlflow server`` on 127.0.0.1 behind MLflow's basic-auth app: runs in ``backend_uri``,
    artifacts served from ``root``/artifacts, its log and auth files in ``root``.

    Nobody without a login reads or writes anything (default permission NO_PERMISSIONS), and the
    one login is ``ADMIN`` with a password generated at each start, kept in ``credentials`` (0600)
    and handed to clients through ``login`` in their environment. Everything the server writes
    (its auth database, the artifacts) is its owner's only, so the files are no way around it.
    """

    def __init__(self, backend_uri: str, root: Path, port: int | None = None, workers: int = SERVER_WORKERS):
        self.backend_uri, self.root = backend_uri, Path(root)
        self.artifacts, self.log = self.root / "artifacts", self.root / "mlflow-server.log"
        self.credentials = self.root / CREDENTIALS
        # Held from the start until stop: bound here and inherited by the server, so no one else
        # binds the port first, nor after a server that died (its clients would hand them the login).
        self.listener = listening_socket(port)
        self.port = self.listener.getsockname()[1]
        self.workers = workers
        self.password = secrets.token_urlsafe(32)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def login(self) -> dict[str, str]:
        """What a client needs in its environment."""
        return dict(zip(LOGIN_VARS, (ADMIN, self.password)))

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise HarnessError(f"mlflow server exited with status {self.process.returncode}; "
                               f"its log ({self.log}) ends:\n{self.log.read_text(errors='replace')[-2000:]}")
        try:  # /health is the one route the auth app leaves open
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _auth_env(self) -> dict[str, str]:
        """The auth app's settings: the secrets in the server's environment, the rest in an ini."""
        database = self.root / "mlflow-auth.db"
        # The admin is created with the password of the first start only: a fresh database each start.
        database.unlink(missing_ok=True)
        config = self.root / "mlflow-auth.ini"
        # A login is checked with scrypt, a few tenths of a CPU second: once per worker process and
        # 10 minutes, not at every request (a changed password reaches the other workers that late).
        write_private(config, "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                              f"database_uri = sqlite:///{database}\n"
                              "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                              "auth_cache_ttl_seconds = 600\n")
        return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
                # Signs the auth app's forms; the same in every worker, which inherit it.
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32)}

    def start(self) -> "TrackingServer":
        private_dir(self.root)
        private_dir(self.artifacts)  # also what an earlier start left there
        # MLflow's job runner (GenAI jobs) would start a process of its own and leave a queue folder in
        # /dev/shm after every stop: the harness's runs need neither.
        env = {**os.environ, **self._auth_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        exports = {"MLFLOW_TRACKING_URI": self.url, **self.login}
        write_private(self.credentials, "".join(f"export {k}={v}\n" for k, v in exports.items()))
        command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                   "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.artifacts),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
                   # The socket bound here, as the server's stdin: the one descriptor `mlflow server`
                   # hands on to its uvicorn (it starts it with close_fds). --host and --port then
                   # only name it; uvicorn binds nothing.
                   "--uvicorn-opts", "--fd 0"]
        with open_private(self.log, os.O_APPEND) as log:
            self.process = subprocess.Popen(command, stdin=self.listener, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, umask=0o077, start_new_session=True)
        _wait(self._healthy, f"mlflow server on {self.url}", 180, self.log)
        check_listener(self.port, self.process.pid, "mlflow server")
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
        self.listener.close()


def check_dir(root: Path) -> None:
    """Refuse a folder for the services' files that another user could write, or swap for one of
    theirs: whoever can write it can put a link or a FIFO where a log goes (files this process opens,
    as root too), and whoever can write a folder above it can rename it away and put theirs in its
    place (as ssh's StrictModes, a sticky folder such as /tmp is no way in: there only an entry's owner
    renames it). ``root`` is absolute and without links (resolved)."""
    for folder in reversed(root.parents):
        try:
            found = folder.lstat()
        except FileNotFoundError:
            break  # made here, as everything below it
        if found.st_uid not in (0, os.geteuid()) or (found.st_mode & 0o022 and not found.st_mode & stat.S_ISVTX):
            raise UsageError(f"--dir {str(root)!r}: the folder above it {str(folder)!r} (owner uid {found.st_uid}, "
                             f"mode {stat.S_IMODE(found.st_mode):o}) can be written by another user, who could put "
                             "a folder of theirs in --dir's place: every folder above --dir must be writable by "
                             "you or root only, or sticky (like /tmp)")
    try:
        found = root.lstat()
    except FileNotFoundError:
        return  # made here, for this user only
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_mode & 0o077:
        kind = "a folder" if stat.S_ISDIR(found.st_mode) else "not a folder (a link or a file)"
        raise UsageError(f"--dir {str(root)!r} is {kind} of owner uid {found.st_uid} and mode "
                         f"{stat.S_IMODE(found.st_mode):o}: it must be a folder of yours that no other user can "
                         "write or read (mode 700), or one that does not exist yet")


def private_dir(path: Path) -> None:
    """``path`` a folder of this user's only (0700): made here (with any missing parent), or one that
    is already theirs, never through a link; checked once it exists, as it is."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:  # a link (ELOOP), a file (ENOTDIR)
        raise UsageError(f"{path} is not a folder of yours ({exc.strerror}): remove it, or use another --dir") from None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise UsageError(f"{path} is a folder of owner uid {os.fstat(fd).st_uid}, not yours: remove it, or use "
                             "another --dir")
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def open_private(path: Path, flag: int = os.O_TRUNC):
    """``path`` opened for writing (``flag``: O_TRUNC or O_APPEND) as a regular file of mode 0600, never
    through a link and never blocking on a FIFO someone put there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | flag, 0o600)
    except OSError as exc:  # a link (ELOOP), a FIFO nobody reads (ENXIO)
        raise UsageError(f"{path} is not a regular file of yours ({exc.strerror}): remove it, or use another "
                         "--dir") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file: remove it, or use another --dir")
    return os.fdopen(fd, "ab" if flag == os.O_APPEND else "wb")


@contextlib.contextmanager
def services(root: Path, postgres_url: str | None = None, server_workers: int = SERVER_WORKERS):
    """PostgreSQL (started here unless ``postgres_url`` names a running server) with fresh ``optuna``
    and ``mlflow`` databases, and a tracking server (``server_workers`` processes) on the latter.
    Yields (optuna_url, tracking_uri), neither with a password: meanwhile PGPASSFILE names the
    passfile of the cluster started here, or of the password ``postgres_url`` carried (in ``root``),
    and LOGIN_VARS hold the tracking server's login."""
    root = Path(root).resolve()
    check_dir(root)
    private_dir(root)
    check_dir(root)  # as it is now that it exists: ours, 0700, and no folder above it swapped meanwhile
    stack = contextlib.ExitStack()
    started = False  # once the caller has the services: before, nothing made is of use to anyone
    with stack:
        if postgres_url is None:
            postgres = Postgres(root / "postgres").start()
            stack.callback(postgres.stop)
            postgres_url, passfile = postgres.url(), postgres.passfile
        else:
            postgres_url, password = split_password(postgres_url)
            passfile = root / PASSFILE if password is not None else None
            if passfile:
                # Only this process and its children, which connect to nothing else, read it.
                url_passfile(passfile, postgres_url, password)
                stack.callback(lambda: None if started else passfile.unlink(missing_ok=True))
        if passfile:
            stack.enter_context(libpq_passfile(passfile))
        suffix = f"{os.getpid()}_{int(time.time() * 1000)}"

        def drop_unused(name: str) -> None:
            # Until the caller has the services nothing can have logged in them: a failed start leaves none.
            if not started:
                drop_database(postgres_url, name)

        for name in (f"optuna_{suffix}", f"mlflow_{suffix}"):
            import psycopg

            try:
                create_database(postgres_url, name)
            except psycopg.Error as exc:  # a server that let the check in and refuses this (a timeout, a quota)
                raise HarnessError(f"cannot create database {name} on {redact(postgres_url)}: "
                                   f"{' '.join(scrub(str(exc), postgres_url).split())}") from None
            stack.callback(drop_unused, name)
        server = TrackingServer(engine_url(with_database(postgres_url, f"mlflow_{suffix}")), root,
                                workers=server_workers)
        stack.callback(server.stop)
        server.start()
        stack.enter_context(environment(server.login))
        started = True
        yield with_database(postgres_url, f"optuna_{suffix}"), server.url


def mlflow_database(storage: str) -> str:
    """The tracking server's database of the run whose Optuna storage services() yielded."""
    return "mlflow_" + urlsplit(storage).path.rsplit("/optuna_", 1)[1]


def _serve_postgres() -> None:
    """``python -m harness.cluster``: PostgreSQL on 127.0.0.1 until SIGTERM or Ctrl-C. For CI, which
    needs it before the virtual environment exists (this module uses the standard library only):
    stdout's first line is its URL (no password), the second the passfile to name in PGPASSFILE."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="harness-postgres-") as tmp:
        postgres = Postgres(Path(tmp)).start()
        try:
            print(f"{postgres.url()}\n{postgres.passfile}", flush=True)  # one write: both lines or none
            signal.pause()
        finally:
            postgres.stop()


if __name__ == "__main__":
    _serve_postgres()
