"""Two objectives (`--objectives valid_loss epochs|train_seconds`): from a plain script with
``Objective`` (fast, untracked) and from the CLI (tracked, its Pareto front on the parent run,
audited, resumed only with the same objectives, compared along the front)."""
import csv
import io
import os

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import TrialState

from conftest import all_runs, client_for
from harness import Objective, schema
from harness.errors import UsageError
from harness.experiment import load
from harness.search import objectives as objectives_module
from harness.search.durable import optuna_private
from harness.search import space as space_module
from harness.search import study as study_module

SMALL = ["--epochs-range", "5", "30", "--no-progress"]


@pytest.fixture(scope="module")
def reference():
    experiment = load("linear_regression")
    return experiment, space_module.resolve(experiment, overrides={"epochs": [5, 30]})


@pytest.mark.parametrize("second", objectives_module.SECOND)
def test_a_plain_script_gets_both_values_of_every_trial(second, reference):
    experiment, space = reference
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=study_module.make_sampler("nsga2", 0, space))
    with Objective(experiment, space, track=False, objectives=("valid_loss", second)) as objective:
        study.optimize(objective, n_trials=6)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    for trial in study.trials:
        loss, value = trial.values
        assert loss >= 0
        if second == "epochs":
            assert value == trial.params["epochs"]  # a completed trial trained all its epochs
        else:
            assert 0 < value < 60
    assert study.best_trials
    # The study keeps its objectives' names: a search (or script) with others cannot resume it.
    assert study.user_attrs[schema.OBJECTIVES_ATTR] == ["valid_loss", second]
    assert study.metric_names == ["valid_loss", second]
    other = next(name for name in objectives_module.SECOND if name != second)
    with pytest.raises(UsageError, match=f"has objectives valid_loss {second}, not valid_loss {other}"):
        study_module.existing_study(study.study_name, optuna_private.storage_of(study), direction="minimize", sampler=None, pruner=None,
                                    space=space, experiment=experiment.name, objectives=("valid_loss", other))
    with Objective(experiment, space, track=False, objectives=("valid_loss", other)) as objective:
        with pytest.raises(UsageError, match=f"has objectives valid_loss {second}, not valid_loss {other}"):
            study.optimize(objective, n_trials=1)


def test_one_objective_returns_the_validation_loss_never_the_test_loss(reference):
    experiment, space = reference
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(1))
    with Objective(experiment, space, track=False) as objective:
        study.optimize(objective, n_trials=2)
    assert all(isinstance(t.value, float) for t in study.trials)
    # The trial's value is its final valid_loss on the 20% held out of training (the reference has no
    # validation part of its own): a re-run of its config gives it, and its test loss is another number.
    from harness import config, training

    trial = study.trials[0]
    cfg = config.validate(config.with_values(objective.base, {
        "lr": trial.params["lr"], "epochs": trial.params["epochs"],
        **dict(zip(("optimizer", "loss"), trial.params["optimizer_loss"].split("+")))}), experiment)
    assert cfg.valid_fraction == 0.2 and cfg.objective == "valid_loss"
    result = training.train(cfg, experiment)
    assert result.history.last("valid_loss") == trial.value != result.history.last("test_loss")


def test_a_study_with_other_directions_than_the_objective_s_values_is_refused(reference):
    experiment, space = reference
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(1))
    with Objective(experiment, space, track=False, objectives=("valid_loss", "epochs")) as objective:
        with pytest.raises(UsageError, match="the study has 1 direction"):
            study.optimize(objective, n_trials=1)


def test_objective_refuses_bad_objectives_and_train_seconds_in_a_batch(reference):
    experiment, space = reference
    with pytest.raises(UsageError, match="unknown second objective 'epoch'.*did you mean 'epochs'"):
        Objective(experiment, space, track=False, objectives=("valid_loss", "epoch"))
    with pytest.raises(UsageError, match="the first objective is a metric the runs record"):
        Objective(experiment, space, track=False, objectives=("epochs",))
    with pytest.raises(UsageError, match="share their training time"):
        Objective(experiment, space, track=False, objectives=("valid_loss", "train_seconds"), batch=4)


