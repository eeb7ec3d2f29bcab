"""`harness predict RUN_ID --x ... | --input FILE`: a logged run's model on new inputs."""
from __future__ import annotations

import functools
import json
import os
import stat
import warnings
from pathlib import Path

MAX_INPUT_BYTES = 64 << 20  # a file of inputs is read whole into memory: its size is bounded
# Each input is predicted and printed on a line of its own (about 1 KB of memory each on the way):
# their count is bounded too. More at once is what `mlflow models serve` or pyfunc is for.
MAX_INPUTS = 100_000
# The numbers given, counted before they are shaped into inputs (the experiment, which knows the shape,
# is loaded after): as many as a 64 MiB .npy of float32 holds, 64 MiB of memory once read.
MAX_VALUES = MAX_INPUT_BYTES // 4
INPUT_SUFFIXES = (".npy", ".csv", ".json")


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="rebuild a run's model from MLflow and predict")
    p.add_argument("run_id")
    p.add_argument("--experiment", metavar="MODULE_OR_FILE",
                   help="the run's experiment, when it is a module or .py file of your own (a run's record never "
                        "chooses code to import)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--x", nargs="+", metavar="X",
                       help="input values, flattened (a multiple of the experiment's input size)")
    given.add_argument("--input", metavar="FILE",
                       help="inputs from a file: .npy (one input of the experiment's shape, or an array of them), "
                            ".csv (one input per row, its numbers flattened) or .json (nested lists, or MLflow "
                            f"serving's {{\"inputs\": ...}}); at most {MAX_INPUT_BYTES >> 20} MiB. Either form: at most "
                            f"{MAX_INPUTS} inputs, as the experiment shapes them")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..errors import UsageError

    if args.input is not None:
        values, source = read_inputs(args.input), f"--input {args.input}"
    else:
        numbers, source = [], "--x"
        _check_count(source, len(args.x))
        for raw in args.x:
            try:
                numbers.append(float(raw))
            except ValueError:
                raise UsageError(f"--x values must be numbers, got {raw!r}") from None
        values = _float32(source, numbers)
    from ..runs import predict
    from ..fast.local_store import read_client

    inputs, outputs = predict(args.run_id, values, client=read_client(args.run_id), experiment=args.experiment,
                              source=source, max_inputs=MAX_INPUTS)
    print("\n".join(lines(inputs, outputs)))
    return 0


def read_inputs(name: str):
    """The numbers of an --input file as a float32 array; a file that is not one is a one-line UsageError."""
    import numpy as np

    from ..errors import UsageError, described
    from ..runs import too_many_inputs

    path = Path(name)
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise UsageError(f"--input {name!r}: a {', '.join(INPUT_SUFFIXES)} file is allowed")
    try:
        found = os.stat(path)  # not opened: a FIFO would block
    except OSError as exc:
        raise UsageError(f"--input {name!r}: {described(exc)}") from None
    if not stat.S_ISREG(found.st_mode):
        raise UsageError(f"--input {name!r} is not a regular file")
    if found.st_size > MAX_INPUT_BYTES:
        raise UsageError(f"--input {name!r} is {found.st_size} bytes, at most {MAX_INPUT_BYTES} allowed")
    suffix, source = path.suffix.lower(), f"--input {name!r}"
    try:
        # The refusal below says what is wrong: numpy's warnings (an empty file's) would come before it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if suffix == ".npy":
                # Memory-mapped: a header declaring more numbers than the file holds is refused, not
                # allocated; one declaring more than are allowed is refused before they are read.
                _check_npy_shape(source, path)
                mapped = np.load(path, mmap_mode="r", allow_pickle=False)
                _check_count(source, mapped.size)
                array = np.array(mapped)
            elif suffix == ".csv":
                array = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
            else:
                array = np.asarray(_json_numbers(source, path.read_text(encoding="utf-8")), dtype=np.float64)
    except UsageError:  # already says what is wrong (it is a ValueError too)
        raise
    # OverflowError: a length or number past what numpy's C types hold, whatever the reader.
    except (ValueError, TypeError, OSError, UnicodeDecodeError, EOFError, OverflowError) as exc:
        raise UsageError(f"{source} is not an array of numbers ({described(exc)})") from None
    except RecursionError:  # JSON nested past what Python's parser follows
        raise UsageError(f"{source} is nested too deep to be an array of numbers") from None
    if array.dtype.kind not in "biuf":
        raise UsageError(f"{source} holds {array.dtype} values, not numbers")
    _check_count(source, array.size)
    # A .csv holds an input a row; a .npy's or .json's rows need not be inputs (a flat array holds several
    # an input): those are counted once the experiment has shaped them (harness.runs.predict).
    if suffix == ".csv" and len(array) > MAX_INPUTS:
        raise too_many_inputs(source, len(array), MAX_INPUTS)
    return _float32(source, array)


