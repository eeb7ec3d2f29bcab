"""In-process and fast: password removal over every URL form, and the journal's repair rules."""
import itertools
import json
import os
import string
from pathlib import Path

import optuna
import pytest

from conftest import slow_cases
from harness.errors import UsageError
from harness.search.durable.journal import Journal, JournalWriteError, full_damage, tail_damage
from harness.urls import check_credentials, redact, scrub

SECRET = "S3cr3tPw"


@pytest.mark.parametrize("url,shown", [
    (f"postgresql://user:{SECRET}@db:5432/optuna", "postgresql://user@db:5432/optuna"),
    ("postgresql://user:S3c/r3tPw@db/optuna", "postgresql://user@db/optuna"),
    ("postgresql://user:S3c%2Fr3tPw@db/optuna", "postgresql://user@db/optuna"),
    (f"postgresql+psycopg://user@db/optuna?password={SECRET}", "postgresql+psycopg://user@db/optuna?password=***"),
    (f"postgresql://db/optuna?sslmode=require&PASSWORD={SECRET}&application_name=x",
     "postgresql://db/optuna?sslmode=require&PASSWORD=***&application_name=x"),
    (f"mysql://root:{SECRET}@127.0.0.1/o", "mysql://root@127.0.0.1/o"),
    (f"http://me:{SECRET}@tracking:5000", "http://me@tracking:5000"),
    (f"https://{SECRET}@tracking", "https://***@tracking"),
    (f"https://tracking/?token={SECRET}", "https://tracking/?token=***"),
    (f"sqlite:///x.db?password={SECRET}", "sqlite:///x.db?password=***"),
    ("journal:optuna_journal.log", "journal:optuna_journal.log"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
])
def test_redact_hides_every_password_form(url, shown):
    assert redact(url) == shown
    message = f"could not connect to {url} with password {SECRET} (S3c/r3tPw)"
    cleaned = scrub(message, url)
    for secret in (SECRET, "S3c/r3tPw", "S3c%2Fr3tPw"):
        if secret in url or (secret == "S3c/r3tPw" and "S3c%2F" in url):
            assert secret not in cleaned


# Every character a password can hold unencoded, in each URL form that carries one. '&' ends a query
# value for every parser (it is not part of the password there); a token's ':' makes it a user and
# a password.
SPECIAL = string.punctuation + " \t\u00e9\u20ac\U0001f600"
FORMS = [("postgresql://user:{}@db:5432/optuna?sslmode=require", SPECIAL),
         ("postgresql+psycopg://user:{}@db/optuna", SPECIAL),
         ("mysql+pymysql://root:{}@127.0.0.1/o", SPECIAL),
         ("postgresql://user@db/optuna?password={}&sslmode=require", SPECIAL.replace("&", "")),
         ("http://me:{}@tracking:5000", SPECIAL),
         ("https://{}@tracking", SPECIAL.replace(":", ""))]


def _parsed(url: str) -> list[str]:
    """Every value the drivers read out of ``url`` (password, host, port, database, options): any of
    them may end up in their error messages."""
    from urllib.parse import urlsplit

    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import make_url

    values = []
    for parse in (lambda u: [make_url(u).password, make_url(u).host, make_url(u).port, make_url(u).database,
                             *make_url(u).query.values()],
                  lambda u: list(conninfo_to_dict(u).values()) if u.startswith("postgresql://") else [],
                  lambda u: [urlsplit(u).password, urlsplit(u).hostname, urlsplit(u).netloc, urlsplit(u).query]):
        try:
            values += [str(v) for v in parse(url) if v is not None]
        except Exception:  # this parser refuses the URL: it reads nothing out of it
            pass
    return values


@pytest.mark.parametrize("form,chars", FORMS, ids=[f[0].split(":")[0] + str(i) for i, f in enumerate(FORMS)])
def test_no_part_of_a_password_is_shown_whatever_character_it_holds(form, chars):
    for char in chars:
        url = form.format(f"Secret{char}Passw0rd")
        shown = [redact(url), scrub(" | ".join(["could not connect:", url, *_parsed(url)]), url)]
        try:
            check_credentials(url, "storage")
        except UsageError as exc:
            shown.append(str(exc))
        for text in shown:
            assert "Secret" not in text and "Passw0rd" not in text, (char, text)


def test_an_unencoded_at_in_a_password_is_refused_without_showing_it():
    with pytest.raises(UsageError) as err:
        check_credentials("postgresql://user:S3c@r3tPw@db/optuna", "storage")
    assert "r3tPw" not in str(err.value) and "S3c" not in str(err.value) and "%40" in str(err.value)
    check_credentials(f"postgresql://user:{SECRET}@db/optuna", "storage")  # fine


def _journal_with_trials(path: Path, n: int = 3) -> None:
    storage = optuna.storages.JournalStorage(Journal(str(path), notify=lambda line: None))
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)


