"""What `harness search` prints when it ends: the study's trials, the best of them (or its Pareto
front), and where to look further."""
from __future__ import annotations

import shlex

from optuna.trial import TrialState

from ..experiment import is_builtin
from ..schema import PAIR_TRIAL_PARAM, PARETO_FRONT_CSV, RUN_ATTR
from ..tracking import default_tracking_uri, filter_value, ui_command
from ..urls import redact
from .objectives import of_study
from .summary import FRONT_SHOWN, front_shown, selected_on, top_frame


def report(study, parent_run_id: str | None, seconds: float, url: str, experiment) -> str:
    """What a search prints when it ends: its trials, the best of them, and where to look further."""
    counts = {s.name: sum(t.state == s for t in study.trials) for s in TrialState if s.is_finished()}
    lines = [f"study {study.study_name!r}: {len(study.trials)} trials "
             f"({', '.join(f'{n} {k.lower()}' for k, n in counts.items() if n)}) in storage "
             f"{redact(url)}; this run took {seconds:.1f}s"]
    if not counts.get("COMPLETE"):
        return "\n".join(lines + ["no trial completed"])
    if len(study.directions) > 1:
        return "\n".join(lines + _front_report(study, parent_run_id))
    objectives = of_study(study) or ("value",)
    top = top_frame(study, study.get_trials(deepcopy=False), 5, objectives)
    lines.append(selected_on(objectives[0], study.direction.name.lower()).replace("**", "").replace("`", ""))
    top = top.rename(columns={**{c: c.removeprefix("params_") for c in top.columns if c.startswith("params_")},
                              f"params_{PAIR_TRIAL_PARAM}": "optimizer+loss", RUN_ATTR: "mlflow run"})
    lines += ["top trials:", top.to_string(index=False, na_rep="-")]  # "-": not sampled (momentum for adam)
    best_run = study.best_trial.user_attrs.get(RUN_ATTR)
    if parent_run_id is not None:
        uri = redact(default_tracking_uri())
        where = ui_command(uri)
        lines.append(f"compare in MLflow: {where}  "
                     f"(parent run {parent_run_id}, filter: tags.optuna.study_name = "
                     f"{filter_value(study.study_name)})")
    if best_run:
        named = "" if is_builtin(experiment.reference) else f", experiment={experiment.reference!r}"
        lines.append("reload the best model: python -c \"from harness.runs import load_model; "
                     f"print(load_model('{best_run}'{named}).state_dict())\"")
    return "\n".join(lines)


def _front_report(study, parent_run_id) -> list[str]:
    """A study of two objectives: its Pareto front, and where the whole of it is."""
    objectives = of_study(study) or tuple(f"values_{i}" for i in range(len(study.directions)))
    total, shown = front_shown(study, objectives)
    shown = shown.rename(columns={
        "number": "trial", RUN_ATTR: "mlflow run", f"params_{PAIR_TRIAL_PARAM}": "optimizer+loss",
        **{c: c.removeprefix("params_") for c in shown.columns if c.startswith("params_")}})
    more = f"; all of it in {PARETO_FRONT_CSV} on the parent run" if parent_run_id is not None else ""
    lines = [f"Pareto front: {total} trial(s) that no other trial betters in both {' and '.join(objectives)}"
             f"{more}", shown.to_string(index=False, na_rep="-")]
    if total > FRONT_SHOWN:
        lines.append(f"(and {total - FRONT_SHOWN} more)")
    if parent_run_id is not None:
        lines.append(f"compare: harness compare --study {shlex.quote(study.study_name)} --front  "
                     f"(parent run {parent_run_id} in {redact(default_tracking_uri())})")
    return lines