def test_mlproject_passes_objectives_in_one_string():
    assert objectives_module.parse(["valid_loss epochs"]) == ("valid_loss", "epochs")
    assert objectives_module.parse(None) == objectives_module.parse(["valid_loss"]) == ("valid_loss",)


@pytest.mark.parametrize("argv, line", [
    (["--objectives", "valid_loss", "epochs", "--pruner", "median"],
     "--pruner median with --objectives valid_loss epochs: Optuna does not prune multi-objective studies; "
     "allowed: none"),
    (["--objectives", "valid_loss", "epochs", "--sampler", "cmaes"], "--sampler cmaes models one objective only"),
    (["--objectives", "valid_loss", "train_seconds", "--batch", "4"],
     "--batch 4 with objective train_seconds: trials trained together share their training time"),
    (["--objectives", "valid_loss", "epoch"], "unknown second objective 'epoch'; allowed: epochs, train_seconds "
                                              "(did you mean 'epochs'?)"),
    (["--objectives", "epochs", "valid_loss"], "the first objective is a metric the runs record"),
    (["--objectives", "test_loss"], "--objectives 'test_loss' is a test metric: runs are selected on validation data"),
    (["--objective", "test_accuracy"], "--objective 'test_accuracy' is a test metric"),
    (["--objective", "valid_accuracy"], "the run is selected on 'valid_accuracy', which it does not record; it "
                                        "records train_loss, valid_loss"),
    (["--objectives", "valid_loss", "epochs", "train_seconds"], "then at most one of"),
    (["--objectives", ""], "--objectives '': name the objectives: a metric such as valid_loss, then optionally one of"),
    (["--objectives", "valid_loss", "epochs", "--pruner-args", "n_startup_trials=1"],
     "--pruner-args n_startup_trials=1 with --objectives valid_loss epochs: a multi-objective study is not pruned"),
])
def test_bad_objectives_input_is_one_line_and_writes_nothing(argv, line, capsys, tmp_path, monkeypatch):
    from search_helpers import check_refused_in_process

    check_refused_in_process(["search", *argv], line, capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("by", ["", " "])
def test_compare_by_nothing_is_refused(by, capsys, tmp_path, monkeypatch):
    from search_helpers import check_refused_in_process

    check_refused_in_process(["compare", "--study", "s", "--by", by], f"--by {by!r}: name one of the study's "
                             "objectives", capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("stored, line", [
    # A script's own study of two objectives: what its trials' second value is, the harness cannot know.
    (None, "study 's' has objectives 2 unnamed ones, not valid_loss epochs; use another --study-name"),
    # Names edited in the storage: resuming "with" them would be refused in turn.
    (["valid_loss", "bogus"], "study 's' has objectives valid_loss bogus, not valid_loss epochs; use another"),
])
def test_a_study_of_two_objectives_the_harness_cannot_name_is_not_resumed(stored, line, capsys, tmp_path,
                                                                         monkeypatch):
    from harness.cli import main
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.5, 3.0], params={}, distributions={}))
    if stored:
        study.set_user_attr(schema.OBJECTIVES_ATTR, stored)
    before = (tmp_path / "j.log").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--study-name", "s", "--storage", "journal:j.log", "--objectives", "valid_loss", "epochs",
                 *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err, err
    assert (tmp_path / "j.log").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["j.log"]


