"""`harness compare`: the top finished runs of a study, as a table and an overlay of their curves."""
from __future__ import annotations

import re

from ..schema import FINAL_TEST_LOSS, final


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="table and curve overlay of the best runs of a study")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--study", help="Optuna study name (runs tagged optuna.study_name)")
    scope.add_argument("--mlflow-experiment", metavar="NAME", help="every finished run of an MLflow experiment")
    p.add_argument("--top", help="how many runs (default: 5; with --front, the whole front)")
    p.add_argument("--metric", help=f"rank by this metric (default: a study's objective, final_valid_loss unless it "
                                    f"names another; {FINAL_TEST_LOSS} for --mlflow-experiment)")
    p.add_argument("--descending", action="store_true", help="higher is better (e.g. final_test_accuracy)")
    p.add_argument("--by", metavar="OBJECTIVE", help="a study of two objectives: rank by this one (test_loss, "
                                                    "epochs or train_seconds, as the study has them)")
    p.add_argument("--front", action="store_true", help="a study of two objectives: only the runs on its Pareto "
                                                         "front, ranked by the first objective (or --by)")
    p.add_argument("--out", metavar="FILE", help="overlay figure (default: compare-<study>.png)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--log", action="store_true", help="log the figure to the study's parent run")
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import config
    from ..errors import UsageError

    top = config.positive_int("--top", args.top) if args.top else None if args.front else 5
    if args.log and not args.study:
        raise UsageError("--log needs --study: the figure goes to the study's parent run")
    objective = args.by is not None or args.front
    if objective:
        _check_objective_flags(args)
    metric = args.metric or FINAL_TEST_LOSS
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,250}", metric):
        raise UsageError(f"--metric {metric!r} is not a metric name (letters, digits, _ . - /)")
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
    ranking = {"metric": metric, "descending": args.descending}
    if objective:
        ranking = _objective_ranking(client, args)
    elif args.metric is None and args.study:  # what the study selected on, not the test loss
        try:
            name, direction = next(iter(compare.study_objectives(client, args.study).items()))
            ranking = {"metric": final(name) if config.per_epoch(name) else name, "descending": direction == "maximize"}
        except UsageError:
            pass  # runs of a study without a parent run: ranked by the default
    frame = compare.top_runs(client, study=args.study, mlflow_experiment=args.mlflow_experiment, top=top, **ranking)
    what = f"Pareto front, {len(frame)} runs" if args.front else f"top {len(frame)}"
    figure = compare.overlay(client, frame, f"{scope}: {what} by {ranking['metric']}")
    figure.savefig(out)
    shown = compare.table(frame)
    order = "highest" if ranking.get("descending") else "lowest"
    print(f"ranked by {ranking['metric']} ({order} first)")
    print(shown.to_string(index=False))
    print(f"curves: {out}")
    if args.csv:
        shown.to_csv(args.csv, index=False)
        print(f"table: {args.csv}")
    if args.log:
        parent = compare.parent_run_id(client, args.study)
        if parent is None:
            raise UsageError(f"study {args.study!r} has no parent run in {redact(client.tracking_uri)}")
        client.log_figure(parent, figure, f"compare_{'front' if args.front else f'top{top}'}_{ranking['metric']}.png")
        print(f"logged to parent run {parent}")
    return 0


def _check_objective_flags(args) -> None:
    """--by and --front: a study's, not with --metric or --descending (an objective has its direction)."""
    from ..errors import UsageError

    flag = "--front" if args.front else "--by"
    if args.by is not None and not args.by.strip():
        raise UsageError(f"--by {args.by!r}: name one of the study's objectives (test_loss, or its second)")
    if not args.study:
        raise UsageError(f"{flag} needs --study: objectives are a study's")
    if args.metric:
        raise UsageError(f"{flag} ranks by an objective and --metric by a metric: choose one")
    if args.descending:
        raise UsageError(f"{flag} with --descending: an objective ranks in its study's direction")


def _objective_ranking(client, args) -> dict:
    """--by and --front as top_runs' ranking: the objective's metric, its direction, the front's metrics."""
    from .. import compare, schema
    from ..errors import UsageError, did_you_mean

    objectives = compare.study_objectives(client, args.study)
    if len(objectives) < 2:
        flag = "--front" if args.front else "--by"
        raise UsageError(f"{flag}: study {args.study!r} has one objective ({', '.join(objectives)}); "
                         "rank it with --metric")
    by = args.by or next(iter(objectives))
    if by not in objectives:
        raise UsageError(f"--by {by!r}: study {args.study!r} has objectives {', '.join(objectives)}"
                         f"{did_you_mean(by, objectives)}")
    front = {schema.objective(name): direction for name, direction in objectives.items()} if args.front else None
    then = {schema.objective(name): direction == "maximize" for name, direction in objectives.items() if name != by}
    return {"metric": schema.objective(by), "descending": objectives[by] == "maximize", "front": front, "then": then}


def check_output(path: str, flag: str, figure: bool = False) -> None:
    """A file the command will write: its folder exists, it is not a folder, its format is known."""
    from pathlib import Path

    from ..errors import UsageError

    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path!r} is a directory; name a file")
    if not target.parent.is_dir():
        raise UsageError(f"{flag} {path!r}: folder {str(target.parent)!r} does not exist")
    import tempfile

    try:  # a read-only folder (an archived store's, say) is said now, not after the search of runs
        tempfile.TemporaryFile(dir=target.parent).close()
    except OSError as exc:
        raise UsageError(f"{flag} {path!r}: cannot write in folder {str(target.parent)!r} ({exc.strerror}); "
                         f"give {flag} a path in a folder you can write") from None
    if figure:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if target.suffix.lstrip(".").lower() not in formats:
            raise UsageError(f"{flag} {path!r}: unknown figure format {target.suffix or '(none)'!r}; allowed: "
                             f"{', '.join('.' + f for f in sorted(formats))}")
