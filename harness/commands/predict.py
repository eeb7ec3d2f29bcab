"""`harness predict RUN_ID --x ...`: a logged run's model on new inputs."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="rebuild a run's model from MLflow and predict")
    p.add_argument("run_id")
    p.add_argument("--experiment", metavar="MODULE_OR_FILE",
                   help="the run's experiment, when it is a module or .py file of your own (a run's record never "
                        "chooses code to import)")
    p.add_argument("--x", nargs="+", required=True, metavar="X",
                   help="input values, flattened (a multiple of the experiment's input size)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..errors import UsageError

    values = []
    for raw in args.x:
        try:
            values.append(float(raw))
        except ValueError:
            raise UsageError(f"--x values must be numbers, got {raw!r}") from None
    from ..runs import predict
    from ..tracking import fast_read_client

    inputs, outputs = predict(args.run_id, values, client=fast_read_client(args.run_id), experiment=args.experiment)
    print("\n".join(lines(inputs, outputs)))
    return 0


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
