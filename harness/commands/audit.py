"""`harness audit --study NAME [--fix]`: do the Optuna storage and MLflow agree?"""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="check (and with --fix repair) a study's trials against its MLflow runs")
    p.add_argument("--study", required=True, help="Optuna study name")
    p.add_argument("--storage", help="Optuna storage URL (default: journal:optuna_journal.log)")
    p.add_argument("--fix", action="store_true", help="fail and retry stale trials, close stale runs")
    p.add_argument("--heartbeat", default="10", help="RDB storages: the workers' --heartbeat; with --fix, a "
                                                     "trial silent for 3x that many seconds is stale (default: 10)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..errors import UsageError
    from ..search import study as study_module

    url = args.storage or study_module.DEFAULT_STORAGE
    study_module.storage_scheme(url)
    from ..config import positive_int

    heartbeat = positive_int("--heartbeat", args.heartbeat)
    import optuna
    from mlflow import MlflowClient

    from ..audit import audit

    storage = study_module.open_storage(url, must_exist=True, heartbeat=heartbeat)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UsageError(f"no study {args.study!r} in {study_module.redact(url)}; "
                         f"studies there: {', '.join(names) or 'none'}") from None
    report = audit(study, storage, MlflowClient(), fix=args.fix)
    for line in report.fixed:
        print(f"fixed: {line}")
    for line in report.violations:
        print(f"violation: {line}")
    verdict = "clean" if report.clean else f"{len(report.violations)} violation(s)"
    print(f"audit of study {args.study!r}: {report.checked_trials} trials, {report.checked_runs} child runs: {verdict}")
    return 0 if report.clean else 1
