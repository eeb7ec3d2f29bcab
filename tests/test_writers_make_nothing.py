"""A command that writes, given a store URL no store of the harness can be kept in or a run that
cannot be there, says so in one line (exit 2) and leaves the folder as it was: no store file, no
lock file, nothing made (issue 26, the 17th probe's finding 4)."""
from __future__ import annotations

import pytest

import conftest
from harness.urls import sqlite_unreadable, sqlite_unwritable
from test_bad_input import SHORT, one_line_error

RUN = "0123456789abcdef0123456789abcdef"

# SQLite options SQLite knows, with which it opens no WAL store (every MLflow store the harness makes
# is one; tried with sqlite3: "unable to open database file", a new file left out of WAL) or nothing.
UNOPENABLE = ["sqlite:///file:m.db?uri=true&nolock=1", "sqlite:///file:m.db?uri=true&vfs=unix-none",
              "sqlite:///file:m.db?uri=true&vfs=unix-dotfile", "sqlite:///file:m.db?uri=true&vfs=nosuch",
              "sqlite:///file:m.db?uri=true&modeof=missing.db", "sqlite:///file://elsewhere/m.db?uri=true"]
# URLs every other writer refused already, which `register` did not look at.
REFUSED_ELSEWHERE = ["sqlite:///m.db?timeout=abc", "sqlite:///m%ff.db", "sqlite:///file:m.db?uri=true&mode=memory",
                     "sqlite:///file:m.db?uri=true&mode=ro", "sqlite:///file:m.db?uri=true&immutable=1"]
WRITERS = {
    "register": ["register", RUN, "--name", "x"],
    "train --resume": ["train", "--epochs", 1, "--resume", RUN],
    "train": ["train", "--epochs", 1],
    "search": ["search", *SHORT, "--n-trials", 1, "--storage", "journal:j.log"],
}
CASES = [(writer, url) for url in UNOPENABLE for writer in WRITERS] + \
        [("register", url) for url in REFUSED_ELSEWHERE] + [("search --storage", url) for url in UNOPENABLE]


@pytest.mark.parametrize("writer, url", conftest.slow_cases(CASES))
def test_a_store_url_no_store_can_be_kept_in_is_refused_before_anything_is_made(tmp_path, writer, url,
                                                                              cli_in_process):
    if writer == "search --storage":
        out = cli_in_process("search", *SHORT, "--n-trials", 1, "--storage", url.replace("m.db", "o.db"),
                             cwd=tmp_path)
    else:
        out = cli_in_process(*WRITERS[writer], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    line = one_line_error(out)
    assert "MLflow store" in line or "storage" in line, line
    assert list(tmp_path.iterdir()) == []


# A run id MLflow takes (32 hex digits, or any word of its rule) that no store here can hold, and
# ids MLflow refuses: said before the store is opened, which would make it.
RUN_IDS = [(RUN, "does not exist"), ("nothex", "does not exist"), ("no/hex", "is not a run id"),
           ("x" * 300, "is not a run id")]


@pytest.mark.parametrize("writer, run_id, said", conftest.slow_cases(
    [(writer, run_id, said) for run_id, said in RUN_IDS for writer in ("register", "train --resume")]))
def test_a_run_that_cannot_be_in_the_store_makes_no_store(tmp_path, writer, run_id, said, cli_in_process):
    args = [run_id if arg == RUN else arg for arg in WRITERS[writer]]
    line = one_line_error(cli_in_process(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "sqlite:///m.db"}))
    assert said in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_reader_of_a_store_gets_the_same_refusal_and_an_immutable_one_reads(workdir, cli_in_process):
    """Readers go through the same check: SQLite opens the WAL store with nolock only as immutable."""
    before = sorted(workdir.iterdir())
    url = f"sqlite:///file:{workdir / 'mlflow.db'}?uri=true&nolock=1"
    assert "nolock=1" in one_line_error(cli_in_process("predict", RUN, "--x", 1, cwd=workdir,
                                                       env={"MLFLOW_TRACKING_URI": url}))
    assert sorted(workdir.iterdir()) == before
    assert sqlite_unreadable(url + "&immutable=1") is None


@pytest.mark.parametrize("options", ["vfs=unix-excl", "vfs=unix", "nolock=0", "psow=0", "cache=shared",
                                     "modeof=/etc/hostname", "cache=private&mode=rwc"])
def test_options_that_open_the_store_as_asked_are_taken(options):
    assert sqlite_unwritable(f"sqlite:///file:m.db?uri=true&{options}") is None


# %00 anywhere in a database URL (the 18th probe): SQLite's path, a file: URI's option name or value,
# a server's password. No file name holds a NUL (Python raised ValueError mid-way: a traceback, exit
# 1), and libpq ends its connection string at one, dropping the options after it (port, sslmode).
NUL_URLS = ["sqlite:///file:m.db?vfs=memdb%00x&uri=true", "sqlite:///m%00.db", "sqlite:///file:m%00x.db?uri=true",
            "sqlite:///file:m.db?uri=true&immutable=1%00x", "postgresql+psycopg://u:Secret%00pw@127.0.0.1:1/db"]
NUL_COMMANDS = {**WRITERS, "audit": ["audit", "--study", "s"], "compare": ["compare", "--study", "s"],
                "predict": ["predict", RUN, "--x", 1], "reproduce": ["reproduce", RUN],
                "search --storage": ["search", *SHORT, "--n-trials", 1], "audit --storage": ["audit", "--study", "s"]}


@pytest.mark.parametrize("command, url", conftest.slow_cases(
    [(command, url) for url in NUL_URLS[:2] for command in NUL_COMMANDS] +
    [(command, url) for url in NUL_URLS[2:] for command in ("train", "search --storage")]))
def test_a_store_url_holding_a_nul_is_refused_in_one_line_by_every_command(tmp_path, command, url, cli_in_process):
    args = NUL_COMMANDS[command]
    if command.endswith("--storage"):
        out = cli_in_process(*args, "--storage", url.replace("m", "o", 1) if url.startswith("sqlite") else url,
                             cwd=tmp_path)
    else:
        out = cli_in_process(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    line = one_line_error(out)
    assert "%00 (a NUL byte)" in line and "Secret" not in out.stdout + out.stderr, line
    assert list(tmp_path.iterdir()) == []
