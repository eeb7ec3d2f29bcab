"""A new MLflow store made from the template (harness/store_template.py) is the store MLflow makes,
and a template that is anything but a good one is never used."""
import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from mlflow import MlflowClient

from harness import compat, store_template, tracking


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "harness"


def dump(path) -> dict:
    """Every table's rows and the whole schema, with what differs by place and time made equal."""
    with closing(sqlite3.connect(path)) as db:
        out = {"schema": sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))}
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            out[table] = sorted(map(tuple, db.execute(f"SELECT * FROM {table}")), key=repr)
        out["experiments"] = [(i, name, os.path.relpath(location), stage, workspace)  # MLflow's: ./mlruns
                              for i, name, location, stage, _, _, workspace in out["experiments"]]
        out["journal_mode"] = db.execute("PRAGMA journal_mode").fetchone()
    return out


@pytest.mark.slow
def test_a_store_made_from_the_template_is_the_store_mlflow_makes(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = []
    real = store_template.start_from_template
    monkeypatch.setattr(store_template, "start_from_template", lambda store: made.append(real(store)) or made[-1])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    tracking.open_client(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")  # MLflow's migrations; the template saved
    assert made == [False] and len(list(cache.iterdir())) == 1
    client = tracking.open_client(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    assert made == [False, True]
    assert dump(tmp_path / "a" / "mlflow.db") == dump(tmp_path / "b" / "mlflow.db")
    assert (tmp_path / "a" / "mlflow.db").stat().st_mode == (tmp_path / "b" / "mlflow.db").stat().st_mode
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())
    # and it takes runs as any store does, their artifacts beside it
    run = client.create_run("0").info
    client.log_metric(run.run_id, "loss", 0.5)
    assert client.get_run(run.run_id).data.metrics == {"loss": 0.5}
    assert run.artifact_uri.startswith(str(tmp_path / "mlruns"))
    assert dump(cache / os.listdir(cache)[0])["runs"] == []  # the template itself stays empty


@pytest.fixture(scope="module")
def suite_template(tmp_path_factory) -> Path:
    """The template of the suite's own cache (conftest), made by MLflow's migrations at most once."""
    tracking.open_client(f"sqlite:///{tmp_path_factory.mktemp('first') / 'first.db'}")
    assert store_template.path().is_file()
    return store_template.path()


@pytest.fixture
def good_template(suite_template, cache) -> Path:
    """A good template in the test's own cache: a copy of the suite's (each test making its own ran
    MLflow's migrations, seconds; test_a_store_made_from_the_template_is_the_store_mlflow_makes
    checks that a first store saves one)."""
    cache.mkdir(mode=0o700, parents=True)
    template = cache / suite_template.name
    shutil.copy2(suite_template, template)
    return template


def bad_templates(template, tmp_path):
    """The template replaced by each thing that is not a good one (and a note of what it is)."""
    good = template.read_bytes()

    def edited(name: str, sql: str):
        """A good template changed by one SQL statement."""
        def case():
            template.write_bytes(good)
            with closing(sqlite3.connect(template)) as db:
                db.execute(sql)
                db.commit()
        case.__name__ = name
        return case

    other_revision = edited("other_revision", "UPDATE alembic_version SET version_num = 'ffffffffffff'")
    holds_an_experiment = edited("holds_an_experiment",
                                 "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, "
                                 "workspace) VALUES (7, 'planted', '/somewhere/else', 'active', 'default')")
    # every metric of every later store would read 42 (third probe)
    a_trigger_added = edited("a_trigger_added",
                             "CREATE TRIGGER poison AFTER INSERT ON metrics BEGIN UPDATE metrics SET value = 42; END")
    a_row_added = edited("a_row_added", "INSERT INTO workspaces (name, description) VALUES ('planted', 'x')")

    def too_large():
        template.write_bytes(good)
        with open(template, "r+b") as handle:
            handle.truncate(store_template.MAX_BYTES + 1)  # sparse: costs nothing to make

    def writable_by_others():
        template.write_bytes(good)
        template.chmod(0o666)

    def in_a_folder_others_may_write():
        template.write_bytes(good)
        template.parent.chmod(0o777)

    def garbage():
        template.parent.chmod(0o700)
        template.write_bytes(b"not a database" * 100)

    def link():
        other = tmp_path / "elsewhere.db"
        other.write_bytes(good)
        template.symlink_to(other)

    def fifo():
        os.mkfifo(template)

    def folder():
        template.mkdir()

    def other_owner():
        template.write_bytes(good)
        os.chown(template, 65534, 65534)

    cases = [other_revision, holds_an_experiment, a_trigger_added, a_row_added, writable_by_others,
             in_a_folder_others_may_write, too_large, garbage, link, fifo, folder]
    if os.getuid() == 0:  # only root can give a file away
        cases.append(other_owner)
    for case in cases:
        if template.is_dir() and not template.is_symlink():
            template.rmdir()
        elif template.exists() or template.is_symlink():
            template.unlink()
        case()
        yield case.__name__


@pytest.mark.slow
def test_a_template_that_is_not_a_good_one_is_never_used(tmp_path, good_template, monkeypatch):
    monkeypatch.chdir(tmp_path)
    template = good_template
    for n, case in enumerate(bad_templates(template, tmp_path)):
        store = tmp_path / f"store-{n}.db"
        assert store_template.start_from_template(str(store)) is False, case
        assert not store.exists() and [p.name for p in tmp_path.glob(".store-*")] == [], case
    # With one in place (here: a FIFO, that nothing may open), MLflow makes the store and a good
    # template is saved over the bad one.
    template.rmdir() if template.is_dir() and not template.is_symlink() else template.unlink()
    os.mkfifo(template)
    client = tracking.open_client(f"sqlite:///{tmp_path / 'store.db'}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert dump(tmp_path / "store.db")["experiments"][0][2] == os.path.join("mlruns", "0")
    assert template.is_file() and store_template.is_the_empty_store(template)


@pytest.mark.slow
def test_no_template_is_used_or_kept_on_an_mlflow_release_the_harness_was_not_checked_on(
        tmp_path, cache, good_template, monkeypatch):
    monkeypatch.setattr(compat, "MLFLOW_TESTED", ("0.0.0",))
    monkeypatch.setattr(compat, "_said", {"mlflow"})
    assert not store_template.usable(str(tmp_path / "new.db"))
    for template in cache.iterdir():
        template.unlink()
    tracking.open_client(f"sqlite:///{tmp_path / 'new.db'}")
    assert list(cache.iterdir()) == []


@pytest.mark.slow  # MLflow's own migrations build the store: ~5 s of the fast tier's 60
def test_a_cache_folder_that_cannot_be_written_changes_nothing(tmp_path, monkeypatch):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    client = tracking.open_client(f"sqlite:///{tmp_path / 'new.db'}")
    assert [e.name for e in client.search_experiments()] == ["Default"]


def test_a_store_that_exists_or_is_not_a_plain_file_is_never_touched(tmp_path, good_template):
    (tmp_path / "there.db").write_bytes(b"")
    for store in ("there.db", ":memory:", "file:x.db?mode=ro", "no-such-folder/x.db"):
        assert not store_template.usable(store if store.startswith((":", "file:")) else str(tmp_path / store)), store
    assert (tmp_path / "there.db").read_bytes() == b""
    assert store_template.usable(str(tmp_path / "fresh.db"))  # where a store may start from the template
