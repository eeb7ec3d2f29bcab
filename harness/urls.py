"""Store URLs as they may be shown: every password removed, in every form a URL can carry one.

A password sits between the user name and the host (``scheme://user:PASSWORD@host``) or in the
query (``?password=...``, and the like). Libraries disagree on where an unencoded ``/``, ``?``, ``#``
or ``@`` in a password ends it (SQLAlchemy reads up to the first ``@`` after the ``:``, libpq up to
the first ``@`` before a ``/``, urllib up to the last ``@`` before a ``/``, ``?`` or ``#``), so the part
hidden here is the widest any of them could read as the password.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from .errors import UsageError

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
        if SECRET_KEYS.search(unquote(key)):
            found.append(value)
    if "://" not in url:
        for key, value in _CONNINFO.findall(url):
            if SECRET_KEYS.search(key):
                found += [value, value.strip("'")]
    every = set()
    for secret in found:
        for piece in _pieces(secret):
            # urllib drops every tab and newline of a URL before it parses it
            plain = unquote(piece)
            every |= {piece, plain, unquote_plus(piece), piece.translate(_TAB_NEWLINE),
                      quote(plain, safe=""), quote_plus(plain), quote(piece, safe="")}  # as another part of a URL may encode it
    every.discard("")
    return sorted(every, key=len, reverse=True)


def _pieces(secret: str) -> list[str]:
    """The secret and every part of it a narrower parser could read as a password, a port or a
    query: what lies before and after each '/', '?', '#' or '@' in it."""
    pieces = [secret]
    for i, char in enumerate(secret):
        if char in "/?#@":
            pieces += [secret[:i], secret[i + 1:]]
    return pieces


def is_http(url: str) -> bool:
    """Whether ``url`` is a server's http(s) address (a tracking server), in any letter case."""
    return url.lower().startswith(("http://", "https://"))


SQLITE = "sqlite:///"


def sqlite_path(url: str) -> str | None:
    """The file of an SQLite URL (``sqlite:///PATH``: relative; ``sqlite:////abs``: absolute), as
    SQLAlchemy and MLflow open it; None for any other URL.

    Read as SQLAlchemy reads it: the path ends at the first ``?`` (``?timeout=30`` is the driver's
    setting, not part of the file name) and is percent-decoded; with ``uri=true`` it is an SQLite
    ``file:`` URI, whose own path is the file."""
    if not url.startswith(SQLITE):
        return None
    path = unquote(url[len(SQLITE):].partition("?")[0])
    if "uri=true" in _sqlite_query(url) and path.startswith("file:"):
        path = path[len("file:"):]
        if path.startswith("//"):  # file://HOST/abs: SQLite takes only "" or "localhost" as the host
            path = "/" + path[2:].partition("/")[2]
        path = unquote(path.partition("?")[0].partition("#")[0])
    return path


def sqlite_in_memory(url: str) -> bool:
    """Whether an SQLite URL is one of SQLAlchemy's in-memory forms (``sqlite://``, an empty path,
    ``:memory:``, ``mode=memory``): a database that keeps nothing past the process."""
    if not url.lower().startswith("sqlite:"):
        return False
    return not url.startswith(SQLITE) or sqlite_path(url) in ("", ":memory:") or "mode=memory" in _sqlite_query(url)


def sqlite_unwritable(url: str) -> str | None:
    """Why a command cannot keep a record in the SQLite store ``url``, or None."""
    if sqlite_in_memory(url):
        return "an in-memory SQLite database, which keeps nothing past this process"
    query = _sqlite_query(url)
    if "mode=ro" in query or "immutable=1" in query:
        return "opened read-only (mode=ro, immutable=1), and this command writes"
    return None


def _sqlite_query(url: str) -> list[str]:
    """An SQLite URL's query as its ``key=value`` parts, lowercased; [] for any other URL."""
    return [part.lower() for part in url.partition("?")[2].split("&")] if url.lower().startswith("sqlite:") else []


def redact(url: str) -> str:
    """The URL with any password removed (user and host kept), fit for tags, params and output."""
    scheme, credentials, rest, query = _split(url)
    if credentials:
        user = credentials.split(":", 1)[0]
        if ":" not in credentials and is_http(url):
            user = HIDDEN  # https://TOKEN@host: the user name is the secret
        rest = f"{user}@{rest}" if user else rest
    if query:
        parts = []
        for part in query.lstrip("?").split("&"):
            key, eq, value = part.partition("=")
            parts.append(f"{key}={HIDDEN}" if eq and SECRET_KEYS.search(unquote(key)) else part)
        query = "?" + "&".join(parts)
    if not scheme:  # "host=h password=secret", or anything else without a scheme
        rest = _CONNINFO.sub(lambda m: f"{m.group(1)}={HIDDEN}" if SECRET_KEYS.search(m.group(1)) else m.group(0),
                             rest)
    return scheme + rest + query


FRAGMENT = 4  # characters of a secret that a message may not show in a row


def scrub(text: str, url: str) -> str:
    """``text`` (a library's error message, say) with every secret of ``url`` replaced by ***, and
    every run of ``FRAGMENT`` or more of its characters too: a parser that stops inside a password
    (at an '=', a space, a '#') prints a piece of it as a port, a host or a query parameter."""
    found = secrets(url)
    text = text.replace(url, redact(url))
    for secret in found:
        # Where a URL holds it, a secret of any length: after the user's ':' or as the token before '@'.
        text = text.replace(f":{secret}@", f":{HIDDEN}@").replace(f"//{secret}@", f"//{HIDDEN}@")
        if len(secret) >= 3:  # elsewhere a shorter one would blank out ordinary words
            text = text.replace(secret, HIDDEN)
    for secret in found:
        text = _hide_fragments(text, secret)
    # A value a library quotes ("Ab" of "user:Ab/CdEf9@h", read as a port) is hidden whatever its
    # length when it may be a piece of a secret: the runs above leave pieces under FRAGMENT alone.
    return _QUOTED.sub(lambda m: f"{m.group(1)}{HIDDEN}{m.group(1)}" if overlaps(m.group(2), found) else m.group(0),
                       text)


_QUOTED = re.compile(r"""(["'])([^"'\n]+)\1""")


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
    drivers take the rest of the password for the host name, and print it in their errors."""
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
