"""Issue 29: a run's model beyond `harness predict`'s own reader: inputs of any shape from files,
the best trial as an MLflow Model (torch.export), the Model Registry and `mlflow models serve`."""
import json

import numpy as np
import pytest
import torch

from conftest import all_runs, new_store, redirects_restored
from harness import runs
from harness.commands.predict import MAX_INPUT_BYTES


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, migrated_db):
    """A store holding one digits_cnn run (1x8x8 images, 10 classes), trained 2 epochs: (folder, run id)."""
    from harness.cli import main

    path = new_store(tmp_path_factory.mktemp("digits"), migrated_db)
    with redirects_restored(), pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
        assert main(["train", "--experiment", "digits_cnn", "--epochs", "2"]) == 0
    [run] = all_runs(path)
    return path, run.info.run_id


def images(n=3) -> np.ndarray:
    from experiments.digits_cnn import make_data

    return make_data().X_test[:n].numpy()


def test_predict_reads_image_shaped_inputs_from_npy_csv_and_json(digits_run, cli_in_process, tmp_path):
    folder, run_id = digits_run
    x = images()
    expected = runs.predict(run_id, x, client=runs_client(folder))[1]
    files = {"batch.npy": lambda p: np.save(p, x), "rows.csv": lambda p: np.savetxt(p, x.reshape(3, -1), delimiter=","),
             "nested.json": lambda p: p.write_text(json.dumps(x.tolist())),
             "served.json": lambda p: p.write_text(json.dumps({"inputs": x.tolist()}))}
    for name, write in files.items():
        write(tmp_path / name)
        out = cli_in_process("predict", run_id, "--input", tmp_path / name, cwd=folder)
        assert out.returncode == 0 and out.stderr == "", (name, out.stderr)
        printed = [[float(v) for v in line.split(" -> ")[1].split()] for line in out.stdout.splitlines()]
        assert [line.split(" -> ")[0] for line in out.stdout.splitlines()] == [f"input {i} (1x8x8)" for i in range(3)]
        assert np.allclose(printed, expected.numpy(), rtol=1e-5), name
    np.save(tmp_path / "one.npy", x[0])  # one image alone is one input
    out = cli_in_process("predict", run_id, "--input", tmp_path / "one.npy", cwd=folder)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    out = cli_in_process("predict", run_id, "--x", *x[:2].flatten().tolist(), cwd=folder)  # --x: flattened
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2


def runs_client(folder):
    from harness.tracking import read_client

    return read_client(f"sqlite:///{folder / 'mlflow.db'}")


def test_predict_refuses_input_files_that_are_not_inputs_of_the_experiment(digits_run, cli_in_process, tmp_path):
    folder, run_id = digits_run
    np.save(tmp_path / "objects.npy", np.array([{}], dtype=object))
    np.save(tmp_path / "short.npy", np.zeros((1000, 1, 8, 8), dtype=np.float32))
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:300])  # its header claims more
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5), dtype=np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    (tmp_path / "header.csv").write_text("a,b\n1,2\n")
    (tmp_path / "ragged.json").write_text("[[1, 2], [3]]")
    (tmp_path / "notes.txt").write_text("1 2 3")
    (tmp_path / "folder.json").mkdir()
    with open(tmp_path / "huge.npy", "wb") as sparse:  # costs no disk: refused by its size alone
        sparse.truncate(MAX_INPUT_BYTES + 1)
    for name, message in (("objects.npy", "is not an array of numbers"), ("short.npy", "is not an array of numbers"),
                          ("wrong.npy", "needs a multiple of 64 numbers for inputs of shape [1, 8, 8], got 10 "
                                        "(an array of shape [2, 5])"),
                          ("empty.npy", "holds no numbers"), ("text.npy", "not numbers"),
                          ("header.csv", "is not an array of numbers"), ("ragged.json", "is not an array of numbers"),
                          ("notes.txt", "a .npy, .csv, .json file is allowed"), ("folder.json", "not a regular file"),
                          ("missing.npy", "No such file"),
                          ("huge.npy", f"at most {MAX_INPUT_BYTES} allowed")):
        out = cli_in_process("predict", run_id, "--input", tmp_path / name, cwd=folder)
        assert out.returncode == 2 and message in out.stderr, (name, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == "", (name, out.stderr)