def _trials(path: Path) -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name="s", storage=storage).trials


def test_the_journal_cuts_a_torn_tail_before_appending(tmp_path):
    path = tmp_path / "j.log"
    _journal_with_trials(path)
    intact = path.read_bytes()
    path.write_bytes(intact[:-30])
    assert tail_damage(str(path)).keep == intact[:-1].rfind(b"\n") + 1
    said = []
    storage = optuna.storages.JournalStorage(Journal(str(path), notify=said.append))
    study = optuna.load_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)  # appends: the tail is cut first
    assert len(said) == 1 and "kept a copy" in said[0]
    [copy] = tmp_path.glob("j.log.torn-*")
    assert copy.read_bytes() == intact[intact[:-1].rfind(b"\n") + 1:-30]
    assert len(_trials(path)) == 5 and tail_damage(str(path)) is None


def test_a_line_longer_than_a_read_is_checked_whole(tmp_path):
    path = tmp_path / "j.log"
    line = json.dumps({"op_code": 0, "worker_id": "w", "study_name": "x" * 20000, "directions": [1]}).encode() + b"\n"
    path.write_bytes(line * 2)
    assert tail_damage(str(path)) is None
    path.write_bytes(line + line[:-100])
    assert tail_damage(str(path)).keep == len(line)


def test_damage_in_the_middle_is_cut_and_an_operation_after_it_salvaged(tmp_path):
    path = tmp_path / "j.log"
    _journal_with_trials(path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-3]) + lines[-3][:-20] + lines[-2] + b"garbage\n" + lines[-1])
    damage = full_damage(str(path))
    assert damage.lines == 2 and damage.salvaged == 1 and damage.keep == len(b"".join(lines[:-3]))
    Journal(str(path), notify=lambda line: None).repair(whole=True)
    assert path.read_bytes() == b"".join(lines[:-3]) + lines[-2] + lines[-1]


def test_a_failed_append_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "j.log"
    _journal_with_trials(path, 1)
    before = path.read_bytes()
    journal = Journal(str(path))
    real_write = os.write

    def short_then_full(fd, data):
        if fd > 2 and len(data) > 10:
            real_write(fd, bytes(data[:10]))  # part of it lands ...
            raise OSError(28, "No space left on device")  # ... then the disk is full
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(JournalWriteError, match="No space left on device"):
        journal.append_logs([{"op_code": 4, "worker_id": "w", "trial_id": 0, "user_attr": {"a": "b" * 50}}])
    monkeypatch.undo()
    assert path.read_bytes() == before


# ---- lines that are JSON but no operation this Optuna replays --------------------------------------

def _other_study_journal(path: Path) -> None:
    """Study "s" with no trials, and study "other" whose trials give the lines to damage."""
    storage = optuna.storages.JournalStorage(Journal(str(path), notify=lambda line: None))
    optuna.create_study(study_name="s", storage=storage).set_user_attr("kept", 1)
    other = optuna.create_study(study_name="other", storage=storage)
    other.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_categorical("c", [1, 2]), n_trials=2)


def _a_param_line() -> dict:
    return {"op_code": 5, "worker_id": "w", "trial_id": 0, "param_name": "x", "param_value_internal": 0.5,
            "distribution": '{"name": "FloatDistribution", "attributes": {"step": null, "low": 0.0, "high": 1.0,'
                            ' "log": false}}'}


def _without(field: str) -> bytes:
    return json.dumps({k: v for k, v in _a_param_line().items() if k != field}).encode()


