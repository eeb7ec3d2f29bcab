"""Every sampler and pruner `harness search` offers, from ``Objective`` in a plain script (fast,
untracked) and from the CLI (tracked, audited); their settings' bad input."""
import json

import optuna
import pytest
from optuna.trial import TrialState

from conftest import client_for, run_cli
from search_helpers import with_warnings_printed
from harness import Objective
from harness.experiment import load
from harness.search import space as space_module
from harness.search import study as study_module


@pytest.fixture(scope="module")
def reference():
    experiment = load("linear_regression")
    return experiment, space_module.resolve(experiment, overrides={"epochs": [20, 60]})


@pytest.mark.parametrize("name", study_module.SAMPLERS)
def test_every_sampler_runs_a_plain_optuna_script(name, reference, recwarn):
    experiment, space = reference
    study = optuna.create_study(sampler=study_module.make_sampler(name, 3, space), pruner=optuna.pruners.NopPruner())
    with Objective(experiment, space, track=False) as objective:
        study.optimize(objective, n_trials=8)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 8
    for trial in study.trials:
        assert space.lr[0] <= trial.params["lr"] <= space.lr[1] and 20 <= trial.params["epochs"] <= 60
        assert trial.params["optimizer_loss"] in space.pairs
    if name in ("qmc", "cmaes", "gp"):  # they model the numbers: not every trial is the same point
        assert len({t.params["lr"] for t in study.trials}) > 1
    assert not [w for w in recwarn if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]


@pytest.mark.parametrize("name, settings", [("median", {"n_startup_trials": 2}), ("percentile", {"percentile": 40.0}),
                                            ("hyperband", {"min_resource": 5, "reduction_factor": 2}),
                                            ("sha", {"min_resource": "auto", "reduction_factor": 2}),
                                            ("wilcoxon", {"p_threshold": 0.2, "n_startup_steps": 1}),
                                            ("none", {})])
def test_every_pruner_prunes_a_plain_optuna_script_at_the_report_cadence(name, settings, reference):
    experiment, space = reference
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0),
                                pruner=study_module.make_pruner(name, settings))
    with Objective(experiment, space, track=False, report_every=5) as objective:
        study.optimize(objective, n_trials=14)
    states = [t.state for t in study.trials]
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED} and states.count(TrialState.COMPLETE) >= 1
    if name != "none":
        assert TrialState.PRUNED in states, name
    for trial in study.trials:
        assert all(step % 5 == 0 for step in trial.intermediate_values) and trial.intermediate_values or name == "none"
        if trial.state == TrialState.PRUNED:
            assert max(trial.intermediate_values) < trial.params["epochs"] - 1


def test_a_pruner_s_settings_are_all_logged_optuna_s_defaults_included():
    logged = json.loads(study_module.pruner_description("hyperband", {"reduction_factor": 2}))
    assert logged == {"min_resource": 1, "max_resource": "auto", "reduction_factor": 2, "bootstrap_count": 0}
    assert json.loads(study_module.pruner_description("percentile"))["percentile"] == study_module.PERCENTILE


@pytest.mark.parametrize("argv, line", [
    (["--sampler", "cmaess"], "unknown sampler 'cmaess'; allowed: tpe, random, grid, qmc, cmaes, gp, nsga2 (did you mean 'cmaes'?)"),
    (["--pruner", "hyperbnd"], "unknown pruner 'hyperbnd'; allowed: median, percentile, hyperband, sha, wilcoxon, none"),
    (["--pruner", "percentile", "--pruner-args", "percentile=150"], "--pruner-args percentile must be in [0, 100], got '150'"),
    (["--pruner", "percentile", "--pruner-args", "percentile=nan"], "--pruner-args percentile must be a finite number, got 'nan'"),
    (["--pruner", "wilcoxon", "--pruner-args", "p_threshold=inf"], "--pruner-args p_threshold must be a finite number, got 'inf'"),
    (["--pruner-args", "n_startup_trials=1e400"], "--pruner-args n_startup_trials must be an integer >= 0, got '1e400'"),
    (["--pruner-args", "n_startup_trials=99999999999999999999999"], "--pruner-args n_startup_trials must be at most"),
    (["--pruner-args", "n_startup_trial=3"], "median has no setting 'n_startup_trial'"),
    (["--pruner-args", "n_startup_trials"], "--pruner-args 'n_startup_trials': expected KEY=VALUE"),
    (["--pruner", "none", "--pruner-args", "a=1"], "--pruner none takes no settings"),
    (["--pruner", "sha", "--pruner-args", "reduction_factor=1"], "--pruner-args reduction_factor must be an integer >= 2, got '1'"),
    (["--pruner", "hyperband", "--pruner-args", "min_resource=10", "max_resource=5"], "max_resource=5 is below min_resource=10"),
    (["--pruner", "hyperband", "--pruner-args", "min_resource=auto"], "--pruner-args min_resource must be a positive integer, got 'auto'"),
    # Accepted, it hung the search: Optuna raises the reduction factor to it at every check.
    (["--pruner", "sha", "--pruner-args", "min_early_stopping_rate=9223372036854775807"],
     "--pruner-args min_early_stopping_rate must be at most 63, got '9223372036854775807'"),
    (["--pruner-args", "n_startup_trials=1", "n_startup_trials=2"],
     "--pruner-args n_startup_trials is given twice ('1' and '2'); give each setting once"),
    (["--pruner", "hyperband", "--pruner-args", "max_resource=10 max_resource=auto"], "max_resource is given twice"),
])
def test_bad_strategy_input_is_one_line_and_writes_nothing(argv, line, capsys, tmp_path, monkeypatch):
    from search_helpers import check_refused_in_process

    check_refused_in_process(["search", *argv], line, capsys, tmp_path, monkeypatch)


