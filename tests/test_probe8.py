"""The eighth outside probe's `harness predict` findings (in-process, fast tier): its bounds hold for
every form inputs come in, counted as the experiment takes them, and a refusal is one line."""
import json
import warnings

import numpy as np
import pytest

from harness.commands import predict
from harness.commands.predict import MAX_INPUTS

TOO_MANY = MAX_INPUTS + 1


def refused(cli_in_process, trained, *given):
    folder, run_id = trained
    out = cli_in_process("predict", run_id, *given, cwd=folder)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr


def write(tmp_path, name: str, values: np.ndarray):
    """``values`` in a file of the kind ``name`` ends with: one row of them, or one array."""
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, values)
    elif name.endswith(".csv"):
        path.write_text(",".join(map(str, values.ravel().tolist())) + "\n")
    else:
        path.write_text(json.dumps(values.tolist()))
    return path


# One row of numbers is as many inputs of the linear regression (one number each) as it holds.
@pytest.mark.parametrize("name", ["row.npy", "row.csv", "row.json", "--x"])
def test_inputs_are_counted_as_the_experiment_takes_them(name, trained, cli_in_process, tmp_path):
    row = np.zeros((1, TOO_MANY), dtype=np.float32)
    given = ["--x", *map(str, row.ravel().tolist())] if name == "--x" else ["--input", write(tmp_path, name, row)]
    assert f"holds {TOO_MANY} inputs, at most {MAX_INPUTS} allowed" in refused(cli_in_process, trained, *given)


@pytest.mark.parametrize("name", ["flat.npy", "flat.csv", "flat.json", "--x"])
def test_the_numbers_given_are_bounded_before_they_are_shaped(name, trained, cli_in_process, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(predict, "MAX_VALUES", 50)  # the real bound is 16 Mi numbers: as bounded, at a test's cost
    values = np.zeros(51, dtype=np.float32)
    given = ["--x", *map(str, values.tolist())] if name == "--x" else ["--input", write(tmp_path, name, values)]
    assert "holds 51 numbers, at most 50 allowed" in refused(cli_in_process, trained, *given)


def test_an_empty_csv_is_refused_in_one_line_without_numpys_warning(trained, cli_in_process, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with warnings.catch_warnings(record=True) as shown:  # pytest's capture would keep them off stderr
        warnings.simplefilter("always")
        assert "holds no numbers" in refused(cli_in_process, trained, "--input", tmp_path / "empty.csv")
    assert [str(w.message) for w in shown] == []


@pytest.mark.parametrize("name", ["big.npy", "big.csv", "big.json", "--x"])
def test_numbers_beyond_float32_are_refused_not_predicted_as_infinities(name, trained, cli_in_process, tmp_path):
    values = np.array([1e300, 2.0])
    given = ["--x", *map(str, values.tolist())] if name == "--x" else ["--input", write(tmp_path, name, values)]
    assert "beyond float32's range" in refused(cli_in_process, trained, *given)


def test_as_many_inputs_as_allowed_are_predicted(trained, cli_in_process, tmp_path):
    folder, run_id = trained
    path = write(tmp_path, "row.npy", np.arange(MAX_INPUTS, dtype=np.float32).reshape(1, -1))
    out = cli_in_process("predict", run_id, "--input", path, cwd=folder)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == MAX_INPUTS