BAD_OPERATIONS = [
    b'{"foo": 1}', b"[1, 2]", b'"op"', b'{"op_code": 99, "worker_id": "w"}',  # an op of a newer Optuna
    b'{"op_code": true, "worker_id": "w"}',
    *(_without(field) for field in _a_param_line()),  # each required field missing in turn
    b'{"op_code": 6, "worker_id": "w", "trial_id": "zero", "state": 1, "values": null}',  # a wrong type
    b'{"op_code": 6, "worker_id": "w", "trial_id": 1, "state": 1, "values": ["low"]}',
    b'{"op_code": 8, "worker_id": "w", "trial_id": 1, "user_attr": {"a": 1, "b": 2}}',
    b'{"op_code": 7, "worker_id": "w", "trial_id": 1e999, "step": 1, "intermediate_value": 1}',  # huge numbers
    b'{"op_code": 7, "worker_id": "w", "trial_id": 1, "step": ' + b"9" * 5000 + b', "intermediate_value": 1}',
    b'{"op_code": 0, "worker_id": "w", "study_name": "t", "directions": [7]}',  # what only the replay refuses
    b'{"op_code": 4, "worker_id": "w", "study_id": 0, "datetime_start": "yesterday"}',
    b'{"op_code": 4, "worker_id": "w", "study_id": 0, "datetime_start": null, "distributions": {"c": '
    b'"{\\"name\\": \\"CategoricalDistribution\\", \\"attributes\\": {\\"choices\\": [1]}}"}, "params": {"c": 5}}',
]


@pytest.fixture
def cli_in(workdir, monkeypatch):
    """``harness ARGS`` in-process in ``workdir`` (its empty MLflow store), whatever MLFLOW_*/OPTUNA_* say."""
    from harness.cli import main

    monkeypatch.chdir(workdir)
    for name in [n for n in os.environ if n.startswith(("MLFLOW_", "OPTUNA_"))]:
        monkeypatch.delenv(name)
    return lambda *args: main(["audit", "--study", "s", "--storage", "journal:j.log", *args])


# The fast tier: every line in the middle, the first at the end too (the journal's last line).
MISPLACED = list(itertools.product(BAD_OPERATIONS, ["middle", "end"]))


@pytest.mark.parametrize("bad,where", slow_cases(MISPLACED, slow=[(bad, "end") for bad in BAD_OPERATIONS[1:]]),
                         ids=[f"{i}-{where}" for i in range(len(BAD_OPERATIONS)) for where in ("middle", "end")])
def test_a_line_that_is_no_operation_is_reported_in_one_line_and_repaired(workdir, cli_in, capsys, bad, where):
    path = workdir / "j.log"
    _other_study_journal(path)
    intact, trials = path.read_bytes(), [t.params for t in _trials_of(path, "other")]
    lines = intact.splitlines(keepends=True)
    at = 6 if where == "middle" else len(lines)
    path.write_bytes(b"".join(lines[:at]) + bad + b"\n" + b"".join(lines[at:]))

    assert cli_in() == 1  # the audit alone repairs nothing, and says how
    out, err = capsys.readouterr()
    said = (out + err).strip().splitlines()
    assert "Traceback" not in out + err and said and "audit --fix" in said[0], out + err
    assert len(path.read_bytes()) == len(intact) + len(bad) + 1

    assert cli_in("--fix") == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "fixed: the journal" in out and "kept a copy" in out, out + err
    assert path.read_bytes() == intact  # every operation of both studies is kept
    [copy] = workdir.glob("j.log.torn-*")
    assert copy.read_bytes() == bad + b"\n"
    assert [t.params for t in _trials_of(path, "other")] == trials
    assert cli_in() == 0


def _trials_of(path: Path, study: str) -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=study, storage=storage).trials


def test_a_search_opening_the_journal_repairs_a_line_that_is_no_operation(tmp_path):
    from harness.search.study import open_storage

    path = tmp_path / "j.log"
    _other_study_journal(path)
    intact = path.read_bytes()
    path.write_bytes(intact + b'{"op_code": 99, "worker_id": "w"}\n' + intact.splitlines(keepends=True)[-1])
    said = []
    study = optuna.load_study(study_name="other", storage=open_storage(f"journal:{path}", notify=said.append))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_categorical("c", [1, 2]), n_trials=1)
    assert len(said) == 1 and "op_code 99" in said[0]
    assert len(_trials_of(path, "other")) == 3


