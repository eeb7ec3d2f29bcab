"""`harness reproduce RUN_ID`: re-run a logged run and compare bit for bit."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="re-run a logged run from its config and seed; exit 1 if anything differs")
    p.add_argument("run_id")
    p.add_argument("--experiment", metavar="MODULE_OR_FILE",
                   help="the run's experiment, when it is a module or .py file of your own (a run's record never "
                        "chooses code to import)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..reproduce import reproduce
    from ..tracking import read_client

    new_run, diffs, epochs, provenance = reproduce(read_client(), args.run_id, experiment=args.experiment)
    for line in provenance:  # before the verdict: what may explain it
        print(f"harness: {line}", file=sys.stderr)
    logged = f"re-run logged as {new_run}" if new_run else "re-run not logged: the MLflow store is read-only"
    if not diffs:
        print(f"reproduced run {args.run_id} exactly: state_dict bitwise identical, curves equal over "
              f"{epochs} epochs; {logged}")
        return 0
    print(f"run {args.run_id} NOT reproduced ({logged}):", file=sys.stderr)
    for line in diffs[:10]:
        print(f"  {line}", file=sys.stderr)
    return 1
