"""`harness audit --study NAME [--fix]`: do the Optuna storage and MLflow agree?"""
from __future__ import annotations

from pathlib import Path


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

    from ..tracking import check_readable_uri, default_tracking_uri

    url = args.storage or study_module.DEFAULT_STORAGE
    check_readable_uri(default_tracking_uri())  # the two stores' URLs, before either is opened
    study_module.check_storage(url, writes=args.fix)
    from ..config import int_in

    heartbeat = int_in("--heartbeat", args.heartbeat, 1, study_module.MAX_HEARTBEAT_S)
    import optuna
    from ..tracking import read_client

    from ..search.durable.audit import audit

    journal_fixed, journal_violations, journal_notes = [], [], []
    if study_module.storage_scheme(url) == "journal":
        from ..search.durable import journal

        path = study_module.journal_path(url)
        damage = None if args.fix or not Path(path).is_file() else journal.tail_damage(path)
        if damage is not None:
            journal_violations.append(f"{damage.describe(path)}; `harness audit --fix` (or the next search) "
                                      "removes it, keeping a copy")
        journal_notes += [f"the journal was repaired before; what was removed is kept in {copy}"
                          for copy in journal.earlier_repairs(path)]
    storage = study_module.open_storage(url, must_exist=True, heartbeat=heartbeat, repair=args.fix,
                                        notify=journal_fixed.append)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UsageError(f"no study {args.study!r} in {study_module.redact(url)}; "
                         f"studies there: {', '.join(names) or 'none'}") from None
    from ..fast.mlflow_sql import DirectWriter

    client = read_client()
    if args.fix:  # every check passed: what damage the journal has is repaired before the audit writes
        study_module.repair_journal(storage)
    report = audit(study, storage, client, fix=args.fix, direct=DirectWriter.for_client(client))
    report.fixed[:0], report.violations[:0] = journal_fixed, journal_violations
    for line in journal_notes:
        print(f"note: {line}")
    for line in report.fixed:
        print(f"fixed: {line}")
    for line in report.violations:
        print(f"violation: {line}")
    verdict = "clean" if report.clean else f"{len(report.violations)} violation(s)"
    print(f"audit of study {args.study!r}: {report.checked_trials} trials, {report.checked_runs} child runs: {verdict}")
    return 0 if report.clean else 1
