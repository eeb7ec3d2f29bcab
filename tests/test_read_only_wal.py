"""A read-only store whose last commits wait in its -wal file, without the -shm SQLite reads it
through (a copy taken while a writer ran): the reading commands say so in one line and how to
read it, instead of MLflow's "unable to open database file"."""
import shutil

import pytest

from conftest import snapshot
from harness import tracking
from test_read_only_store import as_reader, read_only

pytestmark = pytest.mark.slow  # the commands as a user who cannot write the folder: real processes


def test_a_store_with_a_stranded_wal_is_refused_in_one_line_that_says_how_to_read_it(tmp_path, monkeypatch):
    live, archive = tmp_path / "live", tmp_path / "archive"
    live.mkdir(), archive.mkdir()
    monkeypatch.chdir(live)
    client = tracking.open_client(f"sqlite:///{live / 'mlflow.db'}")  # WAL; its connections stay open
    run = client.create_run("0").info.run_id
    client.log_param(run, "kept", "in the wal")
    assert (live / "mlflow.db-wal").stat().st_size > 0  # the commits are not folded into the file yet
    for name in ("mlflow.db", "mlflow.db-wal"):  # the copy a backup taken meanwhile makes
        shutil.copy(live / name, archive / name)
    read_only(archive)
    before = snapshot(archive)
    env = {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    commands = (["compare", "--mlflow-experiment", "Default", "--out", str(tmp_path / "c.png")],
                ["predict", run, "--x", "1"], ["reproduce", run])
    for command, out in zip(commands, as_reader(*((command, archive, env) for command in commands))):
        assert out.returncode == 1, (command, out.stderr)
        [line] = out.stderr.strip().splitlines()
        assert line == ("harness: cannot read the MLflow store sqlite:///mlflow.db: its last commits are in "
                        "mlflow.db-wal, which SQLite reads only through a mlflow.db-shm beside it, and "
                        f"{str(archive)!r} cannot be written to make one: copy mlflow.db and mlflow.db-wal "
                        "together to a folder you can write, and read the copy"), (command, line)
    assert snapshot(archive) == before and sorted(p.name for p in archive.iterdir()) == ["mlflow.db", "mlflow.db-wal"]
    # What the line says works: the copy has the commits.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("mlflow.db", "mlflow.db-wal"):
        shutil.copy(archive / name, copy / name)
    assert tracking.read_client(f"sqlite:///{copy / 'mlflow.db'}").get_run(run).data.params == {"kept": "in the wal"}
