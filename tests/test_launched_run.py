"""$MLFLOW_RUN_ID is how `mlflow run` hands its command the run it made. A leftover one (a shell's
export, a job script's) took over whatever run it named: a study's trial or parent became another
study's parent, a finished run got new curves beside its old params. Only `mlflow run`'s fresh run
is adopted; any other id is one line naming the variable, exit 2, and nothing written anywhere."""
import pytest

from conftest import AUDITED, all_runs, client_for, copy_store, slow_cases

from harness import schema

# What `mlflow run` puts on the run it makes (mlflow/projects/utils.py _create_run), and its params.
PROJECT_TAGS = {schema.SOURCE_TYPE_TAG: "PROJECT", schema.SOURCE_NAME_TAG: "file:///project",
                "mlflow.project.entryPoint": "main"}
TRAIN = ["train", "--epochs", "3", "--set", "lr=0.05"]
SEARCH = ["--storage", "journal:j.log", "--n-trials", "1", "--epochs-range", "3", "4", "--pruner", "none",
          "--models", "none", "--no-progress"]
COMMANDS = {"train": TRAIN, "search of a new study": ["search", "--study-name", "S2", *SEARCH],
            "search resuming the study": ["search", "--study-name", AUDITED, *SEARCH]}


def _named(workdir, kind: str) -> str:
    """The id of a run of ``kind`` in ``workdir``'s store, made there if need be."""
    client = client_for(workdir)
    runs = all_runs(workdir)
    parent, = [r for r in runs if r.data.tags.get(schema.ROLE_TAG) == schema.ROLE_STUDY
               and r.data.tags[schema.STUDY_TAG] == AUDITED]
    trials = sorted((r for r in runs if r.data.tags.get(schema.PARENT_TAG) == parent.info.run_id),
                    key=lambda r: int(r.data.tags[schema.TRIAL_NUMBER_TAG]))
    if kind == "a finished trial's run":
        return trials[0].info.run_id
    if kind == "the study's parent run":  # for a new study; for its own study, it is where it logs anyway
        return parent.info.run_id
    if kind == "a running trial's run":  # a live worker's
        client.update_run(trials[1].info.run_id, status="RUNNING")
        return trials[1].info.run_id
    if kind == "a script's running run":  # mlflow.start_run() in a notebook: not `mlflow run`'s
        return client.create_run("0").info.run_id
    made = client.create_run("0", tags=PROJECT_TAGS).info.run_id
    if kind == "a project run with metrics":
        client.log_metric(made, "loss", 1.0)
    elif kind == "a deleted project run":
        client.delete_run(made)
    elif kind == "a project run the harness logged":  # a `harness train` under `mlflow run`, still running
        client.set_tag(made, schema.PROCESS_TAG, "{}")
    return made


def _everything(workdir) -> tuple:
    """All a user could see changed: every run's record, the journal's bytes, the folder's files."""
    runs = sorted((r.info.run_id, r.info.run_name, r.info.status, r.info.lifecycle_stage, r.data.tags, r.data.params,
                   r.data.metrics) for r in client_for(workdir).search_runs(
        [e.experiment_id for e in client_for(workdir).search_experiments(view_type=3)], run_view_type=3))
    return runs, (workdir / "j.log").read_bytes(), sorted(p.relative_to(workdir) for p in workdir.rglob("*"))


KINDS = ["a finished trial's run", "the study's parent run", "a running trial's run", "a script's running run",
         "a project run with metrics", "a deleted project run", "a project run the harness logged", "no such id",
         "malformed"]


# The study's own parent run is where a resume of it logs anyway (the test below).
REFUSED = [(c, k) for c in COMMANDS for k in KINDS if (c, k) != ("search resuming the study", "the study's parent run")]


# The fast tier: every kind of run for a new study's search, one for each other command (the same check).
@pytest.mark.parametrize("command, kind", slow_cases(REFUSED, slow=[
    (c, k) for c, k in REFUSED if c != "search of a new study" and k != KINDS[0]]))
