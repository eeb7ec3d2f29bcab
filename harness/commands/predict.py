"""`harness predict RUN_ID --x ... | --input FILE`: a logged run's model on new inputs."""
from __future__ import annotations

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
                mapped = np.load(path, mmap_mode="r", allow_pickle=False)
                _check_count(source, mapped.size)
                array = np.array(mapped)
            elif suffix == ".csv":
                array = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
            else:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict) and len(loaded) == 1 and {"inputs", "instances"} & loaded.keys():
                    loaded = next(iter(loaded.values()))
                array = np.asarray(loaded, dtype=np.float64)
    except (ValueError, TypeError, OSError, UnicodeDecodeError, EOFError) as exc:
        raise UsageError(f"{source} is not an array of numbers ({described(exc)})") from None
    except RecursionError:  # JSON nested past what Python's parser follows
        raise UsageError(f"{source} is nested too deep to be an array of numbers") from None
    if array.dtype.kind not in "biuf":
        raise UsageError(f"{source} holds {array.dtype} values, not numbers")
    _check_count(source, array.size)
    if array.ndim and len(array) > MAX_INPUTS:  # rows are inputs; a flat row is counted once shaped
        raise too_many_inputs(source, len(array), MAX_INPUTS)
    return _float32(source, array)


def _float32(source: str, numbers):
    """``numbers`` as the float32 array a model takes, refused where one is beyond float32's range
    (it would be predicted as an infinity)."""
    import numpy as np

    from ..errors import UsageError

    given = np.asarray(numbers, dtype=np.float64)
    with np.errstate(over="ignore"):
        cast = given.astype(np.float32)
    if np.isinf(cast).sum() != np.isinf(given).sum():
        raise UsageError(f"{source} holds numbers beyond float32's range (±{np.finfo(np.float32).max:.4g}), "
                         "the models' input type")
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
