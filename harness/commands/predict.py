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
    for x, y in zip(inputs.tolist(), outputs.tolist()):
        print(f"{_fmt(x)} -> {_fmt(y)}")
    return 0


def _fmt(values) -> str:
    values = values if isinstance(values, list) else [values]
    return " ".join(f"{v:.6g}" for v in values)
