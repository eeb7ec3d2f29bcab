"""`harness compare`: the top finished runs of a study, as a table and an overlay of their curves."""
from __future__ import annotations

import re

from ..schema import FINAL_TEST_LOSS


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="table and curve overlay of the best runs of a study")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--study", help="Optuna study name (runs tagged optuna.study_name)")
    scope.add_argument("--mlflow-experiment", metavar="NAME", help="every finished run of an MLflow experiment")
    p.add_argument("--top", default="5", help="how many runs (default: 5)")
    p.add_argument("--metric", default=FINAL_TEST_LOSS, help=f"rank by this metric (default: {FINAL_TEST_LOSS})")
    p.add_argument("--descending", action="store_true", help="higher is better (e.g. final_test_accuracy)")
    p.add_argument("--out", metavar="FILE", help="overlay figure (default: compare-<study>.png)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--log", action="store_true", help="log the figure to the study's parent run")
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import config
    from ..errors import UsageError

    top = config.positive_int("--top", args.top)
    if args.log and not args.study:
        raise UsageError("--log needs --study: the figure goes to the study's parent run")
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,250}", args.metric):
        raise UsageError(f"--metric {args.metric!r} is not a metric name (letters, digits, _ . - /)")
    scope = args.study or args.mlflow_experiment
    # A long or odd study name still gives a short, plain file name.
    out = args.out or f"compare-{re.sub(r'[^A-Za-z0-9_.-]+', '_', scope)[:80]}.png"
    check_output(out, "--out", figure=True)
    if args.csv:
        check_output(args.csv, "--csv")
    from .. import compare
    from ..tracking import read_client
    from ..urls import redact

    client = read_client()
    frame = compare.top_runs(client, study=args.study, mlflow_experiment=args.mlflow_experiment, metric=args.metric,
                             top=top, descending=args.descending)
    figure = compare.overlay(client, frame, f"{scope}: top {len(frame)} by {args.metric}")
    figure.savefig(out)
    shown = compare.table(frame)
    print(shown.to_string(index=False))
    print(f"curves: {out}")
    if args.csv:
        shown.to_csv(args.csv, index=False)
        print(f"table: {args.csv}")
    if args.log:
        parent = compare.parent_run_id(client, args.study)
        if parent is None:
            raise UsageError(f"study {args.study!r} has no parent run in {redact(client.tracking_uri)}")
        client.log_figure(parent, figure, f"compare_top{top}_{args.metric}.png")
        print(f"logged to parent run {parent}")
    return 0


def check_output(path: str, flag: str, figure: bool = False) -> None:
    """A file the command will write: its folder exists, it is not a folder, its format is known."""
    from pathlib import Path

    from ..errors import UsageError

    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path!r} is a directory; name a file")
    if not target.parent.is_dir():
        raise UsageError(f"{flag} {path!r}: folder {str(target.parent)!r} does not exist")
    if figure:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if target.suffix.lstrip(".").lower() not in formats:
            raise UsageError(f"{flag} {path!r}: unknown figure format {target.suffix or '(none)'!r}; allowed: "
                             f"{', '.join('.' + f for f in sorted(formats))}")
