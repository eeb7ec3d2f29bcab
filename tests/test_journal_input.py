"""What `--storage journal:PATH` takes (issue 26, a twelfth probe): a file that is no Optuna journal,
and every path form that names no place for one, are bad input: exit 2, one line, nothing written
(not the file, not the MLflow store, not a lock file). A journal's repair waits until every check
of the command passed: a refused search leaves a damaged journal as it was."""
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import cli_env, slow_cases, snapshot

SEARCH = ["search", "--n-trials", 1, "--epochs-range", 2, 3, "--pruner", "none", "--models", "none"]
COMMANDS = {"search": SEARCH, "audit": ["audit", "--study", "s"], "audit --fix": ["audit", "--study", "s", "--fix"]}


def _refused(cli_in_process, folder: Path, argv, storage: str, said: str) -> None:
    before = snapshot(folder)
    out = cli_in_process(*argv, "--storage", f"journal:{storage}", cwd=folder,
                         env={"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and said in out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and not out.stdout
    assert snapshot(folder) == before  # the file as it was; no store, no lock file, no .torn copy


def _journal(path: Path) -> bytes:
    """Study "s" (maximize, two trials) in an Optuna journal; its bytes."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    optuna.create_study(study_name="s", storage=storage, direction="maximize").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return path.read_bytes()


def _no_journal(folder: Path, kind: str, migrated_db: Path) -> Path:
    path = folder / "given"
    if kind == "sqlite":  # an MLflow store
        shutil.copy(migrated_db, path)
    elif kind == "notes":
        path.write_text("my notes\nline two\n")
    elif kind == "notes cut short":
        path.write_text("my notes")
    elif kind == "binary after a journal line":  # a valid first line, then bytes no Optuna writes
        line = _journal(folder / "j").split(b"\n")[0]
        (folder / "j").unlink()
        path.write_bytes(line + b"\n\xe9\xff\x00garbage\n" + line + b"\n")
    return path


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["sqlite", "notes", "notes cut short", "binary after a journal line"])
def test_a_file_that_is_no_journal_is_refused_and_left_as_it_was(tmp_path, migrated_db, cli_in_process, kind,
                                                                 command):
    given = _no_journal(tmp_path, kind, migrated_db)
    _refused(cli_in_process, tmp_path, COMMANDS[command], given.name, "is not an Optuna journal")


def _torn(path: Path, intact: bytes) -> None:
    path.write_bytes(intact[:-20])


def _damaged_in_the_middle(path: Path, intact: bytes) -> None:
    lines = intact.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]) + b"garbage\n" + b"".join(lines[3:]))


@pytest.mark.parametrize("damage", [_torn, _damaged_in_the_middle])
def test_a_refused_command_leaves_a_damaged_journal_as_it_was(tmp_path, cli_in_process, damage):
    journal = tmp_path / "j.log"
    damage(journal, _journal(journal))
    # Study "s" is no search of this experiment (its objective, its direction): refused; audit --fix of
    # another study finds none.
    _refused(cli_in_process, tmp_path, [*SEARCH, "--study-name", "s"], journal.name, "study 's' ")
    _refused(cli_in_process, tmp_path, ["audit", "--study", "nope", "--fix"], journal.name, "no study 'nope'")


def test_a_journal_line_after_a_first_write_cut_short_is_still_a_journal(tmp_path):
    """What plain Optuna leaves when it appends after a crash cut its very first write: recognisable."""
    from harness.search.durable.journal import not_a_journal

    journal = tmp_path / "j.log"
    first = _journal(journal).split(b"\n")[0]
    for text in (first[:5], first[:-9] + first + b"\n", b""):
        journal.write_bytes(text)
        assert not_a_journal(str(journal)) is None, text


def _place(folder: Path, form: str) -> str:
    """``form`` made in ``folder``: the path given as the journal."""
    (folder / "sub").mkdir()
    links = {"link to a folder": "sub", "link to /dev/zero": "/dev/zero", "dangling link": "nowhere"}
    if form in links:
        (folder / "given").symlink_to(links[form])
    elif form == "link loop":
        (folder / "given").symlink_to("given")
    elif form == "fifo":
        os.mkfifo(folder / "given")
    elif form == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(folder / "given"))
    elif form in ("Optuna's lock in the way", "the harness's lock in the way"):
        (folder / ("given.lock" if form.startswith("Optuna") else "given.harness-lock")).mkdir()
    return {"trailing slash": "sub/", "trailing slash, no such folder": "new/", "folder": "sub", "dot": "sub/.", "in no folder": "nodir/j.log",
            "name too long for its lock": "j" * 250}.get(form, "given")


FORMS = ["trailing slash", "trailing slash, no such folder", "folder", "dot", "link to a folder", "link to /dev/zero", "dangling link", "link loop",
         "fifo", "socket", "in no folder", "name too long for its lock", "Optuna's lock in the way",
         "the harness's lock in the way"]
PSEUDO = ["/proc/version", "/proc/self/comm", "/sys/kernel/mm/transparent_hugepage/enabled"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("form", FORMS + PSEUDO)
def test_a_journal_path_that_names_no_place_for_one_is_refused_before_anything_is_made(tmp_path, cli_in_process,
                                                                                       form, command):
    if form in PSEUDO:
        if not Path(form).exists():
            pytest.skip(f"{form} is not on this machine")
        storage = form
    else:
        storage = _place(tmp_path, form)
    if command == "audit" and ("lock" in form or form == "in no folder"):
        pytest.skip("a reader locks nothing; a journal that is not there is 'no Optuna storage', exit 2 too")
    said = "not an Optuna journal" if form in PSEUDO else "Optuna journal"
    _refused(cli_in_process, tmp_path, COMMANDS[command], storage, said)


NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
               "--inh-caps=-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.parametrize("command", ["search", "audit --fix"])
@pytest.mark.slow  # real processes under setpriv
def test_a_journal_in_a_folder_this_user_cannot_write_is_refused_before_the_mlflow_store_is_made(tmp_path, command):
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("as root, setpriv is needed to drop the right to write a read-only folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    _journal(locked / "j.log")
    locked.chmod(stat.S_IMODE(locked.stat().st_mode) & ~0o222)
    prefix = NO_OVERRIDE if os.geteuid() == 0 else []
    argv = [*prefix, sys.executable, "-m", "harness", *map(str, COMMANDS[command]), "--storage",
            f"journal:{locked / 'j.log'}"]
    out = subprocess.run(argv, cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "is not writable by this user" in out.stderr, \
        out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]  # no MLflow store made
    assert sorted(p.name for p in locked.iterdir()) == ["j.log"]


def _sqlite_study(path: Path) -> None:
    optuna.create_study(study_name="s", storage=f"sqlite:///{path}", direction="maximize").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2)


# Every spelling of a storage a reading audit may be given, and what is in its place.
READ_STORAGES = {"sqlite:///o.db": _sqlite_study, "sqlite:////ABS/o.db": _sqlite_study,
                 "sqlite:///o.db?timeout=5": _sqlite_study, "sqlite+pysqlite:///o.db": _sqlite_study,
                 "journal:o.db": _journal, "sqlite:///o.db (an MLflow store)": None, "sqlite:///o.db (none)": None,
                 "journal:o.db (none)": None}


READS = [(storage, store) for storage in READ_STORAGES for store in ("present", "missing")] + [
    ("sqlite:///o.db", "unreadable"), ("journal:o.db", "unreadable")]
# SQLite's other spellings of o.db reach the same reader: the whole suite reads them, the fast tier not.
OTHER_SPELLINGS = ("sqlite:////ABS/o.db", "sqlite:///o.db?timeout=5", "sqlite+pysqlite:///o.db")


@pytest.mark.parametrize("storage,store", slow_cases(READS, slow=[r for r in READS if r[0] in OTHER_SPELLINGS]))
def test_a_reading_audit_makes_no_file_in_any_storage_spelling(tmp_path, migrated_db, cli_in_process, storage, store):
    """Was: `audit` without --fix on a writable sqlite:///o.db made o.db.harness-lock (Optuna's table
    lock) before it read anything, and Optuna's tables in a database that held none. A reader makes
    nothing: no lock file, no database, no journal, no table, whatever the MLflow store is."""
    make = READ_STORAGES[storage]
    if make is not None:
        make(tmp_path / "o.db")
    elif "MLflow" in storage:
        shutil.copy(migrated_db, tmp_path / "o.db")
    if store == "present":
        shutil.copy(migrated_db, tmp_path / "mlflow.db")
    elif store == "unreadable":
        (tmp_path / "mlflow.db").write_text("not a database\n")
    before = snapshot(tmp_path)
    url = storage.split(" (")[0].replace("/ABS", str(tmp_path))
    out = cli_in_process("audit", "--study", "s", "--storage", url, cwd=tmp_path,
                         env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr, out.stderr
    assert snapshot(tmp_path) == before, out.stdout + out.stderr


@pytest.mark.slow  # whole searches in-process
def test_a_search_checks_its_journal_once(workdir, cli_in_process, monkeypatch):
    """The options check the journal (what it is, that it can be written) before anything else; opening
    it did both again, and the journal's opening a third time (issue 27: one check)."""
    from harness.search import study
    from harness.search.durable import journal

    calls = []
    for module, name in ((journal, "not_a_journal"), (study, "check_journal_writable")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    assert cli_in_process(*SEARCH, "--no-progress", cwd=workdir).returncode == 0  # a new journal: nothing to read
    assert calls == ["check_journal_writable"]
    calls.clear()
    assert cli_in_process(*SEARCH, "--no-progress", cwd=workdir).returncode == 0  # resumed
    assert calls == ["not_a_journal", "check_journal_writable"]
