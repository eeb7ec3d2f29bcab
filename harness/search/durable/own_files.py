"""The files of a store, and the Optuna storage and the MLflow store kept apart.

A store is more than its file: SQLite keeps -wal, -shm and -journal files beside a database, the
harness its lock beside every store it opens (filelock.LOCK_SUFFIX), Optuna's journal backend its
lock (a symbolic link) and that lock renamed on release, and a journal's repair its copies and its
rewrite (journal.TORN_SUFFIX, journal.REPAIR_SUFFIX). Two stores sharing any of these files destroy
each other: MLflow's and Optuna's tables in one database share alembic's version table (the second
to migrate finds a revision it cannot locate, and the MLflow store is unusable afterwards), and a
journal that is a lock file appends to what another process flocks.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket

from ...errors import UsageError
from ...filelock import LOCK_SUFFIX
from ...urls import engine_url, is_sqlite, redact, sqlite_in_memory, sqlite_path
from .journal import REPAIR_SUFFIX, TORN_NAME
from .optuna_private import journal_lock_suffixes

SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")  # SQLite's own, beside a database
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
LIBPQ_DRIVERS = ("psycopg", "psycopg2")  # SQLAlchemy's drivers that connect through libpq
# An sslmode no libpq accepts: PQconnectStart reads every other option, then refuses it, connecting nowhere.
UNREAD_SSLMODE = "harness-reads-options-only"


def beside(path: str, journal: bool) -> list[str]:
    """The files a store at ``path`` keeps beside it: a journal's (``journal``) or an SQLite database's.
    SQLite names its files after the database's real path (symbolic links followed), the harness and
    Optuna theirs after the path as given: both."""
    lock_suffix, _ = journal_lock_suffixes()
    suffixes = (LOCK_SUFFIX, lock_suffix) if journal else (LOCK_SUFFIX, *SQLITE_COMPANIONS)
    return [stem + suffix for stem in dict.fromkeys((path, os.path.realpath(path))) for suffix in suffixes]


def made_name(path: str) -> str | None:
    """What ``path`` is where its name is one that a store writes beside another file (so no store
    of its own): the harness's lock file, a journal repair's copy or rewrite and Optuna's renamed lock
    whatever is there; Optuna's lock and SQLite's files where the file they belong to exists."""
    folder, name = os.path.split(path)
    lock_suffix, rename_suffix = journal_lock_suffixes()
    own = [(LOCK_SUFFIX + "$", "the harness's lock file"), (TORN_NAME, "a copy a journal's repair kept"),
           (REPAIR_SUFFIX + "$", "a journal's repair, written before it replaces the journal"),
           (f"{re.escape(lock_suffix)}[0-9a-f-]{{36}}{re.escape(rename_suffix)}$", "Optuna's journal lock, renamed")]
    for pattern, what in own:
        found = re.search(pattern, name)
        if found and found.start() > 0:
            return f"{what} of {os.path.join(folder, name[:found.start()])!r}"
    for suffix, what in ((lock_suffix, "Optuna's journal lock"), *((s, f"SQLite's {s} file") for s in SQLITE_COMPANIONS)):
        stem = path[:-len(suffix)]
        if name.endswith(suffix) and len(name) > len(suffix) and os.path.isfile(stem):
            return f"{what} of {stem!r}"
    return None


def store_file(url: str) -> str | None:
    """The file of a store URL as written: a journal's path, an SQLite database's; None for a
    server's database and an in-memory one."""
    if url.startswith("journal:"):
        return url.split(":", 1)[1] or None
    if not is_sqlite(url) or sqlite_in_memory(url):
        return None
    return sqlite_path(url)


def _opened(url: str, path: str) -> str:
    """``path`` of ``url`` as its library opens it: SQLAlchemy makes an SQLite path absolute first
    (os.path.abspath: './x/..' goes before any link is followed); Optuna opens a journal's as given."""
    return path if url.startswith("journal:") else os.path.abspath(path)


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same inode where both exist (a hard link, any
    spelling), else the same path once made absolute with every symbolic link followed."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there (yet)
        return _real(a) == _real(b)


def _real(path: str) -> str:
    # POSIX leaves a leading '//' to the system (os.path keeps it); Linux reads it as '/'.
    return re.sub("^/+", "/", os.path.realpath(path))


def shared_file(a: str, a_journal: bool, b: str, b_journal: bool) -> str | None:
    """The file that stores at ``a`` and ``b`` would both write, or None."""
    for one, other, other_journal in ((a, b, b_journal), (b, a, a_journal)):
        for name in (other, *beside(other, other_journal)):
            if same_file(one, name):
                return name
    return None


def check_own(url: str, path: str, what: str) -> None:
    """Refuse a store whose file is one another store writes beside its own (see made_name)."""
    made = made_name(path)
    if made:
        raise UsageError(f"{what} {redact(url)}: {path!r} is the name of {made}, not a store; "
                         "give the store a file of its own")


def check_apart(storage_url: str, tracking_uri: str) -> None:
    """Refuse an Optuna storage and an MLflow store that would share a file (in any spelling of its
    path: relative, absolute, through a link, a hard link, a ``file:`` URI) or a server's database,
    and either in a file that a store keeps beside its own, before either is made."""
    storage, tracking = store_file(storage_url), store_file(tracking_uri)
    if storage is not None and tracking is not None:
        shared = shared_file(_opened(storage_url, storage), storage_url.startswith("journal:"),
                             _opened(tracking_uri, tracking), False)
    else:
        shared = _same_database(storage_url, tracking_uri)
    if shared:
        raise UsageError(f"the Optuna storage {redact(storage_url)} and the MLflow store {redact(tracking_uri)} "
                         f"would share {shared!r}: each overwrites the other's records there; give each its own "
                         "file or database")
    for url, path, what in ((storage_url, storage, "Optuna storage"), (tracking_uri, tracking, "MLflow store")):
        if path is not None:
            check_own(url, path, what)