@pytest.mark.slow
def test_cmaes_with_successive_halving_from_the_cli_is_tracked_audited_and_resumable(workdir, cli_in_process):
    out = run_cli("search", "--n-trials", 10, "--sampler", "cmaes", "--seed", 4, "--pruner", "sha",
                  "--pruner-args", "reduction_factor=2", "min_early_stopping_rate=0", "--epochs-range", 20, 60,
                  "--report-every", 5, cwd=workdir)
    assert out.returncode == 0, out.stderr
    notices = [l for l in out.stderr.splitlines() if l.startswith("harness: ")]
    assert notices == ["harness: --sampler cmaes models numeric axes only; optimizer_loss drawn at random"]
    assert "Warning" not in out.stderr
    from search_helpers import check_contract, journal_study

    study = journal_study(workdir)
    assert len(study.trials) == 10 and any(t.state == TrialState.PRUNED for t in study.trials)
    parent, _ = check_contract(workdir, study)
    assert parent.data.params["study.sampler"] == "CmaEsSampler"
    assert parent.data.params["study.pruner"] == "SuccessiveHalvingPruner"
    assert json.loads(parent.data.params["study.pruner_args"]) == {
        "min_resource": "auto", "reduction_factor": 2, "min_early_stopping_rate": 0, "bootstrap_count": 0}
    audit = cli_in_process("audit", "--study", study.study_name, cwd=workdir)  # in-process (was a process)
    assert audit.returncode == 0 and "clean" in audit.stdout, audit.stdout
    # In-process (was a process): the search above is this test's process.
    again = cli_in_process("search", "--n-trials", 2, "--sampler", "gp", "--pruner", "percentile", "--epochs-range", 20,
                           60, cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert len(journal_study(workdir).trials) == 12
    assert client_for(workdir).get_run(parent.info.run_id).data.tags["optuna.sampler"] == "gp"


def test_settings_may_come_in_one_string_as_mlproject_passes_them():
    """`mlflow run . -P pruner_args="reduction_factor=2 min_resource=auto"` (and its default "")."""
    assert study_module.pruner_settings("sha", ["reduction_factor=2 min_resource=auto", ""]) == {
        "reduction_factor": 2, "min_resource": "auto"}
    assert study_module.pruner_settings("median", [""]) == {}


@pytest.mark.slow
def test_wilcoxon_from_the_cli_prunes_without_a_warning_per_check(workdir, cli_in_process):
    """In-process (was a process), with the warnings a process would print: a warning per check
    shows there as it would on a terminal."""
    out = with_warnings_printed(cli_in_process, "search", "--n-trials", 10, "--pruner", "wilcoxon", "--seed", 3,
                                "--epochs-range", 40, 80, "--no-progress", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr and "warn" not in out.stderr.lower(), out.stderr
    from search_helpers import journal_study

    assert any(t.state == TrialState.PRUNED for t in journal_study(workdir).trials)


@pytest.mark.slow
def test_every_sampler_and_pruner_from_the_cli_leaves_a_study_that_audits_clean(workdir, cli_in_process):
    """One study resumed with each remaining sampler and pruner in turn (a study may change them):
    every trial tracked by the contract, and `harness audit` clean at the end."""
    from search_helpers import check_contract, journal_study

    strategies = [("qmc", "hyperband"), ("random", "percentile"), ("grid", "none"), ("tpe", "wilcoxon"),
                  ("nsga2", "median")]
    for number, (sampler, pruner) in enumerate(strategies):
        args = ["search", "--n-trials", 4, "--sampler", sampler, "--seed", 5, "--pruner", pruner,
                "--epochs-range", 20, 60, "--report-every", 5, "--no-progress"]
        if number == 0:  # a real process: what a user's terminal shows
            out = run_cli(*args, cwd=workdir)
        else:  # in-process (were processes too), with the warnings a process would print
            out = with_warnings_printed(cli_in_process, *args, cwd=workdir)
        assert out.returncode == 0, (sampler, pruner, out.stderr)
        assert "Warning" not in out.stderr, (sampler, pruner, out.stderr)
    study = journal_study(workdir)
    assert len(study.trials) == 4 * len(strategies)
    parent, _ = check_contract(workdir, study)
    assert parent.data.tags["optuna.sampler"] == "nsga2"
    audit = cli_in_process("audit", "--study", study.study_name, cwd=workdir)  # in-process (was a process)
    assert audit.returncode == 0 and "clean" in audit.stdout, audit.stdout
