"""A CPU run's bits depend on torch's intra-op thread count (how its reductions are split): a run
records the count it trained with, and `harness reproduce` re-runs with it, whatever the count of
the process that re-runs it (OMP_NUM_THREADS=1 for parallel workers, or the default)."""
import sqlite3
from contextlib import closing

import pytest
import torch
from mlflow import MlflowClient

from conftest import all_runs, cli_env, run_cli
from harness import schema
from harness.cli import main
from harness.reproduce import recorded_threads

# digits: an MLP on mini-batches, whose weights here differ bit for bit between 1 and 2 threads.
TRAIN = ["train", "--experiment", "digits", "--epochs", "2", "--device", "cpu"]


@pytest.fixture
def threads():
    """Sets torch's intra-op threads for the test; the process's own count is back afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def trained_with(workdir, count: int, threads) -> str:
    threads(count)
    assert main(TRAIN) == 0
    [run] = all_runs(workdir)
    assert run.data.params[schema.TORCH_THREADS_PARAM] == str(count)
    return run.info.run_id


def rerun_of(workdir, run_id: str):
    [rerun] = [r for r in all_runs(workdir) if r.data.tags.get(schema.REPRODUCES_TAG) == run_id]
    return rerun


@pytest.mark.slow  # trainings and reproductions in-process
def test_reproduce_re_runs_with_the_thread_count_the_run_trained_with(in_workdir, threads, capsys):
    run_id = trained_with(in_workdir, 1, threads)
    threads(2)
    capsys.readouterr()
    assert main(["reproduce", run_id]) == 0
    out = capsys.readouterr()
    assert "bitwise identical" in out.out
    assert f"run {run_id} trained with 1 intra-op threads; re-running with 1, not this process's 2" in out.err
    assert torch.get_num_threads() == 2  # the caller's count, back
    assert rerun_of(in_workdir, run_id).data.params[schema.TORCH_THREADS_PARAM] == "1"


@pytest.mark.slow  # OMP_NUM_THREADS is read when a process starts: only a real one shows it
def test_a_worker_under_omp_num_threads_1_reproduces_a_run_of_two_threads(in_workdir, threads):
    run_id = trained_with(in_workdir, 2, threads)
    out = run_cli("reproduce", run_id, cwd=in_workdir, env=cli_env(OMP_NUM_THREADS="1"))
    assert out.returncode == 0 and "bitwise identical" in out.stdout, out.stderr
    assert "trained with 2 intra-op threads; re-running with 2, not this process's 1" in out.stderr
    assert rerun_of(in_workdir, run_id).data.params[schema.TORCH_THREADS_PARAM] == "2"


@pytest.mark.slow  # trainings and reproductions in-process
def test_a_run_that_recorded_no_usable_count_is_re_run_with_the_process_s_own(in_workdir, threads, capsys):
    run_id = trained_with(in_workdir, 1, threads)
    client = MlflowClient(f"sqlite:///{in_workdir / 'mlflow.db'}")
    # As a run logged before the count was recorded: MLflow keeps a param once logged, so remove it.
    with closing(sqlite3.connect(in_workdir / "mlflow.db")) as db, db:
        db.execute("DELETE FROM params WHERE run_uuid = ? AND key = ?", (run_id, schema.TORCH_THREADS_PARAM))
    assert schema.TORCH_THREADS_PARAM not in client.get_run(run_id).data.params
    threads(2)
    capsys.readouterr()
    assert main(["reproduce", run_id]) == 1  # 2 threads give other bits, and the report says why they may
    err = capsys.readouterr().err
    assert "NOT reproduced" in err and f"run {run_id} recorded no thread count" in err
    with closing(sqlite3.connect(in_workdir / "mlflow.db")) as db, db:  # tampered with: said as such
        db.execute("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                   (schema.TORCH_THREADS_PARAM, "100000", run_id))
    assert main(["reproduce", run_id]) == 1
    err = capsys.readouterr().err
    assert f"run {run_id} recorded thread count '100000', not a count from 1 to 1024" in err, err
    assert [recorded_threads({schema.TORCH_THREADS_PARAM: v}) for v in ("0", "-1", "²", "1e9", "4096", "3")] == [
        None] * 5 + [3]