def test_the_journal_s_bound_is_the_memory_its_replay_needs_not_a_fixed_size(tmp_path, monkeypatch):
    """A categorical of 60,000 choices adds ~900 KB a trial: 3 GiB is ~3,500 trials, which a machine of
    32 GiB replays; one of 8 GiB cannot, and says so in one line instead of running out of memory."""
    from harness.search import study

    path = tmp_path / "j.log"
    with open(path, "wb") as f:
        f.write(b'{"op_code":0,"worker_id":"w","study_name":"s","directions":[1]}\n')  # a journal's first line
        f.truncate(3 << 30)  # sparse: no disk is used
    monkeypatch.setattr(study, "memory_bytes", lambda: 32 << 30)
    assert study.journal_path(f"journal:{path}") == str(path)
    monkeypatch.setattr(study, "memory_bytes", lambda: 8 << 30)
    with pytest.raises(UsageError, match=f"is {3 << 30} bytes, more than this machine's {8 << 30} bytes of memory"):
        study.journal_path(f"journal:{path}")
    path.write_bytes(b"")
    assert study.journal_path(f"journal:{path}") == str(path)


# Each form is 56 refusals (~1 s): the fast tier refuses one, the whole suite all three.
@pytest.mark.parametrize("conninfo", slow_cases(["host=127.0.0.1 port=1 password=Secret{}Passw0rd",
                                                 "host=h password = 'Secret{} Passw0rd' user=u",
                                                 "dbname=x sslpassword=Secret{}Passw0rd"]))
def test_a_libpq_key_value_string_shows_no_password_where_a_url_was_expected(conninfo, capsys, tmp_path, monkeypatch):
    """libpq's other form of a connection string has no scheme: given where a URL is expected, it was
    echoed in the refusal with its password."""
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    for char in "!#$%&()*+,-./:;<>?@[]^_`{|}~":
        text = conninfo.format(char)
        shown = [redact(text), scrub(f"unknown storage scheme in {text!r}", text)]
        for argv in (["search", "--storage", text], ["cluster", "--dir", str(tmp_path / "c"), "--postgres", text]):
            assert main(argv) == 2
            shown.append(capsys.readouterr().err)
        for line in shown:
            assert "Secret" not in line and "Passw0rd" not in line, (text, line)
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("password", ["a", "ab", "\u00e9", "x9", "abc"])
@pytest.mark.parametrize("form", ["http://admin:{}@127.0.0.1:1", "https://{}@tracking",
                                  "postgresql://user:{}@db/optuna"])
def test_a_password_of_one_or_two_characters_is_not_shown_where_its_url_is(form, password):
    """Too short to hide everywhere (it would blank out ordinary words), but never beside its user in
    the URL a library prints back: the URL, and any URL-like 'user:password@' holding it."""
    url = form.format(password)
    printed = [f"API request to {url}/api/2.0/mlflow/runs/create failed with exception",
               f"connection to {url.split('://')[1]} refused", f"bad URL {url.replace('127.0.0.1:1', 'other')}"]
    for text in printed:
        shown = scrub(text, url)
        assert f":{password}@" not in shown and f"//{password}@" not in shown, shown


def test_a_password_encoded_again_elsewhere_in_its_url_is_not_shown_in_either_form():
    """A password that also sits percent-encoded (once or twice) in a query option of the same URL."""
    url = "postgresql://u:Pa%40ssw0rd!@db/optuna?options=-c%20app%3DPa%2540ssw0rd!"
    shown = scrub(f"error near 'Pa@ssw0rd!', 'Pa%40ssw0rd!', 'Pa%2540ssw0rd!' in {url}", url)
    assert "ssw0rd" not in shown and "Pa%" not in shown, shown