def test_a_run_id_that_is_not_mlflow_run_s_fresh_run_is_refused_and_nothing_is_written(
        searched_once, tmp_path, cli_in_process, command, kind):
    workdir = copy_store(searched_once, tmp_path / "s")
    value = {"no such id": "0" * 32, "malformed": "../x"}.get(kind) or _named(workdir, kind)
    before = _everything(workdir)
    out = cli_in_process(*COMMANDS[command], cwd=workdir, env={"MLFLOW_RUN_ID": value})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"harness: error: MLFLOW_RUN_ID='{value}': "), lines
    assert "cannot reach" not in lines[0] and "Traceback" not in out.stderr
    assert _everything(workdir) == before


@pytest.mark.parametrize("command", ["train", "search of a new study"])
def test_a_run_id_where_no_store_is_yet_is_refused_without_making_one(tmp_path, cli_in_process, command):
    out = cli_in_process(*COMMANDS[command], cwd=tmp_path, env={
        "MLFLOW_RUN_ID": "0" * 32, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"harness: error: MLFLOW_RUN_ID='{'0' * 32}': no such run: the MLflow store ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # two whole searches in-process
def test_the_run_mlflow_run_made_is_adopted_by_a_new_study_and_the_study_s_own_parent_by_a_resume(
        searched_once, tmp_path, cli_in_process):
    workdir = copy_store(searched_once, tmp_path / "s")
    client = client_for(workdir)
    made = client.create_run("0", tags=PROJECT_TAGS).info.run_id
    client.log_param(made, "n_trials", "1")  # `mlflow run` logs its entry point's params
    assert cli_in_process(*COMMANDS["search of a new study"], cwd=workdir, env={"MLFLOW_RUN_ID": made}).returncode == 0
    adopted = client.get_run(made)
    assert adopted.data.tags[schema.STUDY_TAG] == "S2" and adopted.info.run_name == "S2"
    assert adopted.data.tags[schema.SOURCE_TYPE_TAG] == "PROJECT" and adopted.info.status == "FINISHED"

    parent = _named(workdir, "the study's parent run")
    out = cli_in_process(*COMMANDS["search resuming the study"], cwd=workdir, env={"MLFLOW_RUN_ID": parent})
    assert out.returncode == 0, out.stderr
    assert client.get_run(parent).data.tags[schema.STUDY_TAG] == AUDITED
    assert len([r for r in all_runs(workdir) if r.data.tags.get(schema.STUDY_TAG) == AUDITED]) == 1 + 3


def test_the_python_api_refuses_it_before_its_first_trial_s_run(searched_once, tmp_path, monkeypatch):
    """`harness.Objective` in a script of one's own: no command checked the variable before."""
    import optuna

    from harness.errors import UsageError
    from harness.experiment import load
    from harness.search import space as space_module
    from harness.search.objective import Objective
    from harness.search.study import create_study, make_pruner, open_storage

    workdir = copy_store(searched_once, tmp_path / "s")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    trial_run = _named(workdir, "a finished trial's run")
    monkeypatch.setenv("MLFLOW_RUN_ID", trial_run)
    runs = _everything(workdir)[0]
    space = space_module.resolve(load("linear_regression"), overrides={"epochs": [3, 4]})
    study = create_study("api", open_storage(f"journal:{workdir / 'j.log'}"), direction="minimize",
                         sampler=optuna.samplers.RandomSampler(seed=0), pruner=make_pruner("none"), space=space,
                         experiment="linear_regression")
    with pytest.raises(UsageError, match=f"^MLFLOW_RUN_ID='{trial_run}': run {trial_run} \\('trial-0'\\) is FINISHED"):
        with Objective("linear_regression", space, track=True, device="cpu", seed=0) as objective:
            study.optimize(objective, n_trials=1)
    assert _everything(workdir)[0] == runs
