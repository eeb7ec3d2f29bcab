"""A study's end-of-invocation record on its parent run: best trial (with two objectives, the Pareto
front), trials table, Optuna's plots."""
from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from .. import schema, tracking
from ..experiment import is_builtin
from ..schema import METRICS_ATTR, PROGRESS_ATTR, RUN_ATTR
from .objectives import DEFAULT
from .experimental import experimental_ok

FRONT_SHOWN = 10  # rows of the Pareto front in the parent run's description


def summarize(study) -> dict[str, Any]:
    from optuna.trial import TrialState

    summary: dict[str, Any] = {"study_name": study.study_name, schema.N_TRIALS: len(study.trials)}
    if len(study.directions) == 1 and any(t.state == TrialState.COMPLETE for t in study.trials):
        best = study.best_trial
        summary.update({schema.BEST_VALUE: best.value, schema.BEST_TRIAL_NUMBER: best.number,
                        schema.BEST_PARAMS_TAG: best.params, schema.BEST_RUN_TAG: best.user_attrs.get(RUN_ATTR)})
    return summary


def trials_frame(study):
    """``study.trials_dataframe()`` with each trial's run id as ``mlflow_run_id``."""
    frame = study.trials_dataframe()
    column = f"user_attrs_{RUN_ATTR}"
    frame[RUN_ATTR] = frame.pop(column) if column in frame else None
    # How far a trial had got while it ran (search.status): the live description's, not a result.
    return frame.drop(columns=f"user_attrs_{PROGRESS_ATTR}", errors="ignore")


def trials_csv(study) -> bytes:
    return _csv(trials_frame(study))


def front_frame(study, objectives: tuple[str, ...]):
    """The study's Pareto front (``study.best_trials``), sorted by the first objective: each trial's
    number, run, values by objective name and params (as ``trials.csv`` names them)."""
    import pandas as pd

    rows = [{"number": t.number, RUN_ATTR: t.user_attrs.get(RUN_ATTR), **dict(zip(objectives, t.values)),
             **{f"params_{k}": v for k, v in sorted(t.params.items())}} for t in study.best_trials]
    frame = pd.DataFrame(rows, columns=None if rows else ["number", RUN_ATTR, *objectives])
    return frame.sort_values([*objectives, "number"], kind="stable").reset_index(drop=True)


def front_csv(study, objectives: tuple[str, ...]) -> bytes | None:
    """``front_frame`` as CSV for a study with two objectives; None for one of one."""
    return _csv(front_frame(study, objectives)) if len(study.directions) > 1 else None


