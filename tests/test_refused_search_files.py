"""A refused search leaves no file it made (issue 26): not the lock file of a study it found half made
(by a plain Optuna script, or a worker killed while it created the study), not an SQLite storage's
database, tables or schema lock, not the MLflow store's lock. Each refusal in-process, each storage
spelling."""
import itertools

import optuna
import pytest

from conftest import new_store, slow_cases, snapshot

STORAGES = ["journal:o.db", "sqlite:///o.db", "sqlite:////ABS/o.db?timeout=5"]


# The MLflow store is opened (put in WAL mode: its -wal and -shm) before its experiment is checked.
OPENED_STORE = ("mlflow.db", "mlflow.db-wal", "mlflow.db-shm")


def _half_made(url: str, by: str) -> None:
    """Study "s" as Optuna makes it, before the harness's attrs: empty (a plain script), or with the
    first of them (a harness worker killed while it created the study; its lock file then removed)."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(url.split(":", 1)[1]))
    else:
        storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    if by == "a killed worker":
        from harness.schema import STUDY_EXPERIMENT_SHA_ATTR

        study.set_user_attr(STUDY_EXPERIMENT_SHA_ATTR, "0" * 64)


CASES = list(itertools.product(STORAGES, ["a plain Optuna script", "a killed worker", None],
                               ["the study's own", "MLFLOW_EXPERIMENT_ID"]))


# The fast tier: a journal and an SQLite storage; the whole suite the SQLite storage's other spelling too.
@pytest.mark.parametrize("storage,by,refusal", slow_cases(CASES, slow=[c for c in CASES if c[0] == STORAGES[2]]),
                         ids=["-".join(map(str, case)) for case in CASES])
def test_a_refused_search_leaves_no_file_it_made(tmp_path, migrated_db, cli_in_process, monkeypatch, storage, by,
                                                 refusal):
    """Was: a search that found the study half made took the study's lock (made o.db.harness-lock) and was
    then refused; on an SQLite storage it opened (made) the database and its lock before any check, and
    the MLflow store's lock beside mlflow.db."""
    if by is None and refusal == "the study's own":
        pytest.skip("no study: nothing of its own refuses it")
    new_store(tmp_path, migrated_db)
    monkeypatch.chdir(tmp_path)
    url = storage.replace("/ABS", str(tmp_path))
    if by is not None:
        _half_made(url, by)
    env = {"MLFLOW_EXPERIMENT_ID": "999"} if refusal == "MLFLOW_EXPERIMENT_ID" else {}
    before = snapshot(tmp_path, exclude=OPENED_STORE)
    out = cli_in_process("search", "--study-name", "s", "--storage", url, "--n-trials", 1, "--epochs-range", 2, 3,
                         "--pruner", "none", "--models", "none", "--no-progress", cwd=tmp_path, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert snapshot(tmp_path, exclude=OPENED_STORE) == before
