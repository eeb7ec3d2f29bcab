"""`harness cluster`: PostgreSQL, an MLflow tracking server and N search workers on this machine.

Starts the services on 127.0.0.1, runs the workers on one study until it holds --max-trials trials,
audits the study against its runs, and stops everything (or, with --keep-running, leaves the
services up until Ctrl-C so that `harness compare/predict/reproduce` and `mlflow ui` can use them).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..search.limits import MAX_CLUSTER_WORKERS, MAX_SERVER_WORKERS


def add_parser(sub) -> None:
    p = sub.add_parser("cluster", help="try scale-out locally: PostgreSQL + MLflow server + N search workers")
    p.add_argument("--workers", default="3",
                   help=f"search processes sharing the study, at most {MAX_CLUSTER_WORKERS} (default: 3)")
    p.add_argument("--max-trials", default="30", help="the study's cap on trials, across workers (default: 30)")
    p.add_argument("--study-name", default="cluster-search", help="Optuna study (default: cluster-search)")
    p.add_argument("--dir", default="harness-cluster", help="folder for logs and artifacts (default: harness-cluster)")
    p.add_argument("--server-workers", metavar="N",
                   help=f"mlflow server --workers: processes serving the tracking API, at most {MAX_SERVER_WORKERS} "
                        "(default: 2)")
    p.add_argument("--postgres", metavar="URL", help="use this running PostgreSQL server instead of starting one")
    p.add_argument("--keep-running", action="store_true", help="leave the services up until Ctrl-C")
    p.add_argument("search_args", nargs=argparse.REMAINDER, help="after --: more `harness search` arguments")
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import cluster, config
    from ..urls import redact

    workers = config.int_in("--workers", args.workers, 1, MAX_CLUSTER_WORKERS)
    max_trials = config.positive_int("--max-trials", args.max_trials)
    server_workers = config.int_in("--server-workers", args.server_workers or cluster.SERVER_WORKERS, 1,
                                   MAX_SERVER_WORKERS)
    extra = args.search_args[1:] if args.search_args[:1] == ["--"] else args.search_args
    # Refused now, in one line, before --dir exists.
    root = Path(args.dir).resolve()
    cluster.check_dir(root)
    check_search_args(extra, args.study_name, max_trials)
    if args.postgres is not None:  # "" too: libpq would take its defaults (the local socket, this user)
        cluster.check_server(args.postgres)
    else:
        cluster.postgres_bin()
    with cluster.services(root, args.postgres, server_workers) as (storage, tracking_uri):
        # The workers get the storage's password (the passfile it names) and the tracking server's
        # login through the environment services() set, never on their command lines.
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
        credentials = root / cluster.CREDENTIALS
        # From here on the workers may log: the databases stay (a failed start dropped them).
        print(f"PostgreSQL storage: {redact(storage)} (the runs in database {cluster.mlflow_database(storage)}; "
              "both kept after the run)\n"
              f"MLflow tracking server: {tracking_uri} (artifacts in {root / 'artifacts'}; login "
              f"{cluster.ADMIN}, its password in {credentials}, readable by you only)")
        command = [sys.executable, "-m", "harness", "search", "--storage", storage, "--study-name", args.study_name,
                   "--max-trials", str(max_trials), "--n-trials", str(max_trials), "--no-progress", *extra]
        started = time.time()
        logs = [root / f"worker-{i}.log" for i in range(workers)]
        processes = []
        for log in logs:
            with cluster.open_private(log) as out:
                processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait() for p in processes]
        except KeyboardInterrupt:
            for p in processes:
                p.terminate()
            codes = [p.wait() for p in processes]
            raise
        print(f"{workers} workers finished in {time.time() - started:.1f}s with exit statuses {codes} "
              f"(logs: {root}/worker-*.log)")
        audit = subprocess.run([sys.executable, "-m", "harness", "audit", "--study", args.study_name,
                                "--storage", storage], env=env, capture_output=True, text=True)
        print((audit.stdout + audit.stderr).strip())
        if args.keep_running:
            passfile = os.environ.get("PGPASSFILE")
            print("services are up; in another shell:\n"
                  f"  source {credentials}    # MLFLOW_TRACKING_URI and the login\n"
                  + (f"  export PGPASSFILE={passfile}    # for --storage {redact(storage)}\n" if passfile else "") +
                  f"  harness compare --study {args.study_name}    # or open {tracking_uri} in a browser, "
                  f"as {cluster.ADMIN}\n"
                  "press Ctrl-C to stop them")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0 if audit.returncode == 0 and not any(codes) else 1


# What the cluster gives its workers itself, as argparse names the flags' values.
OWNED = tuple(flag.replace("-", "_") for flag in ("storage", "study-name", "max-trials", "n-trials"))
_UNSET = object()


def check_search_args(extra: list[str], study_name: str, max_trials: int) -> None:
    """The workers' `harness search` arguments, checked as the workers would check them, before
    anything is started: a bad one is one line and exit 2 here, not N failing workers beside running
    services; and none may take over what the cluster sets (the storage with a password on every
    worker's command line, a cap the cluster would not hold)."""
    import tempfile

    from ..errors import UsageError
    from ..search.options import SearchOptions
    from . import Parser
    from . import search as search_command

    parser = Parser(prog="harness cluster ... --")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    search_command.add_parser(sub)
    sub.choices["search"].set_defaults(**{name: _UNSET for name in OWNED})
    checked = parser.parse_args(["search", *extra])
    taken = [name for name in OWNED if getattr(checked, name) is not _UNSET]
    if taken:
        flag = "--" + taken[0].replace("_", "-")
        raise UsageError(f"{flag} after --: harness cluster sets its workers' {flag} itself (its own --max-trials "
                         "and --study-name; the storage it starts or --postgres)")
    with tempfile.TemporaryDirectory(prefix="harness-cluster-check-") as scratch:
        checked.storage, checked.study_name = f"journal:{scratch}/check.log", study_name
        checked.max_trials = checked.n_trials = str(max_trials)
        SearchOptions.from_args(checked)
