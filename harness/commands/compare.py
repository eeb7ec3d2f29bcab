"""`harness compare`: the top finished runs of a study, as a table and an overlay of their curves."""
from __future__ import annotations

import re


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="table and curve overlay of the best runs of a study")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--study", help="Optuna study name (runs tagged optuna.study_name)")
    scope.add_argument("--mlflow-experiment", metavar="NAME", help="every finished run of an MLflow experiment")
    p.add_argument("--top", default="5", help="how many runs (default: 5)")
    p.add_argument("--metric", default="final_test_loss", help="rank by this metric (default: final_test_loss)")
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
    if not re.fullmatch(r"[A-Za-z0-9_.\-/ ]+", args.metric):
        raise UsageError(f"--metric {args.metric!r} is not a metric name")
    from mlflow import MlflowClient

    from .. import compare

    frame = compare.top_runs(study=args.study, mlflow_experiment=args.mlflow_experiment, metric=args.metric,
                             top=top, descending=args.descending)
    client = MlflowClient()
    scope = args.study or args.mlflow_experiment
    figure = compare.overlay(client, frame, f"{scope}: top {len(frame)} by {args.metric}")
    out = args.out or f"compare-{re.sub(r'[^A-Za-z0-9_.-]+', '_', scope)}.png"
    figure.savefig(out)
    shown = compare.table(frame)
    print(shown.to_string(index=False))
    print(f"curves: {out}")
    if args.csv:
        shown.to_csv(args.csv, index=False)
        print(f"table: {args.csv}")
    if args.log:
        parent = compare.parent_run_id(args.study)
        if parent is None:
            raise UsageError(f"study {args.study!r} has no parent run in {client.tracking_uri}")
        client.log_figure(parent, figure, f"compare_top{top}_{args.metric}.png")
        print(f"logged to parent run {parent}")
    return 0