def _check_npy_shape(source: str, path: Path) -> None:
    """Refuses a .npy whose header declares a negative length or more numbers than allowed, before numpy
    maps it (it would raise OverflowError on lengths past a C long)."""
    import math

    import numpy as np

    from ..errors import UsageError

    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        reader = {(1, 0): np.lib.format.read_array_header_1_0,
                  (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:  # version 3 (a utf-8 header): numpy reads it, bounded by the count after mapping
            return
        shape = reader(handle)[0]
    if min(shape, default=0) >= 0:
        _check_count(source, math.prod(shape))
    if not all(0 <= length <= MAX_VALUES for length in shape):  # a length past the count: beside a 0
        raise UsageError(f"{source} declares shape {shape}: lengths from 0 to {MAX_VALUES} allowed")


JSON_KINDS = {str: "a string", bool: "a boolean", type(None): "null", dict: "an object"}


def _json_numbers(source: str, text: str):
    """The nested lists of numbers a .json holds (bare, or as MLflow serving's {"inputs": ...}); anything
    else in them (a string, a boolean, NaN or Infinity) is a one-line UsageError naming it and where."""
    from ..errors import UsageError

    def constant(name: str):
        raise UsageError(f"{source} holds {name}: only finite JSON numbers are allowed")

    # Integers as floats: one past a float's range is an infinity, refused as one, not an OverflowError.
    # Cached: a file of repeated integers (zeros) holds one float object each, as it held one small int.
    loaded = json.loads(text, parse_int=functools.lru_cache(maxsize=1024)(float), parse_constant=constant)
    where = ""
    if isinstance(loaded, dict) and len(loaded) == 1 and {"inputs", "instances"} & loaded.keys():
        where, loaded = json.dumps(next(iter(loaded))), next(iter(loaded.values()))
    pending = [(loaded, where)]
    while pending:
        value, at = pending.pop()
        if type(value) is float:
            continue
        if type(value) is list:
            if not all(type(v) is float for v in value):
                pending.extend((v, f"{at}[{i}]") for i, v in reversed(list(enumerate(value))))
            continue
        raise UsageError(f"{source} holds {JSON_KINDS.get(type(value), type(value).__name__)} at "
                         f"{at or 'its top'}: only JSON numbers, in nested lists, are allowed")
    return loaded


def _float32(source: str, numbers):
    """``numbers`` as the float32 array a model takes, refused where one is not a finite float32: an
    infinity or nan given, or a number past float32's range (read as an infinity, it predicts nan)."""
    import numpy as np

    from ..errors import UsageError

    given = np.asarray(numbers, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = given.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(cast))
    if bad.size:
        value = given.flat[bad[0]]
        what = ("nan" if np.isnan(value) else f"{value:g}, beyond float32's range" if np.isfinite(value)
                else f"{value:g} (an infinity, or a number beyond float32's range)")
        raise UsageError(f"{source} holds {what}, its number {bad[0] + 1}: finite numbers within "
                         f"±{np.finfo(np.float32).max:.4g} (float32, the models' input type) are allowed")
    return cast


def _check_count(source: str, count: int) -> None:
    from ..errors import UsageError

    if count > MAX_VALUES:
        raise UsageError(f"{source} holds {count} numbers, at most {MAX_VALUES} allowed")


SHOWN = 8  # an input of more numbers than this is shown by its shape (an image), not its values


def lines(inputs, outputs) -> list[str]:
    """One line per input: its values (or its shape, when it has many) -> the model's outputs."""
    shown = []
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        left = _fmt(x.flatten().tolist()) if x.numel() <= SHOWN else f"input {i} ({'x'.join(map(str, x.shape))})"
        shown.append(f"{left} -> {_fmt(y.flatten().tolist())}")
    return shown


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.6g}" for v in values)