def test_compare_by_an_objective_ranks_ties_by_the_other(workdir, monkeypatch):
    """Epochs are whole numbers, so ties are common: the test loss decides among them (Optuna's
    front holds the better of two equal-epoch trials, which the store's order would hide)."""
    from harness import compare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    client = client_for(workdir)
    made = {}
    for loss, epochs in [(0.5, 27.0), (0.1, 30.0), (0.01, 27.0), (0.2, 27.0), (0.3, 5.0)]:  # worst first
        run = client.create_run("0", tags={schema.STUDY_TAG: "s"})
        client.log_metric(run.info.run_id, schema.objective("valid_loss"), loss)
        client.log_metric(run.info.run_id, schema.objective("epochs"), epochs)
        client.set_terminated(run.info.run_id)
        made[run.info.run_id] = (epochs, loss)
    import mlflow

    ranked = compare.top_runs(client, study="s", metric=schema.objective("epochs"), top=None,
                              then={schema.objective("valid_loss"): False})
    # A script's tracking URI is as it was: compare read the client's store without pinning the script's to it.
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'other.db'}")
    assert mlflow.get_tracking_uri() == f"sqlite:///{workdir / 'other.db'}"
    assert list(ranked["run_id"]) == sorted(made, key=made.get)
    assert [made[r][1] for r in ranked["run_id"]] == [0.3, 0.01, 0.2, 0.5, 0.1]


def test_the_resume_command_keeps_the_objectives():
    from harness.cli import build_parser
    from harness.commands.search import resume_command

    args = build_parser().parse_args(["search", "--objectives", "valid_loss", "epochs", "--sampler", "nsga2"])
    assert resume_command(args, "s", "journal:j.log").endswith("--sampler nsga2 --objectives valid_loss epochs")


def _csv(client, run_id, path, workdir):
    return list(csv.DictReader(io.StringIO(open(client.download_artifacts(run_id, path, str(workdir))).read())))


def _stores(workdir):
    """What a refused command must leave as it was: the journal's bytes and every run."""
    return (workdir / "optuna_journal.log").read_bytes(), sorted(r.info.run_id for r in all_runs(workdir))


