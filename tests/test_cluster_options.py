"""Issue 26, an eleventh probe (F3, F4): `harness cluster --postgres URL` with a connection option
libpq or psycopg refuses, and what of the URL its one line shows.

F3: `?connect_timeout=abc` passed the check (which connected with its own timeout) and failed after
it, exit 1 "bad value for connect_timeout": every option with a constrained value is now put to
libpq and psycopg themselves before anything is made. F4: the line refusing `require_auth=bogus`
showed `require_auth=***` and `value: "***"` (a key with "auth" in it was taken for a secret), and a
password sharing a few characters with the value or with the values allowed masked those too: only
the password is hidden, wherever the URL carries it.
"""
from urllib.parse import quote

import pytest

from harness.cli import main

# Options whose values libpq or psycopg check before connecting, each with a value they refuse.
REFUSED = [
    "connect_timeout=abc", "connect_timeout=nan", "keepalives=often", "keepalives_idle=x", "keepalives_interval=-x",
    "keepalives_count=x", "tcp_user_timeout=abc", "sslmode=bogus", "sslcertmode=bogus", "sslnegotiation=bogus",
    "gssencmode=bogus", "channel_binding=bogus", "require_auth=bogus", "target_session_attrs=bogus",
    "load_balance_hosts=bogus", "min_protocol_version=bogus", "max_protocol_version=9.9",
    "ssl_min_protocol_version=bogus", "ssl_max_protocol_version=TLSv9",
]


def refused_line(url, tmp_path, capsys) -> str:
    assert main(["cluster", "--postgres", url, "--dir", str(tmp_path / "c")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("harness: error: --postgres postgresql://") and not (tmp_path / "c").exists(), line
    return line


@pytest.mark.parametrize("option", REFUSED)
def test_an_option_value_libpq_refuses_is_one_line_naming_it_and_what_is_allowed(option, tmp_path, capsys):
    key, value = option.split("=")
    line = refused_line(f"postgresql://u:Hunter22pw@127.0.0.1:9/db?{option}", tmp_path, capsys)
    assert f"?{option}:" in line and key in line.split(": ", 3)[3] and (f'"{value}"' in line or f"'{value}'" in line)
    assert "; allowed: " in line and "***" not in line and "Hunter22" not in line and "cannot connect" not in line


# Where a URL carries a password, and how (PW: the password as written in the URL).
CARRIERS = ["postgresql://u:PW@127.0.0.1:9/db?OPTION", "postgresql://u@127.0.0.1:9/db?password=PW&OPTION",
            "postgresql://u@127.0.0.1:9/db?OPTION&password=PW", "postgresql://u:PW@127.0.0.1:9/db?OPTION&sslpassword=PW"]
# (password, option, what of the option's value the line may show)
PASSWORDS = [
    ("Hunter22pw", "require_auth=bogus", '"bogus"'),
    ("bogus", "require_auth=bogus", '"***"'),  # the password itself: hidden wherever it is
    ("prefer", "gssencmode=bogus", '"bogus"'),  # one of the values allowed
    ("hunter2bogus", "sslcertmode=bogus", '"bogus"'),  # a password holding the value shows the value, not itself
    ("bog", "sslmode=xbogx", '"x***x"'),  # a value holding the password does not show it
    ("Pw?@#x/y", "min_protocol_version=bogus", '"bogus"'),
    ("Pw?@#x/y", "tcp_user_timeout=Pw?@#x/y", '"***"'),
    ("%41bc def", "connect_timeout=%41bc def", "'***'"),
]


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("password, option, shown", PASSWORDS)
def test_only_the_password_is_hidden_wherever_the_url_carries_it(carrier, password, option, shown, tmp_path, capsys):
    key, value = option.split("=")
    encoded = quote(password, safe="")
    url = carrier.replace("PW", encoded).replace("OPTION", f"{key}={quote(value, safe='')}")
    line = refused_line(url, tmp_path, capsys)
    message = line.split(": ", 3)[3]
    # What the URL and libpq's message make of it; the values allowed that follow are fixed words
    # (a password "prefer" is one of gssencmode's, and no sign of the password where it is printed).
    said = line.split("; allowed: ")[0]
    assert password not in said and encoded not in said and quote(encoded, safe="") not in said, line
    if "sslpassword" in carrier:  # refused first, as a secret that would be on command lines
        assert message.startswith("sslpassword is a secret"), line
        return
    assert key in message and shown in message, line
    assert message.count("***") == shown.count("***"), line
    if "; allowed: " in message:  # the values allowed are the harness's own words: never masked
        assert "***" not in message.split("; allowed: ")[1], line


@pytest.mark.parametrize("url, password", [
    ("postgresql://u:Qz#W?m1xK@127.0.0.1:9/db?require_auth=bogus", "Qz#W?m1xK"),
    ("postgresql://u:Qz#W?m1xK@127.0.0.1:9/db?require_auth=Qz%23W%3Fm1xK", "Qz#W?m1xK"),
    ("postgresql://u:bogus#x@127.0.0.1:9/db?sslmode=bogus", "bogus#x"),
    ("postgresql://u@127.0.0.1:9/db?password=Qz#W?m1xK&sslmode=bogus", "Qz#W?m1xK"),
    ("postgresql://u:a/b?Hunter2@127.0.0.1:9/db?sslcertmode=Hunter2", "Hunter2"),
])
def test_a_password_written_unencoded_is_never_shown_in_any_piece(url, password, tmp_path, capsys):
    """An unencoded '#', '?' or '/' ends a password for some parsers and not for others: where they
    disagree, every piece any of them could read as the password stays hidden, even an option's value."""
    line = refused_line(url, tmp_path, capsys)
    assert not [piece for piece in {password, *password.replace("?", "#").replace("/", "#").split("#")}
                if len(piece) > 2 and piece in line], line


@pytest.mark.parametrize("command", [["search", "--n-trials", "1", "--epochs-range", "2", "3"], ["audit", "--study", "s"]])
def test_a_storage_the_driver_refuses_names_the_value_and_hides_only_the_password(command, tmp_path, cli_in_process):
    """The same mask on every command that reaches a PostgreSQL URL: a search's or an audit's Optuna
    storage showed `invalid require_auth value: "***"` for a password sharing 'bogus' with the value."""
    url = "postgresql://u:hunter2bogus@127.0.0.1:9/db?require_auth=bogus"
    result = cli_in_process(*command, "--storage", url, cwd=tmp_path)
    line, = result.stderr.strip().splitlines()
    assert result.returncode == 2 and 'invalid require_auth value: "bogus"' in line and "hunter2" not in line, line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [["compare", "--study", "s"], ["train", "--epochs", "2"]])
def test_a_tracking_store_url_with_a_timeout_psycopg_cannot_read_is_refused_at_once(command, tmp_path, cli_in_process):
    """The MLflow side of F3: the store's probe connected with a timeout of its own, then MLflow's
    connections failed on the URL's `connect_timeout=abc` and retried for 104 s before the line."""
    url = "postgresql://u:hunter2pw@127.0.0.1:9/db?connect_timeout=abc"
    result = cli_in_process(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    line, = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "bad value for connect_timeout: 'abc'" in line and "hunter2" not in line, line
    assert not list(tmp_path.iterdir())