@pytest.mark.parametrize("url", [
    "sqlite:///mlflow.db", "sqlite:////abs/store/mlflow.db", "sqlite:///mlflow.db?timeout=30",
    "sqlite:///mlf.db?mode=rwc&password=Hunter2secretA", "sqlite:///my%20store.db", "sqlite:///a%3Fb.db?timeout=5",
    "sqlite:///sub/dir/x.db#frag", "sqlite:///x.db?check_same_thread=false&timeout=1",
])
def test_an_sqlite_url_names_the_file_sqlalchemy_opens(url):
    """Probe 8: the harness's file of an SQLite URL kept its query (``mlflow.db?timeout=30``), so its
    lock, template copy and reads went to a second file beside the one MLflow wrote, and a password in
    the query became a file name. Every form is read as SQLAlchemy reads it."""
    from sqlalchemy.engine import make_url

    from harness.urls import sqlite_path

    assert sqlite_path(url) == make_url(url).database


@pytest.mark.parametrize("url,path", [
    ("sqlite:///file:/abs/p%20q.db?mode=ro&uri=true", "/abs/p q.db"),
    ("sqlite:///file:///abs/x.db?uri=true", "/abs/x.db"),
    ("sqlite:///file://localhost/abs/x.db?uri=true", "/abs/x.db"),
    ("sqlite:///file:rel.db?uri=true&mode=ro", "rel.db"),
])
def test_an_sqlite_uri_filename_names_its_own_path(url, path):
    from harness.urls import sqlite_path

    assert sqlite_path(url) == path


@pytest.mark.parametrize("query", slow_cases(["?timeout=30", "?mode=rwc&password=Hunter2secretA"]))  # each trains
def test_a_store_url_with_a_query_is_one_store(tmp_path, query, cli_in_process):
    """Probe 8: `train` with MLFLOW_TRACKING_URI='sqlite:///mlflow.db?timeout=30' left a second store
    named 'mlflow.db?timeout=30' beside the run's, and predict and compare then found nothing."""
    import sqlite3
    from contextlib import closing

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}{query}"}
    trained = cli_in_process("train", "--epochs", "2", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr
    store_files = {"mlflow.db", "mlflow.db-shm", "mlflow.db-wal", "mlflow.db.harness-lock"}
    assert {p.name for p in tmp_path.iterdir() if p.name.startswith("mlflow.db")} <= store_files
    assert not [p for p in tmp_path.iterdir() if "?" in p.name or "Hunter2" in p.name]
    with closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        (run_id,), = db.execute("SELECT run_uuid FROM runs").fetchall()
    predicted = cli_in_process("predict", run_id, "--x", "1", cwd=tmp_path, env=env)
    assert predicted.returncode == 0 and predicted.stdout.startswith("1 -> "), predicted.stderr
    compared = cli_in_process("compare", "--mlflow-experiment", "linear_regression", cwd=tmp_path, env=env)
    assert compared.returncode == 0 and run_id in compared.stdout, compared.stderr
    assert "Hunter2" not in trained.stdout + trained.stderr + predicted.stdout + compared.stdout


UNKEPT = ["sqlite://", "sqlite:///", "sqlite:///?x=1", "sqlite:///:memory:", "sqlite:///file:x.db?mode=memory&uri=true",
          "sqlite:///file::memory:?uri=true", "sqlite:///file:mlflow.db?mode=ro&uri=true",
          "sqlite:///file:mlflow.db?immutable=1&uri=true"]


@pytest.mark.parametrize("url", UNKEPT)
@pytest.mark.parametrize("command", [["search", "--n-trials", "1", "--epochs-range", "2", "3", "--study-name", "s"],
                                     ["train", "--epochs", "2"]])
def test_a_store_url_that_keeps_no_record_is_refused_before_anything_is_written(tmp_path, url, command, cli_in_process):
    """Probe 9: in-memory SQLite URLs (and read-only ones) let a search start: its trial failed with
    "no such table", the journal kept the study and a queued retry, mlruns/ a parent's artifacts, and
    `mode=memory` or `mode=ro` left a migrated store file. Each is one line, exit 2, nothing written."""
    result = cli_in_process(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert line.startswith("harness: error: MLflow store sqlite:") and "use sqlite:///PATH" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("url", [u for u in UNKEPT if "mode=ro" not in u and "immutable" not in u])
def test_reading_an_in_memory_store_says_there_is_nothing(tmp_path, url, cli_in_process):
    result = cli_in_process("compare", "--study", "s", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"harness: error: no MLflow store at {url}: an in-memory SQLite database holds nothing to read"]
    assert not list(tmp_path.iterdir())
