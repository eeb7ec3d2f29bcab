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


@pytest.mark.slow  # a training and predictions up to the bound
def test_as_many_inputs_as_allowed_are_predicted(trained, cli_in_process, tmp_path):
    folder, run_id = trained
    path = write(tmp_path, "row.npy", np.arange(MAX_INPUTS, dtype=np.float32).reshape(1, -1))
    out = cli_in_process("predict", run_id, "--input", path, cwd=folder)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == MAX_INPUTS


# The ninth outside probe's `harness predict` findings: the same, for what the eighth's fixes left.

def npy_declaring(path, shape):
    """A .npy whose header declares ``shape``, over 64 float32 numbers (what a hand-made header may say)."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
        handle.write(np.zeros(64, dtype=np.float32).tobytes())
    return path


@pytest.mark.parametrize(("shape", "named"), [
    ((-1, 64), "declares shape (-1, 64)"), ((-1, -64), "declares shape (-1, -64)"),
    ((2**64, 64), f"holds {2**64 * 64} numbers"), ((2**64, 0), f"declares shape ({2**64}, 0)"),
    ((2**63 - 1, 0), f"declares shape ({2**63 - 1}, 0)")], ids=str)
def test_a_npy_header_declaring_lengths_numpy_cannot_map_is_refused(shape, named, trained, cli_in_process,
                                                                    tmp_path):
    path = npy_declaring(tmp_path / "declared.npy", shape)
    assert named in refused(cli_in_process, trained, "--input", path)


NOT_FINITE = ["1e400", "-1e400", "9" * 5000, "inf", "-inf", "nan"]


# argparse takes --x -1e400 (and -inf) for an option: refused, as unrecognized.
@pytest.mark.parametrize(("form", "number"), [(form, number) for form in ("--x", "row.csv") for number in NOT_FINITE
                                              if form != "--x" or not number.startswith("-")],
                         ids=lambda v: v[:8])
def test_numbers_that_are_no_finite_float32_are_refused_as_text(form, number, trained, cli_in_process, tmp_path):
    if form == "--x":
        given = ["--x", "2", number]
    else:
        (tmp_path / form).write_text(f"2,{number}\n")
        given = ["--input", tmp_path / form]
    assert "its number 2: finite numbers within" in refused(cli_in_process, trained, *given)


@pytest.mark.parametrize("text", ["[[2, 1e400]]", "[[2, -1e400]]", f"[[2, {10**400}]]", f"[2, {'9' * 5000}]",
                                  "[[2, NaN]]", "[[2, Infinity]]", "[[2, -Infinity]]"], ids=lambda t: t[:12])
def test_json_numbers_that_are_no_finite_float32_are_refused(text, trained, cli_in_process, tmp_path):
    (tmp_path / "x.json").write_text(text)
    assert "finite" in refused(cli_in_process, trained, "--input", tmp_path / "x.json")


@pytest.mark.parametrize("number", [np.inf, -np.inf, np.nan])
def test_npy_numbers_that_are_no_finite_float32_are_refused(number, trained, cli_in_process, tmp_path):
    path = write(tmp_path, "x.npy", np.array([2.0, number]))
    assert "its number 2: finite numbers within" in refused(cli_in_process, trained, "--input", path)


@pytest.mark.parametrize(("text", "named"), [
    ('[["1", 2]]', "a string at [0][0]"),
    ("[[1, 2], [true, 3]]", "a boolean at [1][0]"),
    ("[1, null]", "null at [1]"),
    ('[[1, {"a": 1}]]', "an object at [0][1]"),
    ('{"inputs": [[1, false]]}', 'a boolean at "inputs"[0][1]'),
    ('"12"', "a string at its top"),
])
def test_json_values_that_are_not_numbers_are_refused_by_kind_and_place(text, named, trained, cli_in_process,
                                                                         tmp_path):
    (tmp_path / "x.json").write_text(text)
    assert named in refused(cli_in_process, trained, "--input", tmp_path / "x.json")


# An experiment of 64 numbers an input (digits), stood in for: its inputs are counted once shaped,
# whatever the array's rows.
@pytest.mark.parametrize("name", ["flat.npy", "flat.json"])
@pytest.mark.parametrize("rows", [(-1,), (-1, 32)])
def test_flat_arrays_are_counted_as_the_experiment_shapes_them(name, rows, trained, cli_in_process, tmp_path,
                                                               monkeypatch):
    from types import SimpleNamespace

    import harness.runs

    wide = SimpleNamespace(load_data=lambda: SimpleNamespace(input_shape=(64,)))
    monkeypatch.setattr(harness.runs, "_model_and_experiment",
                        lambda client, run_id, experiment: (lambda x: x.sum(dim=1, keepdim=True), wide))
    monkeypatch.setattr(predict, "MAX_INPUTS", 10)
    folder, run_id = trained
    allowed = write(tmp_path, name, np.ones(64 * 10, dtype=np.uint8).reshape(rows))
    out = cli_in_process("predict", run_id, "--input", allowed, cwd=folder)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"input {i} (64) -> 64" for i in range(10)]
    more = write(tmp_path, "more" + name, np.ones(64 * 11, dtype=np.uint8).reshape(rows))
    assert "holds 11 inputs, at most 10 allowed" in refused(cli_in_process, trained, "--input", more)