@pytest.mark.slow
def test_nsga2_on_two_objectives_from_the_cli_keeps_the_front_on_the_parent_run(workdir, cli_in_process):
    from search_helpers import check_contract, journal_study, with_warnings_printed

    # In-process (was a process), with the warnings a process would print.
    out = with_warnings_printed(cli_in_process, "search", "--objectives", "valid_loss", "epochs", "--sampler", "nsga2",
                                "--seed", 0, "--n-trials", 8, *SMALL, cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr
    study = journal_study(workdir)
    assert study.directions == [StudyDirection.MINIMIZE, StudyDirection.MINIMIZE]
    assert study.user_attrs["harness.objectives"] == ["valid_loss", "epochs"]
    assert len(study.trials) == 8 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert all(t.intermediate_values == {} for t in study.trials)  # nothing reported: no pruner
    parent, runs = check_contract(workdir, study)
    client = client_for(workdir)

    # Each trial's run logs both values, equal to the trial's in Optuna.
    for trial in study.trials:
        metrics = runs[trial.number].data.metrics
        assert [metrics["objective_valid_loss"], metrics["objective_epochs"]] == trial.values
        assert trial.values[1] == trial.params["epochs"]

    # The parent: the objectives, the front as a table equal to study.best_trials, its figure.
    params, tags = parent.data.params, parent.data.tags
    assert params["study.objectives"] == "valid_loss epochs" and params["study.direction"] == "minimize minimize"
    assert params["study.sampler"] == "NSGAIISampler" and params["study.pruner"] == "NopPruner"
    assert tags["optuna.sampler"] == "nsga2" and tags["optuna.pruner"] == "none"
    assert "best_value" not in parent.data.metrics and "best_run_id" not in tags  # no single best
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.csv", "pareto_front.png", "trials.csv"} <= names
    rows = _csv(client, parent.info.run_id, "pareto_front.csv", workdir)
    front = sorted(study.best_trials, key=lambda t: (*t.values, t.number))
    assert [int(r["number"]) for r in rows] == [t.number for t in front]
    assert [[float(r["valid_loss"]), float(r["epochs"])] for r in rows] == [t.values for t in front]
    assert [r["mlflow_run_id"] for r in rows] == [t.user_attrs["mlflow_run_id"] for t in front]
    assert [float(r["params_lr"]) for r in rows] == [t.params["lr"] for t in front]
    note = tags["mlflow.note.content"]
    assert f"**Pareto front:** {len(front)} trial(s)" in note
    for trial in front:
        assert f"/runs/{trial.user_attrs['mlflow_run_id']})" in note
    assert "Pareto front:" in out.stdout and front[0].user_attrs["mlflow_run_id"] in out.stdout

    audit = cli_in_process("audit", "--study", study.study_name, cwd=workdir)  # in-process (was a process)
    assert audit.returncode == 0 and "clean" in audit.stdout, audit.stdout

    # Resuming with other objectives, or a pruner with two: refused, one line, nothing written.
    before = _stores(workdir)
    for argv, message in ((["--objectives", "valid_loss"], "has objectives valid_loss epochs, not valid_loss; "
                                                           "resume it with --objectives valid_loss epochs"),
                          ([], "has objectives valid_loss epochs, not valid_loss"),
                          (["--objectives", "valid_loss", "train_seconds"], "not valid_loss train_seconds"),
                          (["--objectives", "valid_loss", "epochs", "--pruner", "hyperband"],
                           "--pruner hyperband with --objectives valid_loss epochs"),
                          (["--objectives", "valid_loss", "epochs", "--sampler", "cmaes"],
                           "--sampler cmaes models one objective only")):
        refused = cli_in_process("search", "--n-trials", 1, *argv, *SMALL, cwd=workdir)  # refusals: no process each
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and message in lines[0], refused.stderr
    assert _stores(workdir) == before

    # compare: ranked by one objective, and along the front (in-process: they were processes).
    by = cli_in_process("compare", "--study", study.study_name, "--by", "epochs", "--top", 3, "--csv", "by.csv",
                        cwd=workdir)
    assert by.returncode == 0, by.stderr
    ranked = [r["run_id"] for r in csv.DictReader(open(workdir / "by.csv"))]
    by_epochs = sorted(study.trials, key=lambda t: (t.values[1], t.values[0]))  # equal epochs: the test loss
    assert ranked == [t.user_attrs["mlflow_run_id"] for t in by_epochs[:3]]
    shown = cli_in_process("compare", "--study", study.study_name, "--front", "--csv", "front.csv", cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    listed = [r["run_id"] for r in csv.DictReader(open(workdir / "front.csv"))]
    assert listed == [t.user_attrs["mlflow_run_id"] for t in front]
    for argv, message in ((["--by", "epoch"], "has objectives valid_loss, epochs (did you mean 'epochs'?)"),
                          (["--front", "--metric", "final_test_loss"], "choose one")):
        bad = cli_in_process("compare", "--study", study.study_name, *argv, cwd=workdir)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    # Resumed with the same objectives: the same study and parent run, and its front rewritten.
    again = cli_in_process("search", "--objectives", "valid_loss", "epochs", "--sampler", "nsga2", "--n-trials", 2,
                           *SMALL, cwd=workdir)  # in-process (was a process): the first shows what a user's does
    assert again.returncode == 0, again.stderr
    study = journal_study(workdir)
    assert len(study.trials) == 10
    resumed, _ = check_contract(workdir, study)
    assert resumed.info.run_id == parent.info.run_id
    rows = _csv(client, parent.info.run_id, "pareto_front.csv", workdir)
    assert sorted(int(r["number"]) for r in rows) == sorted(t.number for t in study.best_trials)


@pytest.mark.slow
def test_train_seconds_is_each_trial_s_measured_training_time(workdir, cli_in_process):
    """In-process (was a process): test_nsga2_on_two_objectives_from_the_cli shows a user's process."""
    out = cli_in_process("search", "--objectives", "valid_loss", "train_seconds", "--n-trials", 4, "--seed", 1,
                         "--study-name", "timed", *SMALL, cwd=workdir)
    assert out.returncode == 0, out.stderr
    from search_helpers import check_contract, journal_study

    study = journal_study(workdir, "timed")
    _, runs = check_contract(workdir, study)
    for trial in study.trials:
        assert 0 < trial.values[1] < 60
        assert runs[trial.number].data.metrics["objective_train_seconds"] == trial.values[1]
    assert cli_in_process("audit", "--study", "timed", cwd=workdir).returncode == 0  # was a process
