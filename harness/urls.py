"""Store URLs as they may be shown: every password removed, in every form a URL can carry one.

A password sits between the user name and the host (``scheme://user:PASSWORD@host``) or in the
query (``?password=...``, and the like). Libraries disagree on where an unencoded ``/``, ``?``, ``#``
or ``@`` in a password ends it (SQLAlchemy reads up to the first ``@`` after the ``:``, libpq up to
the first ``@`` before a ``/``, urllib up to the last ``@`` before a ``/``, ``?`` or ``#``), so the part
hidden here is the widest any of them could read as the password.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from .errors import UsageError, first_line

# Query keys that carry a secret (libpq's password, tokens of HTTP stores, cloud keys).
SECRET_KEYS = re.compile(r"pass|pwd|secret|token|key|auth|credential|signature|sig$", re.IGNORECASE)
HIDDEN = "***"
_TAB_NEWLINE = str.maketrans("", "", "\t\r\n")
# libpq's other form, "host=h password=secret" (no scheme): a key, '=', and a value, quoted or up to a space.
_CONNINFO = re.compile(r"([A-Za-z_]\w*)\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)")


def _split(url: str) -> tuple[str, str, str, str]:
    """(scheme://, credentials, host and path, ?query) with credentials as wide as they can be."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url, ""
    at = _credentials_end(rest, database=not is_http(url))
    credentials, rest = (rest[:at], rest[at + 1:]) if at >= 0 else ("", rest)
    rest, q, query = rest.partition("?")
    return scheme + sep, credentials, rest, q + query


def _credentials_end(rest: str, database: bool = True) -> int:
    """Where the credentials of ``scheme://rest`` end (the index of their '@', or -1), as the widest
    of the parsers that read them. An unencoded '/', '?' or '#' is part of a password for some and
    ends it for others (an HTTP client that cannot parse the URL prints it whole), so the password
    hidden is the longest any of them could take, whatever the scheme."""
    # urllib and requests: the authority ends at the first '/', '?' or '#', the credentials at its last '@'.
    ends = [re.match(r"[^/?#]*", rest).group().rfind("@")]
    ends.append(re.match(r"[^?#]*", rest).group().rfind("@"))  # the last '@' before the query
    # libpq: the first '@' before the first '/'.
    ends.append(rest.split("/", 1)[0].find("@"))
    # SQLAlchemy: a user without ':' or '/', then ':' and a password up to the first '@', past any '/', '?' or '#'.
    with_password = re.match(r"[^:/]*:[^@]*@", rest)
    ends.append(with_password.end() - 1 if with_password else -1)
    ends.append(re.match(r"[^:/]*", rest).group().rfind("@"))  # its user alone
    if database and ":" in rest[:max(rest.find("@"), 0)]:
        # A database URL with a password and an '@' past the first: one driver's host is another's
        # password (libpq printed "Secret" of "a/b?Hunter2@Secret=d" as a query parameter). Everything
        # up to the last '@' is hidden, and check_credentials refuses the URL.
        ends.append(rest.rfind("@"))
    return max(ends)


def secrets(url: str) -> list[str]:
    """Every secret in ``url``, as written and URL-decoded (to scrub them from other text)."""
    _, credentials, _, query = _split(url)
    found = []
    if ":" in credentials:
        found.append(credentials.split(":", 1)[1])
    elif credentials and is_http(url):
        found.append(credentials)
    for part in query.lstrip("?").split("&"):
        key, _, value = part.partition("=")
        if secret_key(url, key):
            found.append(value)
    if "://" not in url:
        for key, value in _CONNINFO.findall(url):
            if SECRET_KEYS.search(key):
                found += [value, value.strip("'")]
    every = set()
    for secret in found:
        for piece in _pieces(secret):
            every |= _forms(piece)
    every.discard("")
    return sorted(every, key=len, reverse=True)


def _forms(piece: str) -> set[str]:
    """``piece`` of a URL as written, decoded, and as another part of a URL may encode it (urllib
    drops every tab and newline of a URL before it parses it)."""
    plain = unquote(piece)
    return {piece, plain, unquote_plus(piece), piece.translate(_TAB_NEWLINE), quote(plain, safe=""), quote_plus(plain),
            quote(piece, safe="")}


def _pieces(secret: str) -> list[str]:
    """The secret and every part of it a narrower parser could read as a password, a port or a
    query: what lies before and after each '/', '?', '#' or '@' in it."""
    pieces = [secret]
    for i, char in enumerate(secret):
        if char in "/?#@":
            pieces += [secret[:i], secret[i + 1:]]
    return pieces


# A URL whose options are libpq's: its own schemes, and SQLAlchemy's with a driver named.
_LIBPQ_URL = re.compile(r"postgres(?:ql)?(?:\+\w+)?://")


def secret_key(url: str, key: str) -> bool:
    """Whether the query key ``key`` of ``url`` carries a secret. For libpq's URLs, libpq says which of
    its options are secrets (password, sslpassword...): the others (require_auth, sslkey, sslmode) are
    settings a message must show, to say what was wrong; any other key, what looks like a secret."""
    name = unquote(key)
    shown = libpq_options() if _LIBPQ_URL.match(url) else {}
    if shown.get(name) == "":  # one libpq displays in the clear
        return False
    return shown.get(name) == "*" or bool(SECRET_KEYS.search(name))


def libpq_options() -> dict[str, str]:
    """libpq's connection options and how it displays each ('*' a secret, 'D' for debugging, '' in
    the clear); {} where psycopg is not installed."""
    global _LIBPQ_OPTIONS
    if _LIBPQ_OPTIONS is None:
        try:
            from psycopg import pq

            _LIBPQ_OPTIONS = {o.keyword.decode(): o.dispchar.decode() for o in pq.Conninfo.get_defaults()}
        except ImportError:
            _LIBPQ_OPTIONS = {}
    return _LIBPQ_OPTIONS


_LIBPQ_OPTIONS: dict[str, str] | None = None


def _holds_secret(value: str, found: list[str]) -> bool:
    """Whether ``value`` (as written or %xx-decoded) is a secret of ``found`` or holds one: a password
    that is also an option's value would be printed with it."""
    return any(secret in written if len(secret) >= 3 else secret == written
               for secret in found for written in (value, unquote(value)))


def is_http(url: str) -> bool:
    """Whether ``url`` is a server's http(s) address (a tracking server), in any letter case."""
    return url.lower().startswith(("http://", "https://"))


# An SQLite URL as SQLAlchemy reads it: the dialect, a driver or none (sqlite+pysqlite, which MLflow
# takes too), '://', a host (SQLAlchemy refuses any), the database up to '?', the query. The name's
# case is as written: SQLAlchemy finds no dialect "SQLite".
_SQLITE_URL = re.compile(r"sqlite(?:\+[\w+]+)?://(?P<host>[^/?]*)(?:/(?P<database>[^?]*))?(?:\?(?P<query>.*))?")
# The query keys SQLAlchemy's pysqlite dialect hands to sqlite3.connect, not to SQLite's URI.
_DRIVER_KEYS = ("uri", "timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements")


def is_sqlite(url: str) -> bool:
    """Whether SQLAlchemy (and so MLflow and Optuna) opens ``url`` with its SQLite dialect."""
    return _SQLITE_URL.match(url) is not None


def _sqlite_open(url: str) -> tuple[str, bool] | None:
    """(filename, uri) as SQLAlchemy's pysqlite dialect hands them to ``sqlite3.connect``; None for
    a URL that is not SQLite's or names a host (which SQLAlchemy refuses)."""
    from urllib.parse import parse_qsl

    match = _SQLITE_URL.match(url)
    if match is None or match["host"]:
        return None
    database = unquote(match["database"] or "")
    query: dict = {}
    for key, value in parse_qsl(match["query"] or ""):
        if key in query:  # a repeated key: SQLAlchemy keeps its values as a tuple
            query[key] = (*query[key], value) if isinstance(query[key], tuple) else (query[key], value)
        else:
            query[key] = value
    if not _as_bool(query.get("uri", False)):
        return database, False
    options = {key: value for key, value in query.items() if key not in _DRIVER_KEYS}
    if options:
        database += "?" + "&".join(f"{key}={options[key]}" for key in sorted(options))
    return database, True


def _options_sqlite_never_reads(url: str) -> str | None:
    """Why SQLite would not read the options in the query of ``url`` as asked, or None. SQLAlchemy
    hands them to SQLite only with ``uri=true``, appended to the path, which SQLite reads as a URI
    only after ``file:``: otherwise they are part of the file's name (``m.db?mode=ro``, a new store).
    Without ``uri=true`` it drops them with a warning: a read-only request (mode=ro, immutable) is
    refused, since the store would be opened for writing; others change nothing the harness keeps."""
    match = _SQLITE_URL.match(url)
    opened = _sqlite_open(url)
    if match is None or opened is None:
        return None
    from urllib.parse import parse_qsl

    options = [(key, value) for key, value in parse_qsl(match["query"] or "") if key not in _DRIVER_KEYS]
    if opened[1]:
        if opened[0].startswith("file:"):
            return None
        given, how = options, "takes them for part of the file's name"
    else:
        given = [(key, value) for key, value in options
                 if (key, value) == ("mode", "ro") or (key == "immutable" and uri_boolean(value))]
        how = "never sees them (SQLAlchemy drops them without uri=true) and opens the store for writing"
    if not given:
        return None
    keys = ", ".join(f"{key}={value}" if not secret_key(url, key) else key for key, value in given)
    path = (match["database"] or "").removeprefix("file:")
    spelt = redact(f"sqlite:///file:{path}?{'&'.join(f'{k}={v}' for k, v in options)}&uri=true")
    return f"given SQLite options ({keys}) in a spelling where SQLite {how}: write {spelt}"


def _as_bool(value) -> bool:
    """SQLAlchemy's asbool, which reads the ``uri`` option (a repeated one is a tuple, and true)."""
    if not isinstance(value, str):
        return bool(value)
    return value.strip().lower() in ("true", "yes", "on", "y", "t", "1")  # any other word: it refuses the URL


def _sqlite_uri(filename: str) -> tuple[str, list[tuple[str, str]]] | None:
    """An SQLite ``file:`` URI's path and its query's (key, value) pairs as SQLite reads them: keys
    as written (SQLite compares them case-sensitively), %xx decoded; None for a plain file name."""
    if not filename.startswith("file:"):
        return None
    rest = filename[len("file:"):].partition("#")[0]
    if rest.startswith("//"):  # file://HOST/abs: SQLite takes only "" or "localhost" as the host
        rest = "/" + rest[2:].partition("/")[2]
    path, _, query = rest.partition("?")
    pairs = []
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key:
            pairs.append((unquote(key), unquote(value)))
    return unquote(path), pairs


def sqlite_file_uri(path: str | Path, query: str = "") -> str:
    """SQLite's ``file:`` URI of the file ``path`` with ``query``, naming the file SQLAlchemy opens for
    ``sqlite:///PATH`` in every spelling: made absolute as SQLAlchemy makes it (os.path.abspath), after
    an empty authority, since SQLite reads ``file://NAME/...`` as a host (a path that starts with
    '//', which POSIX takes for '/', was "invalid uri authority"), and with every character SQLite
    decodes or stops at ('%', '?', '#') percent-encoded."""
    return f"file://{quote(os.path.abspath(path))}" + (f"?{query}" if query else "")


def sqlite_uri_url(path: str | Path, query: str) -> str:
    """The SQLAlchemy URL whose pysqlite dialect opens ``sqlite_file_uri(path, query)``: SQLAlchemy
    percent-decodes the database part once, so the URI is encoded once more."""
    return f"sqlite:///{quote(sqlite_file_uri(path), safe='/:')}?{query}&uri=true"


def sqlite_path(url: str) -> str | None:
    """The file of an SQLite URL (``sqlite:///PATH``: relative; ``sqlite:////abs``: absolute; any
    ``sqlite+DRIVER://`` alike), as SQLAlchemy and MLflow open it; None for any other URL.

    Read as SQLAlchemy reads it: the path ends at the first ``?`` (``?timeout=30`` is the driver's
    setting, not part of the file name) and is percent-decoded; with ``uri=true`` (or another of
    its true words) it is an SQLite ``file:`` URI, whose own path is the file."""
    opened = _sqlite_open(url)
    if opened is None:
        return None
    filename, uri = opened
    parsed = _sqlite_uri(filename) if uri else None
    return parsed[0] if parsed else filename


def sqlite_options(url: str) -> list[tuple[str, str]]:
    """The (key, value) options SQLite itself reads from an SQLite URL (its ``file:`` URI's query,
    with ``uri=true``); [] for any other URL, and where SQLAlchemy hands SQLite none."""
    opened = _sqlite_open(url)
    parsed = _sqlite_uri(opened[0]) if opened and opened[1] else None
    return parsed[1] if parsed else []


def _uri_parameter(options: list[tuple[str, str]], key: str, last: bool = False) -> str | None:
    """The value SQLite takes for ``key``: the first (sqlite3_uri_parameter), or the last for the keys
    it reads while parsing (mode, vfs)."""
    values = [value for name, value in options if name == key]
    return (values[-1] if last else values[0]) if values else None


def uri_boolean(value: str | None) -> bool:
    """SQLite's sqlite3_uri_boolean of an option's value (false when absent): an integer (its low
    byte, 0x hex too) or on/yes/true (off/no/false) in any case; any other word is false."""
    if not value:
        return False
    if value[0] in "0123456789":  # SQLite's digits are ASCII ones (sqlite3Isdigit)
        return _sqlite_atoi(value) & 0xFF != 0
    return value.lower() in ("on", "yes", "true")


def _sqlite_atoi(text: str) -> int:
    """SQLite's sqlite3Atoi of a text that starts with a digit: 0 where it overflows 32 bits."""
    hexa = re.match(r"0[xX]0*([0-9a-fA-F]*)", text)
    if hexa and len(text) > 2 and text[2] in "0123456789abcdefABCDEF":
        digits = hexa[1]
        number = int(digits[:8] or "0", 16)
        return 0 if number & 0x80000000 or len(digits) > 8 else number
    digits = re.match(r"0*([0-9]*)", text)[1][:11]
    return int(digits or "0") if len(digits) <= 10 and int(digits or "0") <= 2147483647 else 0


def sqlite_in_memory(url: str) -> bool:
    """Whether an SQLite URL names a database that keeps nothing past the process: one of
    SQLAlchemy's in-memory forms (``sqlite://``, an empty path, ``:memory:``) or SQLite's
    (``mode=memory``, ``vfs=memdb``); and a URL whose scheme reads ``sqlite`` in another case or with
    a host, which SQLAlchemy opens as no file."""
    if not re.match(r"sqlite(\+|:)", url, re.IGNORECASE):
        return False
    options = sqlite_options(url)
    return (sqlite_path(url) in (None, "", ":memory:") or _uri_parameter(options, "mode", last=True) == "memory"
            or _uri_parameter(options, "vfs", last=True) == "memdb")


# No file name holds a NUL byte (Python refuses one in a path), and libpq ends its connection string at
# one: the options after it (a port, sslmode) are dropped, and the driver connects elsewhere or in clear.
_NUL = "a URL holding %00 (a NUL byte): no file name holds one, and libpq ends a connection string at one"


def holds_nul(url: str) -> bool:
    """Whether the database URL ``url`` decodes to a NUL byte anywhere (an http server's is its own)."""
    return not is_http(url) and "\x00" in unquote(url)


def sqlite_unreadable(url: str) -> str | None:
    """Why no command can read a record from the SQLite store ``url``, or None."""
    if holds_nul(url):
        return _NUL
    refused = _driver_refuses(url)
    if refused:
        return refused
    if sqlite_in_memory(url):
        return "an in-memory SQLite database, which keeps nothing past this process"
    dropped = _options_sqlite_never_reads(url)
    if dropped:
        return dropped
    options = sqlite_options(url)
    for key, allowed in _SQLITE_CHOICES.items():
        value = _uri_parameter(options, key, last=True)
        if value is not None and value not in allowed:  # SQLite refuses to open it (MLflow retries for minutes)
            return f"opened with {key}={value!r}, which SQLite does not know (allowed: {', '.join(allowed)})"
    return _unlocked(options) or _sqlite_refuses(url)


# How SQLite opens a file without the locks other connections see and without shared memory
# (https://www.sqlite.org/uri.html, https://www.sqlite.org/vfs.html). WAL needs shared memory: SQLite
# opens no WAL database so ("unable to open database file") and leaves a new one out of WAL; every
# MLflow store the harness makes is in WAL, and its stores are shared by workers and `mlflow ui`,
# whose locks such a connection would not see. Only an immutable reader takes no locks safely.
_UNLOCKED_VFS = ("unix-none", "unix-dotfile")


def _unlocked(options: list[tuple[str, str]]) -> str | None:
    """Why SQLite opens no store of the harness with ``options`` (nolock, a VFS without shared memory,
    a ``modeof`` file that is not there), or None."""
    vfs = _uri_parameter(options, "vfs", last=True)
    given = [f"vfs={vfs}"] if vfs in _UNLOCKED_VFS else []
    if uri_boolean(_uri_parameter(options, "nolock")):
        given.insert(0, f"nolock={_uri_parameter(options, 'nolock')}")
    if given and not uri_boolean(_uri_parameter(options, "immutable")):
        return (f"opened with {', '.join(given)}: without locks its other users see or shared memory, with which "
                "SQLite opens no WAL database (every MLflow store the harness makes is one); drop it (immutable=1 "
                "reads a store nothing writes any more)")
    mode_of = _uri_parameter(options, "modeof")
    if mode_of is not None and not os.path.exists(mode_of):  # SQLite fails each file it makes ("disk I/O error")
        return f"opened with modeof={mode_of!r}, a file that is not there: SQLite makes the store's files with its mode"
    return None


def _sqlite_refuses(url: str) -> str | None:
    """Why SQLite itself refuses the ``file:`` URI of ``url`` (a VFS it does not have, a host in the
    URI), or None: asked of it in memory, which makes no file, by the URI with ``mode=memory`` last
    (SQLite takes the last mode)."""
    opened = _sqlite_open(url)
    if opened is None or not opened[1] or not opened[0].startswith("file:"):
        return None  # a plain file name: SQLite reads no option out of it
    import sqlite3

    uri = opened[0].partition("#")[0]
    try:
        sqlite3.connect(uri + ("&" if "?" in uri else "?") + "mode=memory", uri=True).close()
    except sqlite3.Error as exc:
        return f"not a URL SQLite can open: {scrub(first_line(exc), url)}"
    return None


def _driver_refuses(url: str) -> str | None:
    """Why SQLAlchemy's pysqlite dialect or sqlite3 would refuse the SQLite ``url`` on connecting (an
    option's value they cannot read, ``uri=maybe``, ``timeout=abc``), or None. Asked of them here,
    before anything is made: MLflow and Optuna meet the refusal only after the other store, and the
    harness's lock files, exist. A path whose %xx decode to no UTF-8 names another file than written."""
    match = _SQLITE_URL.match(url)
    if match is None:
        return None
    try:
        _decoded(match["database"] or "")
    except UnicodeDecodeError as exc:
        return _not_utf8(exc)
    if match["query"] is None and not match["host"]:
        return None  # a plain path: nothing for the driver to refuse, and predict's fast read imports no SQLAlchemy
    import sqlite3

    from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
    from sqlalchemy.engine import make_url

    try:
        args, kwargs = SQLiteDialect_pysqlite().create_connect_args(make_url(url))
        if kwargs.get("uri"):
            _decoded(args[0].partition("?")[0].partition("#")[0])  # SQLite decodes a file: URI's path once more
        # sqlite3's own rules on the options, on a database that makes no file
        sqlite3.connect(":memory:", **{key: value for key, value in kwargs.items() if key != "uri"}).close()
    except UnicodeDecodeError as exc:
        return _not_utf8(exc)
    except Exception as exc:  # ValueError, TypeError, sqlite3's: each names the value it refused
        return f"not a URL SQLite can open: {scrub(first_line(exc), url)}"
    return None


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"a path whose %xx decode to bytes that are no UTF-8 ({exc.object[exc.start:exc.end]!r})"


def _decoded(path: str) -> str:
    """``path`` %xx-decoded, refusing bytes that are no UTF-8 (where unquote would put U+FFFD)."""
    return unquote(path, errors="strict")


def sqlite_unwritable(url: str) -> str | None:
    """Why a command cannot keep a record in the SQLite store ``url``, or None."""
    unreadable = sqlite_unreadable(url)
    if unreadable:
        return unreadable
    options = sqlite_options(url)
    if _uri_parameter(options, "mode", last=True) == "ro" or uri_boolean(_uri_parameter(options, "immutable")):
        return "opened read-only (mode=ro, immutable=1), and this command writes"
    return None


# The values SQLite takes for the URI options it reads as words, case as written; any other is an error.
_SQLITE_CHOICES = {"mode": ("ro", "rw", "rwc", "memory"), "cache": ("shared", "private")}


def redact(url: str) -> str:
    """The URL with any password removed (user and host kept), fit for tags, params and output."""
    scheme, credentials, rest, query = _split(url)
    if credentials:
        user = credentials.split(":", 1)[0]
        if ":" not in credentials and is_http(url):
            user = HIDDEN  # https://TOKEN@host: the user name is the secret
        rest = f"{user}@{rest}" if user else rest
    if query:
        found = secrets(url)
        parts = []
        for part in query.lstrip("?").split("&"):
            key, eq, value = part.partition("=")
            parts.append(f"{key}={HIDDEN}" if eq and (secret_key(url, key) or _holds_secret(value, found)) else part)
        query = "?" + "&".join(parts)
    if not scheme:  # "host=h password=secret", or anything else without a scheme
        rest = _CONNINFO.sub(lambda m: f"{m.group(1)}={HIDDEN}" if SECRET_KEYS.search(m.group(1)) else m.group(0),
                             rest)
    return scheme + rest + query


FRAGMENT = 4  # characters of a secret that a message may not show in a row


def scrub(text: str, url: str) -> str:
    """``text`` (a library's error message, say) with every secret of ``url`` replaced by ***, and
    every run of ``FRAGMENT`` or more of its characters too: a parser that stops inside a password
    (at an '=', a space, a '#') prints a piece of it as a port, a host or a query parameter.

    Where libpq reads ``url`` (a PostgreSQL URL it parses) and finds the one password every parser
    finds, none of them stopped inside it: the password is hidden whole (as written, decoded and
    encoded; a short one only beside its user or as a whole quoted value), and the rest of the
    message (an option's value, the values allowed, that share a few characters with it) stays readable."""
    found = secrets(url)
    password = _libpq_password(url)
    whole = password is not None and set(found) <= _forms(password) | _forms(quote(password, safe=""))
    text = text.replace(url, redact(url))
    for secret in found:
        # Where a URL holds it, a secret of any length: after the user's ':' or as the token before '@'.
        text = text.replace(f":{secret}@", f":{HIDDEN}@").replace(f"//{secret}@", f"//{HIDDEN}@")
        if len(secret) >= 3:  # elsewhere a shorter one would blank out ordinary words
            text = text.replace(secret, HIDDEN)
    if whole:
        return _QUOTED.sub(lambda m: f"{m.group(1)}{HIDDEN}{m.group(1)}" if m.group(2) in found else m.group(0), text)
    for secret in found:
        text = _hide_fragments(text, secret)
    # A value a library quotes ("Ab" of "user:Ab/CdEf9@h", read as a port) is hidden whatever its
    # length when it may be a piece of a secret: the runs above leave pieces under FRAGMENT alone.
    return _QUOTED.sub(lambda m: f"{m.group(1)}{HIDDEN}{m.group(1)}" if overlaps(m.group(2), found) else m.group(0),
                       text)


_QUOTED = re.compile(r"""(["'])([^"'\n]+)\1""")


def _libpq_password(url: str) -> str | None:
    """The password libpq reads out of a PostgreSQL ``url`` ("" for none); None where libpq does not
    read the URL (another scheme, one it cannot parse, no psycopg)."""
    libpq = _LIBPQ_URL.match(url)
    if libpq is None:
        return None
    try:
        from psycopg.conninfo import conninfo_to_dict

        return str(conninfo_to_dict("postgresql://" + url[libpq.end():]).get("password") or "")
    except Exception:  # ImportError, or libpq's refusal of the URL: its pieces may be anywhere
        return None


def overlaps(value: str, found: list[str]) -> bool:
    """Whether ``value`` (a piece of a URL a parser read out) may be all or part of one of ``found``."""
    return any(value in secret or secret in value for secret in found)


def quoted_value(value: str, url: str) -> str:
    """``value``, read out of ``url``, as a message may quote it: its repr, or the field alone
    (``HIDDEN``) where it may be a piece of the URL's password however short."""
    return HIDDEN if overlaps(value, secrets(url)) else repr(value)


def _hide_fragments(text: str, secret: str) -> str:
    """``text`` with every run of at least FRAGMENT characters that also occurs in ``secret`` replaced by ***."""
    if len(secret) < FRAGMENT:
        return text
    pieces, i, start = [], 0, 0
    while i <= len(text) - FRAGMENT:
        if text[i:i + FRAGMENT] in secret:
            end = i + FRAGMENT
            while end < len(text) and text[i:end + 1] in secret:
                end += 1
            pieces += [text[start:i], HIDDEN]
            i = start = end
        else:
            i += 1
    return "".join(pieces) + text[start:]


def check_credentials(url: str, what: str) -> None:
    """Refuse a URL whose authority holds more than one ``@``: an unencoded ``@`` in a password makes
    drivers take the rest of the password for the host name, and print it in their errors; and a
    database URL that decodes to a NUL byte (``_NUL``)."""
    if holds_nul(url):
        raise UsageError(f"{what} {redact(url)} is {_NUL}")
    _, credentials, _, _ = _split(url)
    if "@" in credentials:
        raise UsageError(f"{what} {redact(url)}: its user or password contains an unencoded '@'; "
                         "write it as %40 (and '/' as %2F)")


def engine_url(url: str) -> str:
    """``postgresql://`` pinned to psycopg 3 (the driver the harness installs): SQLAlchemy before 2.1
    reads a bare ``postgresql://`` as psycopg2, from 2.1 on as psycopg."""
    return "postgresql+psycopg://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def local_folder(artifact_uri: str | None) -> Path | None:
    """The folder of a run's artifacts when MLflow keeps them in a local folder (its default beside
    an SQLite store), as MLflow's LocalArtifactRepository makes it of the URI on POSIX (``file:``
    URIs and absolute paths alike %xx-decoded); None for anything served or remote, a relative path
    and a ``FILE:`` MLflow would read as a relative path."""
    from urllib.parse import urlparse

    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if artifact_uri.startswith("file:") and parsed.netloc in ("", "localhost"):
        path = parsed.path
    elif parsed.scheme == "":
        path = artifact_uri
    else:
        return None
    path = unquote(path)  # urllib.request.url2pathname on POSIX, which MLflow calls
    return Path(path) if path.startswith("/") else None