def _csv(frame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def describe(study, experiment, experiment_id: str, params: dict[str, str], top: int = 5,
             objectives: tuple[str, ...] = DEFAULT, running: list[str] = ()) -> str:
    """The parent run's description (Markdown on its page in `mlflow ui`): what the study searches, how
    far it got, its best trials with links to their runs, and the commands to compare, reload and
    reproduce the best (with two objectives, its Pareto front). Rewritten at the end of each invocation;
    while trials train, with ``running`` (search.status: the running trials) after how far it got."""
    from datetime import datetime, timezone

    from optuna.trial import TrialState

    name = study.study_name
    trials = study.get_trials(deepcopy=False)
    counts = [f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in TrialState
              if any(t.state == s for t in trials)]
    settings = " · ".join(f"{key.split('.', 1)[1].replace('_', ' ')} {value}" for key, value in params.items()
                          if key.startswith("study."))
    space = " · ".join(f"{key.split('.', 1)[1]} {value}" for key, value in params.items() if key.startswith("space."))
    lines = [f"### Optuna study `{name}`",
             f"Experiment **{experiment.name}** · {settings}", "",
             f"**Search space:** {space}", "",
             f"**Trials:** {len(trials)} ({', '.join(counts) or 'none yet'}), as of "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", *running, "",
             selected_on(objectives[0], study.directions[0].name.lower())]
    if len(study.directions) > 1:
        lines += _front_lines(study, objectives, experiment_id)
        note = "\n".join(lines)
    else:
        note = "\n".join(lines + _top_lines(study, trials, experiment, experiment_id, top, objectives))
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    cut = "\n\n(cut to MLflow's limit for a description)"
    return note if len(note) <= MAX_TAG_VAL_LENGTH else note[:MAX_TAG_VAL_LENGTH - len(cut)] + cut


def selected_on(metric: str, direction: str) -> str:
    """What chose the trials, said wherever a study's results are shown."""
    data = "on validation data" if metric.startswith("valid_") else "on training data" \
        if metric.startswith("train_") else "a final value of the trained model"
    return (f"**Selected on** `{metric}` ({direction}d, {data}); test metrics are logged for every run "
            "and never used to choose.")


def top_frame(study, trials: list, top: int, objectives: tuple[str, ...] = DEFAULT):
    """The best ``top`` completed trials, best first: ``trial``, the selection metric, the trial's other
    final values on the same data (``valid_accuracy``, from its ``harness.metrics`` attr), its params
    (lr and epochs first; NaN where a trial did not sample one) and ``mlflow_run_id``."""
    import pandas as pd
    from optuna.trial import TrialState

    metric = objectives[0]
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                  key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")[:top]
    rows = [{"trial": t.number, metric: t.value, **_measured(t, metric),
             **{f"params_{k}": v for k, v in t.params.items()}, RUN_ATTR: t.user_attrs.get(RUN_ATTR)} for t in done]
    frame = pd.DataFrame(rows, columns=None if rows else ["trial", metric, RUN_ATTR])
    params = sorted((c for c in frame.columns if c.startswith("params_")),
                    key=lambda c: param_order(c.removeprefix("params_")))
    measured = [c for c in frame.columns if c not in ("trial", metric, RUN_ATTR) and c not in params]
    return frame[["trial", metric, *measured, *params, RUN_ATTR]]


MEASURED_SHOWN = 8  # a trial's own values shown beside its selection metric (a storage's attr is untrusted input)


def _measured(trial, metric: str) -> dict[str, float]:
    """A completed trial's other final values on its selection data, as its worker stored them."""
    stored = trial.user_attrs.get(METRICS_ATTR)
    if not isinstance(stored, dict):
        return {}
    found = {k: float(v) for k, v in stored.items() if isinstance(k, str) and k != metric and k.isidentifier()
             and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return dict(list(found.items())[:MEASURED_SHOWN])


def _top_lines(study, trials: list, experiment, experiment_id: str, top: int,
               objectives: tuple[str, ...] = DEFAULT) -> list[str]:
    """The best trials as a table, and the commands to compare them, reload and reproduce the best."""
    import shlex

    import pandas as pd

    name = study.study_name
    lines: list[str] = []
    frame = top_frame(study, trials, top, objectives)
    if len(frame):
        values = [c for c in frame.columns if c not in ("trial", RUN_ATTR) and not c.startswith("params_")]
        params = [c for c in frame.columns if c.startswith("params_")]
        lines += ["", "| rank | trial | " + " | ".join(values + [c.removeprefix("params_") for c in params]) + " | run |",
                  "|---:|---:|" + "---:|" * len(values) + "---|" * len(params) + "---|"]
        for rank, row in enumerate(frame.to_dict("records"), 1):
            run = row[RUN_ATTR]
            link = f"[{schema.trial_run_name(row['trial'])}](#/experiments/{experiment_id}/runs/{run})" if isinstance(run, str) else "-"
            cells = [f"{row[c]:.6g}" if not pd.isna(row[c]) else "-" for c in values]
            cells += ["-" if pd.isna(row[c]) else cell(row[c]) for c in params]  # "-": not sampled
            lines.append(f"| {rank} | {row['trial']} | " + " | ".join(cells) + f" | {link} |")
        best = frame[RUN_ATTR].iloc[0]
        best = best if isinstance(best, str) else None
        named = "" if is_builtin(experiment.reference) else f" --experiment {shlex.quote(experiment.reference)}"
        lines += ["", f"- **Compare** the trials: `harness compare --study {shlex.quote(name)}`; in the runs table, "
                      f"`tags.{schema.TRIAL_STATE_TAG} = 'COMPLETE'` hides pruned and failed trials"]
        if best:
            loaded = "" if not named else f", experiment={experiment.reference!r}"
            lines += [f"- **Reload** the best model: `python -c \"from harness.runs import load_model; "
                      f"print(load_model('{best}'{loaded}).state_dict())\"`",
                      f"- **Reproduce** the best trial, bit for bit: `harness reproduce {best}{named}`"]
    else:
        lines += ["", "No trial has completed yet."]
    return lines


def front_shown(study, objectives: tuple[str, ...]):
    """(the front's size, its first ``FRONT_SHOWN`` rows as the description and the CLI show them).
    A param that is an objective too (epochs) is its value on the front, so it is shown once; lr and
    epochs lead the params as in the best-trials table."""
    front = front_frame(study, objectives)
    shown = front.head(FRONT_SHOWN).drop(columns=[f"params_{name}" for name in objectives], errors="ignore")
    params = sorted((c for c in shown.columns if c.startswith("params_")), key=lambda c: param_order(c.removeprefix("params_")))
    return len(front), shown[["number", RUN_ATTR, *objectives, *params]]


def param_order(key: str):
    return key != "lr", key != "epochs", key


def _front_lines(study, objectives: tuple[str, ...], experiment_id: str) -> list[str]:
    """The Pareto front as a table (its first rows), and the commands that compare along it."""
    import shlex

    import pandas as pd

    total, shown = front_shown(study, objectives)
    if not total:
        return ["", "No trial has completed yet."]
    params = [c for c in shown.columns if c.startswith("params_")]
    lines = ["", f"**Pareto front:** {total} trial(s) that no other trial betters in both "
                 f"{' and '.join(objectives)} (all in `{schema.PARETO_FRONT_CSV}`)", "",
             "| trial | " + " | ".join(objectives) + " | " + " | ".join(c.removeprefix("params_") for c in params) + " | run |",
             "|---:|" + "---:|" * len(objectives) + "---|" * len(params) + "---|"]
    for row in shown.to_dict("records"):
        run = row[RUN_ATTR]
        link = f"[{schema.trial_run_name(row['number'])}](#/experiments/{experiment_id}/runs/{run})" if isinstance(run, str) else "-"
        values = " | ".join(f"{row[name]:.6g}" for name in objectives)
        cells = " | ".join("-" if pd.isna(row[c]) else cell(row[c]) for c in params)  # "-": not sampled
        lines.append(f"| {row['number']} | {values} | {cells} | {link} |")
    if total > FRONT_SHOWN:
        lines.append(f"\n(and {total - FRONT_SHOWN} more)")
    name = shlex.quote(study.study_name)
    lines += ["", f"- **Compare** along the front: `harness compare --study {name} --front`; ranked by one "
                  f"objective: `harness compare --study {name} --by {objectives[-1]}`"]
    return lines


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def write(client, run_id: str, summary: dict[str, Any], best_finals: dict | None, trials_csv: bytes,
          trials: list, directions, note: str | None = None, objectives: tuple[str, ...] = DEFAULT,
          front_csv: bytes | None = None, importance: bool = False) -> None:
    """Everything the parent run gets at the end of an invocation; then it is FINISHED.
    ``best_finals``: the best trial's final metrics, when this invocation ran it (else read off its run).
    ``front_csv``: a study with two objectives: its Pareto front (``front_csv``).
    ``importance``: the params' importances too (see ``_plots``)."""
    from mlflow.exceptions import MlflowException

    metrics = {k: summary[k] for k in (schema.BEST_VALUE, schema.BEST_TRIAL_NUMBER, schema.N_TRIALS)
               if summary.get(k) is not None}
    best_run = summary.get(schema.BEST_RUN_TAG)
    if best_run:
        # The best trial's final metrics (final_test_loss, the experiment's scalars and their errors
        # against a declared truth), so the collapsed runs table says something true of the study.
        if best_finals is None:
            try:
                best_finals = {k: v for k, v in client.get_run(best_run).data.metrics.items() if not schema.is_curve(k)}
            except MlflowException:  # its run was deleted: the summary goes on without them
                best_finals = {}
        metrics.update({schema.best(k): v for k, v in best_finals.items()})
    best_params = summary.get(schema.BEST_PARAMS_TAG, {})
    tags = {schema.best_param(k): str(v) for k, v in best_params.items()}
    if note is not None:
        tags[schema.NOTE_TAG] = note
    if best_run:
        tags[schema.BEST_RUN_TAG] = best_run
        tags[schema.BEST_PARAMS_TAG] = json.dumps(best_params)
    client.log_batch(run_id, metrics=tracking.metric_list(metrics, step=summary[schema.N_TRIALS]),
                     tags=tracking.tag_list(tags))
    client.log_text(run_id, trials_csv.decode(), schema.TRIALS_CSV)
    client.log_dict(run_id, summary, schema.BEST_PARAMS_JSON)
    if front_csv is not None:
        client.log_text(run_id, front_csv.decode(), schema.PARETO_FRONT_CSV)
    tracking.log_figures(client, run_id, _plots(trials, directions, objectives, importance))
    client.set_terminated(run_id, "FINISHED")


def _plots(trials: list, directions, objectives: tuple[str, ...] = DEFAULT, importance: bool = False) -> dict:
    """Optuna's optimization history, parallel coordinates and (with ``importance``, from 5 distinct
    completed trials) parameter importances, as matplotlib figures; with two objectives, those of the
    first, and the Pareto front.

    Importances are the one figure that costs more than the rest together: Optuna's importance
    package imports scikit-learn (for fANOVA) even for PED-ANOVA, ~1.8 s of a search's fixed cost
    (benchmarks/search_overhead.py), so a search computes them only when asked."""
    import functools
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a scratch study: no "A new study created" line
    try:
        study = optuna.create_study(directions=[getattr(d, "name", d).lower() for d in directions])
    finally:
        optuna.logging.set_verbosity(verbosity)
    for trial in trials:
        if trial.state.is_finished():
            # A queued trial may hold a value out of its range (Optuna runs it with a warning); a
            # scratch study refuses it: that trial is left out of the plots, not the summary.
            with contextlib.suppress(ValueError):
                study.add_trial(trial)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        return {}
    many = len(study.directions) > 1
    # Several objectives: Optuna's single-objective plots need the one they show.
    first = {"target": lambda t: t.values[0], "target_name": objectives[0]} if many else {}
    plots = {schema.OPTIMIZATION_HISTORY: functools.partial(ovm.plot_optimization_history, **first),
             schema.PARALLEL_COORDINATE: functools.partial(ovm.plot_parallel_coordinate, **first)}
    if importance and len(completed) >= 5 and len({tuple(sorted(t.params.items())) for t in completed}) > 1:
        # PED-ANOVA: Optuna's own evaluator, ~40x faster than fANOVA on a 200-trial study.
        from optuna.importance import PedAnovaImportanceEvaluator

        plots[schema.PARAM_IMPORTANCES] = lambda s: ovm.plot_param_importances(
            s, evaluator=PedAnovaImportanceEvaluator(), **first)
    if many:
        plots[schema.PARETO_FRONT] = functools.partial(ovm.plot_pareto_front, target_names=list(objectives))
    figures = {}
    with experimental_ok(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="optuna.visualization")  # flat axes
        # Given a target (two objectives: the first), PED-ANOVA says it ranks low values as good: they are.
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes", category=UserWarning)
        # An axis only some trials have (momentum for sgd) with few of them: the figure still shows it.
        warnings.filterwarnings("ignore", message="Some regimes for parameter", category=UserWarning)
        for name, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError):  # e.g. importances on a degenerate study
                continue
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(10, 6)
            plt.close(figure)  # out of pyplot's registry; the figure object stays usable
            figures[name] = figure
    return figures