def _same_database(a: str, b: str) -> str | None:
    """The database that two server URLs both reach (one name on one server: a host and port they
    both connect to), or None."""
    first = _databases(a)
    shared = first & _databases(b) if first else set()  # an http:// tracking server has no database here
    return next(iter(shared))[-1] if shared else None


def _databases(url: str) -> set[tuple]:
    """{(backend, endpoint, port, database)}: each database on each server that the driver of
    ``url`` may connect to, as SQLAlchemy's dialect hands its options to the driver (what MLflow and
    Optuna open): an option in the query takes the place of the URL's own (``?host=``, ``?port=``,
    ``?dbname=``; MySQL's ``?database=``, ``?db=``). Empty where the URL names no server's database."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(engine_url(url))
        backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
        _, options = parsed.get_dialect()().create_connect_args(parsed)
    except Exception:  # noqa: BLE001 - not a database URL SQLAlchemy reads: nothing to compare
        return set()
    if backend not in DEFAULT_PORTS:
        return set()
    if driver in LIBPQ_DRIVERS:
        found = _libpq_databases(options)
        if found is not None:
            return found
    # libpq's dbname; the MySQL drivers take database over its older alias db.
    database = options.get("dbname") or options.get("database") or options.get("db")
    if not database:
        return set()
    unix_socket = options.get("unix_socket") or options.get("unix_sock")
    endpoint = (_endpoint(str(options.get("host") or "localhost")), _real(unix_socket) if unix_socket else None)
    return {(backend, endpoint, _port(options.get("port"), DEFAULT_PORTS[backend]), str(database))}


def _libpq_databases(options: dict) -> set[tuple] | None:
    """What libpq connects to with ``options``, all its defaults applied (a service file's, PGHOST,
    PGPORT, PGUSER, PGDATABASE, the compiled-in socket folder and port; a database named after the
    user): one (host, port) per entry of a host list, as psycopg tries them one by one. None where
    psycopg or libpq cannot tell (no libpq, options libpq itself refuses: its connection fails alike)."""
    try:
        from psycopg import pq
        from psycopg.conninfo import make_conninfo

        given = _libpq(make_conninfo("", **options))
    except Exception:  # noqa: BLE001 - ImportError, or options libpq cannot parse
        return None
    if given is None:
        return None
    info, database, _ = given
    hosts, addresses, ports = (info.get(key, "").split(",") for key in ("host", "hostaddr", "port"))
    count = max(len(hosts), len(addresses))
    ports = ports * count if len(ports) == 1 else ports
    compiled_port = next(o.compiled for o in pq.Conninfo.get_defaults() if o.keyword == b"port")
    found = set()
    for i in range(count):
        host, address, port = (values[i] if i < len(values) else "" for values in (hosts, addresses, ports))
        # libpq connects to hostaddr where there is one (host then only names the server to TLS and
        # the passfile); an empty entry is the compiled-in socket folder.
        endpoint = _endpoint(address or host or _libpq_default_host())
        found.add(("postgresql", endpoint, _port(port, int(compiled_port or 5432)), database))
    return found


def _libpq(conninfo: str) -> tuple[dict, str, str] | None:
    """({option: value}, database, first host) as libpq fills them in for ``conninfo``, without
    connecting: an sslmode libpq refuses ends PQconnectStart once the options are complete (defaults
    applied, the database named after the user where none is given) and before any connection is tried."""
    from psycopg import pq
    from psycopg.conninfo import make_conninfo

    connection = pq.PGconn.connect_start(make_conninfo(conninfo, sslmode=UNREAD_SSLMODE).encode())
    try:
        if UNREAD_SSLMODE.encode() not in connection.error_message:
            return None  # libpq stopped before (an unknown service...) or read the options otherwise
        info = {o.keyword.decode(): (o.val or b"").decode() for o in connection.info}
        return info, connection.db.decode(), connection.host.decode()
    finally:
        connection.finish()


@functools.cache
def _libpq_default_host() -> str:
    """The folder of the socket libpq connects to where no host is given: compiled in (Debian's
    /var/run/postgresql, PostgreSQL's own /tmp), not among PQconndefaults, so asked of libpq."""
    given = _libpq("host='' hostaddr=''")
    return given[2] if given else ""


def _endpoint(host: str) -> tuple[str, str]:
    """A host as the system reaches it, without asking DNS: a socket folder with its path resolved
    (``/s/`` is ``/s``); an IP address in any spelling the resolver reads as one (``[0:0::1]``,
    ``127.1``, ``::ffff:127.0.0.1``) as one address; a name in lower case without its root's dot."""
    if host.startswith("/"):
        return "socket", _real(host)
    if host.startswith("@"):  # Linux's abstract socket namespace
        return "socket", host
    try:
        address = ipaddress.ip_address(socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)[0][4][0])
    except (OSError, ValueError, UnicodeError):
        return "name", host.lower().removesuffix(".")
    return "address", str(getattr(address, "ipv4_mapped", None) or address)


def _port(port, default: int) -> int | str:
    """A port as a number, as the drivers read it (``05432`` is 5432); the default where none is
    given; as written where it is no number (the driver refuses it)."""
    text = str(port if port is not None else "").strip()
    if not text:
        return default
    return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else text
