"""Bad input by class, through the CLI as a user types it: one line, the right exit status, no
traceback, no password, and nothing written to either store. The matrices run in-process (an
interpreter's start costs more than a refusal); a real process checks each behaviour once."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conftest
from conftest import all_runs, cli_env, client_for, copy_store, main_in, new_store, run_cli


SECRET = "S3cr3tPw"
SHORT = ["--epochs-range", "5", "10", "--no-progress"]


def one_line_error(out, status=2):
    assert out.returncode == status, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = [l for l in out.stderr.strip().splitlines() if not l.startswith(("20", "INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("harness: "), out.stderr
    return lines[0]


# ---- passwords, in every form a URL can carry one -------------------------------------------------

PASSWORD_URLS = [
    f"postgresql://user:{SECRET}@127.0.0.1:9/db",
    "postgresql://user:S3c/r3tPw@127.0.0.1:9/db",  # an unencoded '/'
    "postgresql://user:S3c%2Fr3tPw@127.0.0.1:9/db",  # an encoded one (S3c/r3tPw once decoded)
    f"postgresql://user@127.0.0.1:9/db?password={SECRET}",
    f"postgresql://user@127.0.0.1:9/db?sslmode=disable&password={SECRET}&connect_timeout=2",
    "postgresql://user:S3c@r3tPw@127.0.0.1:9/db",  # an unencoded '@': refused before any driver sees it
    f"mysql://user:{SECRET}@127.0.0.1:9/db",
]
HTTP_URLS = [f"http://user:{SECRET}@127.0.0.1:9", f"https://{SECRET}@127.0.0.1:9", "http://u:S3c/r3tPw@127.0.0.1:9",
             f"http://127.0.0.1:9/?token={SECRET}"]


def leaked(out) -> bool:
    text = out.stdout + out.stderr
    return any(s in text for s in (SECRET, "S3c/r3tPw", "r3tPw", "S3c%2Fr3tPw"))


# MLflow retrying an HTTP URL that refuses is not what the in-process cases check (seconds each): the
# real process keeps the harness's own retry defaults, and shows that they end in well under a minute.
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}


@pytest.mark.slow  # two real processes
def test_no_password_is_ever_printed(tmp_path, cli_in_process):
    cases = [(["search", "--storage", url, "--n-trials", 1, *SHORT], {}) for url in PASSWORD_URLS]
    cases += [([cmd, *args], {"MLFLOW_TRACKING_URI": url}) for url in HTTP_URLS + PASSWORD_URLS[:4]
              for cmd, args in (("train", ["--epochs", 2]), ("search", ["--n-trials", 1, *SHORT]))]
    cases += [(["compare", "--study", "x"], {"MLFLOW_TRACKING_URI": url}) for url in HTTP_URLS[:2] + PASSWORD_URLS[:2]]
    # A real process for a storage URL and a tracking URI: what a user's terminal shows of it, logging included.
    real = {0, len(PASSWORD_URLS)}
    for number, (args, env) in enumerate(cases):
        started = time.time()
        if number in real:
            out = run_cli(*args, cwd=tmp_path, env=cli_env(**env), timeout=120)
        else:
            out = cli_in_process(*args, cwd=tmp_path, env={**NO_RETRIES, **env})
        assert time.time() - started < 60, (args, env)  # no minutes of retries
        assert out.returncode in (1, 2), (args, env, out.stderr)
        assert not leaked(out), (args, env, out.stderr)
        one_line_error(out, out.returncode)
    assert list(tmp_path.iterdir()) == []  # neither store was created


@pytest.mark.slow
def test_a_password_in_a_storage_url_is_never_stored(workdir, cli_in_process):
    """In-process (was a process): test_no_password_is_ever_printed shows a storage URL's refusal from one."""
    out = cli_in_process("search", "--storage", f"sqlite:///optuna.db?password={SECRET}", "--n-trials", 1, *SHORT,
                         cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert not leaked(out)
    [parent] = [r for r in all_runs(workdir) if r.data.tags.get("harness.role") == "study"]
    assert parent.data.tags["optuna.storage"] == "sqlite:///optuna.db?password=***"
    assert SECRET.encode() not in (workdir / "mlflow.db").read_bytes()


# ---- values past what the libraries take, unbounded and odd input ----------------------------------

@pytest.mark.parametrize("args,expected", [
    (["search", "--seed", 2 ** 32], "--seed must be at most 4294967295"),
    (["search", "--heartbeat", "99999999999999999999"], "--heartbeat must be at most 3600"),
    (["search", "--heartbeat", 2 ** 40], "--heartbeat must be at most 3600"),
    (["train", "--epochs", "99999999999999999999"], "epochs must be at most 10000000"),
    (["search", "--epochs-range", "20", "99999999999999999999"], "at most 10000000"),
    (["train", "--epochs", "²"], "epochs must be a positive integer"),
    (["search", "--storage", "journal:"], "needs a file path"),
    (["search", "--storage", "journal:/tmp"], "is not a regular file"),
    (["search", "--storage", "journal:/dev/zero"], "is not a regular file"),
    (["search", "--storage", "sqlite:///:memory:"], "in-memory SQLite"),
    (["search", "--storage", "sqlite://"], "in-memory SQLite"),
    (["search", "--storage", "sqlite:////dev/zero"], "not a regular file"),
    (["search", "--storage", "sqlite:///missing/dir/o.db"], "does not exist"),
    (["search", "--storage", "journal:/missing/dir/j.log"], "is not a directory"),
    (["search", "--study-name", "x" * 5000], "at most 250 printable characters"),
    (["search", "--study-name", "a'b\"c"], "holds both"),
    (["search", "--models", "every"], "--models 'every': one of best, all, none"),
    (["search", "--models", "none", "--register", "champ"], "not with --models none"),
    (["audit", "--study", "x", "--storage", "journal:/dev/zero"], "is not a regular file"),
    (["train", "--config", "/dev/zero"], "is not a regular file"),
    (["search", "--space", "/dev/zero"], "is not a regular file"),
    (["train", "--experiment", "../../etc/passwd"], "does not exist"),
    (["train", "--experiment", "/etc/passwd"], "must be a .py file"),
    (["compare", "--study", "x", "--metric", "a b"], "is not a metric name"),
    (["compare", "--study", "x", "--out", "foo.xyz"], "unknown figure format"),
    (["compare", "--study", "x", "--out", "/missing/dir/x.png"], "does not exist"),
    (["compare", "--study", "x", "--csv", "/missing/dir/x.csv"], "does not exist"),
    (["compare", "--study", "x", "--out", "."], "is a directory"),
])
def test_bad_values_get_one_line_and_write_nothing(tmp_path, args, expected, cli_in_process):
    out = cli_in_process(args[0], *(SHORT if args[0] == "search" else []), *args[1:], cwd=tmp_path)  # the case's flags win
    line = one_line_error(out)
    assert expected in line, line
    assert list(tmp_path.iterdir()) == []


# SQLite URLs whose driver options SQLAlchemy or sqlite3 refuse on connecting, or whose path decodes
# to no UTF-8: refused whole before either store, or a lock file beside one, is made.
BAD_SQLITE = ["sqlite:///s.db?uri=maybe", "sqlite:///s.db?timeout=abc", "sqlite:///file:s.db?uri=true#x",
              "sqlite:///s%FF.db", "sqlite:///s.db?detect_types=x", "sqlite:///s.db?check_same_thread=perhaps"]
SQLITE_PATHS = [("search", "storage"), ("search", "tracking"), ("train", "tracking")]


@pytest.mark.parametrize("command, store, url", conftest.slow_cases(
    [(command, store, url) for url in BAD_SQLITE for command, store in SQLITE_PATHS],
    slow=[(c, s, u) for u in BAD_SQLITE[1:] for c, s in SQLITE_PATHS]))
def test_an_sqlite_url_its_driver_refuses_gets_one_line_and_makes_nothing(tmp_path, command, store, url,
                                                                         cli_in_process):
    args = [command, *(SHORT + ["--n-trials", 1, "--pruner", "none"] if command == "search" else ["--epochs", 1])]
    if store == "storage":
        out = cli_in_process(*args, "--storage", url, cwd=tmp_path)
    else:
        out = cli_in_process(*args, *(["--storage", "journal:j.log"] if command == "search" else []), cwd=tmp_path,
                             env={"MLFLOW_TRACKING_URI": url})
    assert "SQLite can open" in one_line_error(out) or "no UTF-8" in one_line_error(out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_bad_value_gets_one_line_and_writes_nothing_from_a_real_process(tmp_path):
    """The matrix above as a user's process shows it: exit 2, one line on stderr, nothing written."""
    out = run_cli("search", *SHORT, "--seed", 2 ** 32, cwd=tmp_path)
    assert "--seed must be at most 4294967295" in one_line_error(out)
    assert out.stdout == "" and list(tmp_path.iterdir()) == []


def test_read_commands_never_create_a_store(tmp_path, cli_in_process):
    for args in (["compare", "--study", "x"], ["predict", "abc", "--x", 1], ["reproduce", "abc"]):
        line = one_line_error(cli_in_process(*args, cwd=tmp_path))
        assert "no MLflow store at sqlite:///mlflow.db" in line
        out = cli_in_process(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/missing/x.db"})
        assert "no MLflow store" in one_line_error(out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_read_command_never_creates_a_store_from_a_real_process(tmp_path):
    """The check above as a user's process shows it."""
    assert "no MLflow store at sqlite:///mlflow.db" in one_line_error(run_cli("compare", "--study", "x", cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def searched(tmp_path_factory, migrated_db):
    """A finished small search to damage copies of: in-process (was a process; the tests read it with
    processes of their own)."""
    path = tmp_path_factory.mktemp("searched")
    new_store(path, migrated_db)
    assert main_in(path, "search", "--n-trials", 2, "--study-name", "it's", *SHORT) == 0
    return path


def _copy(searched, tmp_path) -> Path:
    return copy_store(searched, tmp_path / "copy")


@pytest.mark.slow
def test_a_study_name_with_a_quote_is_found_and_its_printed_filter_parses(searched, tmp_path, cli_in_process):
    """On a copy (compare and the search wrote into the shared store that other tests copy), in-process
    (were processes): a quote is the command line's either way."""
    workdir = _copy(searched, tmp_path)
    out = cli_in_process("compare", "--study", "it's", "--out", "c.png", cwd=workdir)
    assert out.returncode == 0 and len(out.stdout.splitlines()) >= 3, out.stderr
    from harness.tracking import filter_value

    client = client_for(workdir)
    quoted = filter_value("it's")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.optuna.study_name = {quoted}")
    assert len(runs) == 3 and {r.data.tags["optuna.study_name"] for r in runs} == {"it's"}
    hint = next(line for line in cli_in_process("search", "--n-trials", 1, "--study-name", "it's", *SHORT, cwd=workdir)
                .stdout.splitlines() if "filter: " in line)
    printed = hint.split("filter: ", 1)[1].rstrip(")")
    assert len(client.search_runs([runs[0].info.experiment_id], filter_string=printed)) == 4


def _trial_run(workdir) -> str:
    return next(r.info.run_id for r in all_runs(workdir) if r.info.status == "FINISHED"
                and r.info.run_name.startswith("trial-"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["wrong keys", "a list", "missing", "not a tensor file"])
def test_a_damaged_state_dict_gets_one_line_and_reproduce_leaves_no_re_run(searched, tmp_path, cli_in_process, damage):
    workdir = _copy(searched, tmp_path)
    # One damage as a user's process shows it (predict); the rest in-process (were real processes too).
    real = run_cli if damage == "not a tensor file" else cli_in_process
    run_id = _trial_run(workdir)
    from urllib.parse import urlparse

    path = Path(urlparse(client_for(workdir).get_run(run_id).info.artifact_uri).path) / "state_dict.pt"
    assert path.is_file()
    if damage == "wrong keys":
        torch.save({"other": torch.zeros(1)}, path)
    elif damage == "a list":
        torch.save([1, 2, 3], path)
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"not a zip file at all")
    runs_before = len(all_runs(workdir))
    one_line_error(real("predict", run_id, "--x", 1, cwd=workdir), 1)
    one_line_error(cli_in_process("reproduce", run_id, cwd=workdir), 1)
    assert len(all_runs(workdir)) == runs_before  # no re-run left behind
    out = cli_in_process("audit", "--study", "it's", cwd=workdir)
    assert out.returncode == 1 and "trial" in out.stdout and run_id in out.stdout, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["malformed pages", "not a database", "read-only"])
def test_a_store_that_cannot_be_read_gets_one_line(searched, tmp_path, cli_in_process, damage):
    workdir = _copy(searched, tmp_path)
    # "not a database" as a user's process shows it, once (compare; the others were real processes too).
    real = run_cli if damage == "not a database" else cli_in_process
    run_id = _trial_run(workdir)
    db = workdir / "mlflow.db"
    for extra in ("mlflow.db-wal", "mlflow.db-shm"):
        (workdir / extra).unlink(missing_ok=True)
    if damage == "malformed pages":
        with db.open("r+b") as f:
            size = db.stat().st_size
            for offset in range(4096, size, 4096):  # every page but the first (the schema): all reads fail
                f.seek(offset)
                f.write(os.urandom(2048))
    elif damage == "not a database":
        db.write_bytes(os.urandom(65536))
    for args in (["compare", "--study", "it's", "--out", str(tmp_path / "c.png")], ["audit", "--study", "it's"],
                 ["predict", run_id, "--x", "1"]):
        if damage == "read-only":
            cmd = [sys.executable, "-m", "harness", *args]
            if os.geteuid() == 0:  # root writes anywhere: drop to nobody, as a user on a shared store is
                shutil.chown(tmp_path, "nobody")
                cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
            for p in [workdir, *workdir.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
            out = subprocess.run(cmd, cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=300)
            assert "Traceback" not in out.stderr, out.stderr
            # Reading works, or one line says why not (exit 2 where it is the journal given that this user
            # cannot reach: a path it cannot use, as a folder or a FIFO is).
            assert out.returncode in (0, 1) or (out.returncode == 2 and "Optuna journal" in out.stderr), out.stderr
            continue
        out = (real if args[0] == "compare" else cli_in_process)(*args, cwd=workdir)
        assert out.returncode in (1, 2) and "Traceback" not in out.stderr, out.stderr
        assert "does not exist" not in out.stdout + out.stderr  # a broken store is not a missing run


@pytest.mark.slow
def test_an_experiment_module_on_the_python_path_runs_under_its_own_name(workdir, cli_in_process, monkeypatch):
    source = (Path(__file__).resolve().parents[1] / "experiments" / "linear_regression.py").read_text()
    (workdir / "myexp.py").write_text(source.replace('name="linear_regression"', 'name="other_name"')
                                      + "\nopen('imported', 'w').close()\n")
    out = run_cli("search", "--experiment", "myexp", "--n-trials", 2, *SHORT, cwd=workdir,
                  env=cli_env(PYTHONPATH=str(workdir)))
    assert out.returncode == 0, out.stderr
    [parent] = [r for r in all_runs(workdir) if r.data.tags.get("harness.role") == "study"]
    assert parent.info.run_name == "other_name-search" and parent.info.status == "FINISHED"
    # The run's record names "myexp", which looks like a bundled experiment's name: it is still not
    # imported unless the user names it, even with the module right there on the path.
    best = parent.data.tags["best_run_id"]
    (workdir / "imported").unlink()
    # The predictions in-process (were processes), the module as importable as PYTHONPATH made it.
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.delitem(sys.modules, "myexp", raising=False)  # what predict imports goes with the test
    out = cli_in_process("predict", best, "--x", 1, cwd=workdir)
    assert "never chooses code" in one_line_error(out) and not (workdir / "imported").exists()
    out = cli_in_process("predict", best, "--x", 1, "--experiment", "myexp", cwd=workdir)
    assert out.returncode == 0 and (workdir / "imported").exists(), out.stderr


# Ids int() reads but SQLite keeps as text (MLflow finds experiment 1 or 0, then fails the first run).
BAD_EXPERIMENT_IDS = ["١", "٠", "1_0", "0١"]


@pytest.mark.parametrize("command, wanted", conftest.slow_cases(
    [("search", "١"), ("train", "٠")] + [(c, w) for w in BAD_EXPERIMENT_IDS[2:] for c in ("search", "train")],
    slow=[(c, w) for w in BAD_EXPERIMENT_IDS[2:] for c in ("search", "train")]))
def test_an_experiment_id_mlflow_would_fail_on_is_refused_before_anything_is_written(tmp_path, migrated_db, command,
                                                                                   wanted, cli_in_process):
    new_store(tmp_path, migrated_db)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--n-trials", 1, *SHORT, "--pruner", "none", "--storage", "journal:j.log"] if command == "search" else ["--epochs", 1]
    out = cli_in_process(command, *args, cwd=tmp_path, env={"MLFLOW_EXPERIMENT_ID": wanted})
    assert "MLFLOW_EXPERIMENT_ID" in one_line_error(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert all_runs(tmp_path) == []


@pytest.mark.parametrize("wanted", ["00", " 0", "+0"])
@pytest.mark.slow
def test_an_experiment_id_mlflow_reads_as_an_integer_still_logs(tmp_path, migrated_db, wanted, cli_in_process):
    new_store(tmp_path, migrated_db)
    out = cli_in_process("train", "--epochs", 1, cwd=tmp_path, env={"MLFLOW_EXPERIMENT_ID": wanted})
    assert out.returncode == 0, out.stderr
    assert [run.info.experiment_id for run in all_runs(tmp_path)] == ["0"]
    assert "#/experiments/0/runs/" in out.stdout + out.stderr  # the link names the id as the store keeps it
