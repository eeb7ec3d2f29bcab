"""Checkpoints inside a run, and `harness train --resume`: a run stopped at any epoch and continued
from its last checkpoint ends bit for bit as one never stopped (weights, every curve point, early
stopping's epoch, the scalars), with no step written twice; a checkpoint that is torn, tampered with
or of another config is never used."""
import io
import os

import pytest
import torch
from mlflow import MlflowClient

from conftest import artifact_folder, slow_cases
from harness import checkpoint, config, training
from harness.experiment import load
from harness.schema import RESUMED_TAG, STATE_DICT, TRAIN_LOSS, checkpoint_name

CASES = {
    "full batch": ("linear_regression", {"epochs": 12}),
    "mini-batch": ("linear_regression", {"epochs": 12, "batch_size": 10}),
    "epoch schedule": ("linear_regression", {"epochs": 12, "batch_size": 10, "scheduler": "step"}),
    "batch schedule": ("linear_regression", {"epochs": 12, "batch_size": 10, "scheduler": "onecycle"}),
    "early stopping, adam": ("linear_regression", {"epochs": 40, "batch_size": 10, "patience": 3, "optimizer": "adam",
                                                   "lr": 0.05, "valid_fraction": 0.2}),
    "dropout": ("digits", {"epochs": 5, "batch_size": 128}),
}


def resolved(name: str, overrides: dict):
    experiment = load(name)
    data = experiment.load_data()
    cfg, _ = config.resolve({"experiment": name, "device": "cpu", **overrides}, experiment=experiment,
                            n_train=data.n_train)
    return config.validate(cfg, experiment, data.n_train), experiment, data


@pytest.mark.parametrize("case", slow_cases(CASES, slow=["dropout"]))  # digits trains ~3 s
def test_a_run_continued_from_any_checkpoint_ends_bit_for_bit_as_one_never_stopped(case):
    cfg, experiment, data = resolved(*CASES[case])
    written = []
    whole = training.train(cfg, experiment, data, checkpoints=checkpoint.Checkpoints(
        write=lambda state: written.append(checkpoint.to_bytes(state)), every=2))
    assert len(written) >= 2, len(written)
    for blob in written:
        state = torch.load(io.BytesIO(blob), weights_only=True)  # plain containers and tensors only
        assert checkpoint.matches(state, cfg.to_dict(), experiment.sha256) is None
        again = training.train(cfg, experiment, data, resume=state)
        assert again.history.values == whole.history.values, state["epochs_done"]
        assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                     again.model.state_dict().values())), state["epochs_done"]
        assert (again.history.best_epoch, again.history.early_stop, again.scalars) == \
            (whole.history.best_epoch, whole.history.early_stop, whole.scalars)


def test_a_checkpoint_of_another_config_or_experiment_file_is_not_one_to_continue():
    cfg, experiment, data = resolved("linear_regression", {"epochs": 6})
    written = []
    training.train(cfg, experiment, data, checkpoints=checkpoint.Checkpoints(write=written.append, every=3))
    state = torch.load(io.BytesIO(checkpoint.to_bytes(written[0])), weights_only=True)
    other = {**cfg.to_dict(), "lr": 0.02}
    assert "lr differ" in checkpoint.matches(state, other, experiment.sha256)
    assert "sha256 differs" in checkpoint.matches(state, cfg.to_dict(), "0" * 64)
    assert "not a checkpoint" in checkpoint.matches({"format": 99}, cfg.to_dict(), experiment.sha256)
    assert "epoch count" in checkpoint.matches({**state, "epochs_done": 10 ** 9}, cfg.to_dict(), experiment.sha256)


# An experiment that stops the run the way Ctrl-C does, at its STOP_AT-th metrics() call in a process (each
# test writes its own file: a process keeps one module, and its counter, per file content).
STOPPING = """# {where}
from experiments.digits import EXPERIMENT as DIGITS
from dataclasses import replace

CALLS = [0]

def metrics(pred, y):
    CALLS[0] += 1
    if CALLS[0] == STOP_AT:
        raise KeyboardInterrupt
    return DIGITS.metrics(pred, y)

STOP_AT = {stop_at}
EXPERIMENT = replace(DIGITS, name="stopping", metrics=metrics)
"""
FLAGS = ["--epochs", "6", "--set", "batch_size=128", "--checkpoint-every", "2", "--checkpoint-seconds", "0"]


def runs_of(workdir):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return client, {r.info.run_id: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}


def curves(client, run_id, names):
    return {name: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]
            for name in names}


@pytest.mark.slow  # four in-process trainings of digits, each with its record
def test_train_stopped_then_resumed_logs_the_run_of_a_train_never_stopped(in_workdir, cli_in_process, tmp_path):
    """Ctrl-C inside epoch 5 of 6 (checkpoints after epochs 2 and 4), then `--resume RUN_ID` with the same
    flags: the same run goes on from epoch 4 and ends FINISHED, its weights and every curve point those of
    a run never stopped, each step once."""
    never = tmp_path / "never.py"
    never.write_text(STOPPING.format(stop_at=-1, where=tmp_path))
    out = cli_in_process("train", "--experiment", never, *FLAGS, cwd=in_workdir)
    assert out.returncode == 0, out.stderr
    client, found = runs_of(in_workdir)
    (reference,) = found
    calls = load(str(never)).metrics.__globals__["CALLS"][0]  # the pre-flight's one, then 6 epochs'
    per_epoch = (calls - 1) // 6
    stops = tmp_path / "stops.py"
    stops.write_text(STOPPING.format(stop_at=1 + 4 * per_epoch + 1, where=tmp_path))  # the first batch of the fifth epoch
    out = cli_in_process("train", "--experiment", stops, *FLAGS, cwd=in_workdir)
    assert out.returncode == 130 and "--resume" in out.stderr, out.stderr
    _, found = runs_of(in_workdir)
    stopped = next(run_id for run_id in found if run_id != reference)
    assert found[stopped].info.status == "KILLED"
    out = cli_in_process("train", "--experiment", stops, *FLAGS, "--resume", stopped, cwd=in_workdir)
    assert out.returncode == 0, out.stderr
    _, found = runs_of(in_workdir)
    assert len(found) == 2 and found[stopped].info.status == "FINISHED"
    assert found[stopped].data.tags[RESUMED_TAG] == "4"
    names = [n for n in found[reference].data.metrics if not n.startswith("final_")]
    assert curves(client, stopped, names) == curves(client, reference, names)  # every step once, the same values
    assert found[stopped].data.metrics == found[reference].data.metrics
    weights = [torch.load(artifact_folder(in_workdir, run) / STATE_DICT, weights_only=True)
               for run in (reference, stopped)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))


class Planted:
    """A pickle that would run code when loaded."""

    def __reduce__(self):
        return (os.system, ("touch planted",))


@pytest.mark.slow  # eight in-process trainings of digits
def test_a_torn_or_planted_checkpoint_is_refused_in_one_line_and_the_other_slot_is_used(in_workdir, cli_in_process,
                                                                                          tmp_path):
    """The latest slot torn (a crash, a full disk) and, in another store, the latest slot holding a
    pickle that runs code: each is refused in one line, nothing in it runs, and the run goes on from
    the other slot's epoch, still ending as a run never stopped. Bad --resume input is refused before
    anything is written."""
    never = tmp_path / "never.py"
    never.write_text(STOPPING.format(stop_at=-1, where=tmp_path))
    assert cli_in_process("train", "--experiment", never, *FLAGS, cwd=in_workdir).returncode == 0
    client, found = runs_of(in_workdir)
    (reference,) = found
    per_epoch = (load(str(never)).metrics.__globals__["CALLS"][0] - 1) // 6
    stops = tmp_path / "stops.py"
    stops.write_text(STOPPING.format(stop_at=1 + 4 * per_epoch + 1, where=tmp_path))
    assert cli_in_process("train", "--experiment", stops, *FLAGS, cwd=in_workdir).returncode == 130
    stopped = next(run_id for run_id in runs_of(in_workdir)[1] if run_id != reference)
    folder = artifact_folder(in_workdir, stopped)
    latest = folder / checkpoint_name(1)  # epoch 4's: slots 0, 1 written in turn
    assert torch.load(latest, weights_only=True)["epochs_done"] == 4

    before = {r: (run.info.status, run.data.tags.get(RESUMED_TAG)) for r, run in runs_of(in_workdir)[1].items()}
    for flags, line in ((["--resume", reference], f"run {reference} is FINISHED"),
                        (["--resume", "0" * 32], "does not exist"),
                        (["--resume", stopped, "--lr", "0.5"], "was logged with another config (lr differ)"),
                        (["--resume", stopped, "--checkpoint-every", "0"], "--checkpoint-every")):
        out = cli_in_process("train", "--experiment", stops, *FLAGS, *flags, cwd=in_workdir)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and line in out.stderr, (flags, out.stderr)
    assert {r: (run.info.status, run.data.tags.get(RESUMED_TAG)) for r, run in runs_of(in_workdir)[1].items()} == before

    planted = torch.load(latest, weights_only=True)
    planted["history"] = Planted()
    torch.save(planted, tmp_path / "planted.pt")
    latest.write_bytes(latest.read_bytes()[:-100])  # torn
    out = cli_in_process("train", "--experiment", stops, *FLAGS, "--resume", stopped, cwd=in_workdir)
    assert out.returncode == 0 and f"checkpoint {checkpoint_name(1)} of run {stopped} refused" in out.stderr, out.stderr
    found = runs_of(in_workdir)[1]
    assert found[stopped].data.tags[RESUMED_TAG] == "2" and found[stopped].info.status == "FINISHED"
    names = [n for n in found[reference].data.metrics if not n.startswith("final_")]
    assert curves(client, stopped, names) == curves(client, reference, names)

    # A pickle that runs code, in the latest slot of a run stopped again: refused, never run.
    assert cli_in_process("train", "--experiment", stops, *FLAGS, cwd=in_workdir).returncode == 0  # CALLS went past
    stops.write_text(STOPPING.format(stop_at=1 + 4 * per_epoch + 1, where=tmp_path) + "# again\n")
    assert cli_in_process("train", "--experiment", stops, *FLAGS, cwd=in_workdir).returncode == 130
    again = max(runs_of(in_workdir)[1].values(), key=lambda r: r.info.start_time).info.run_id
    target = artifact_folder(in_workdir, again) / checkpoint_name(1)
    target.write_bytes((tmp_path / "planted.pt").read_bytes())
    out = cli_in_process("train", "--experiment", stops, *FLAGS, "--resume", again, cwd=in_workdir)
    assert out.returncode == 0 and "weights_only" in out.stderr and not (in_workdir / "planted").exists(), out.stderr
    assert runs_of(in_workdir)[1][again].data.tags[RESUMED_TAG] == "2"


SEARCH = ["search", "--n-trials", "1", "--epochs-range", "6", "7", "--pairs", "adam+cross_entropy", "--seed", "0",
          "--set", "batch_size=128", "--checkpoint-every", "2", "--checkpoint-seconds", "0", "--pruner", "none",
          "--no-progress"]


@pytest.mark.slow  # three in-process searches of digits
def test_a_trial_cut_short_is_retried_from_its_checkpoint_and_ends_as_one_never_cut(tmp_path, migrated_db,
                                                                                     cli_in_process):
    """Ctrl-C inside a trial's fifth epoch queues its configuration again; the next invocation's retry goes
    on from the checkpoint after epoch 4, in a new run linked to the first, and ends with the weights,
    curves and value of the same trial never cut short."""
    from conftest import new_store

    for name in ("never", "cut", "code"):
        (tmp_path / name).mkdir()
    never, cut = new_store(tmp_path / "never", migrated_db), new_store(tmp_path / "cut", migrated_db)
    code = tmp_path / "code"
    (code / "never.py").write_text(STOPPING.format(stop_at=-1, where=tmp_path))
    out = cli_in_process(*SEARCH, "--experiment", code / "never.py", cwd=never)
    assert out.returncode == 0, out.stderr
    calls = load(str(code / "never.py")).metrics.__globals__["CALLS"][0]
    client, found = runs_of(never)
    (reference,) = [r for r in found.values() if "mlflow.parentRunId" in r.data.tags]
    epochs = int(reference.data.params["epochs"])
    per_epoch = (calls - 1) // epochs  # the pre-flight's one call, then each epoch's
    (code / "cut.py").write_text(STOPPING.format(stop_at=1 + 4 * per_epoch + 1, where=tmp_path))
    out = cli_in_process(*SEARCH, "--experiment", code / "cut.py", cwd=cut)
    assert out.returncode == 130, out.stderr
    out = cli_in_process(*SEARCH, "--experiment", code / "cut.py", cwd=cut)
    assert out.returncode == 0, out.stderr
    cut_client, found = runs_of(cut)
    trials = sorted((r for r in found.values() if "mlflow.parentRunId" in r.data.tags),
                    key=lambda r: int(r.data.tags["optuna.trial_number"]))
    first, retry = trials
    assert first.info.status == "KILLED" and retry.info.status == "FINISHED"
    assert retry.data.tags[RESUMED_TAG] == "4" and retry.data.tags["harness.resumed_from"] == first.info.run_id
    names = [n for n in reference.data.metrics if not n.startswith(("final_", "best_"))]
    assert curves(cut_client, retry.info.run_id, names) == curves(client, reference.info.run_id, names)
    assert retry.data.metrics == reference.data.metrics
    weights = [torch.load(artifact_folder(folder, run.info.run_id) / STATE_DICT, weights_only=True)
               for folder, run in ((never, reference), (cut, retry))]
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))
    out = cli_in_process("audit", "--study", "stopping-search", cwd=cut)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr
    out = cli_in_process("reproduce", retry.info.run_id, "--experiment", code / "cut.py", cwd=cut)
    assert out.returncode == 0 and "exactly" in out.stdout, out.stdout + out.stderr  # the resumed trial re-runs bit for bit


# An experiment that looks into its own MLflow store while it trains: how many train_loss points its
# RUNNING run holds at each epoch's metrics.
WATCHING = """
import sqlite3
from contextlib import closing
from dataclasses import replace
from experiments.digits import EXPERIMENT as DIGITS

SEEN = []

def metrics(pred, y):
    with closing(sqlite3.connect({store!r})) as db:
        SEEN.append(db.execute("SELECT count(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                               "WHERE r.status = 'RUNNING' AND m.key = 'train_loss'").fetchone()[0])
    return DIGITS.metrics(pred, y)

EXPERIMENT = replace(DIGITS, name="watching", metrics=metrics)
"""


@pytest.mark.slow  # two trainings (a search's: four) that read their store every batch
@pytest.mark.parametrize("command", [["train", "--epochs", "6"],
                                     ["search", "--n-trials", "2", "--epochs-range", "6", "7", "--seed", "0",
                                      "--pairs", "adam+cross_entropy", "--no-progress"]], ids=["train", "search"])
def test_a_running_run_shows_its_curves_as_it_trains_and_each_step_once(in_workdir, cli_in_process, tmp_path,
                                                                        monkeypatch, command):
    """With the live interval at 0 (a write every epoch while none is in flight), the running run's
    train_loss grows in the store while it trains; at the end each curve holds every epoch once, with
    the values of a run that sent nothing while it trained."""
    from harness import tracking

    def trained(interval: float, name: str) -> dict:
        code = tmp_path / f"{name}.py"
        code.write_text(WATCHING.format(store=str(in_workdir / "mlflow.db")) + f"# {name}\n")
        monkeypatch.setattr(tracking, "LIVE_SECONDS", interval)
        before = set(runs_of(in_workdir)[1])
        study = ["--study-name", name] if command[0] == "search" else []
        out = cli_in_process(*command, *study, "--experiment", code, "--set", "batch_size=256", cwd=in_workdir)
        assert out.returncode == 0, out.stderr
        client, found = runs_of(in_workdir)
        new = sorted((r for run_id, r in found.items() if run_id not in before and "train_loss" in r.data.metrics),
                     key=lambda r: r.info.run_name)
        names = [n for n in new[0].data.metrics if not n.startswith(("final_", "best_"))]
        return load(str(code)).metrics.__globals__["SEEN"], [curves(client, r.info.run_id, names) for r in new]

    seen, live = trained(0.0, "live")
    assert max(seen) >= 2, seen  # points of a RUNNING run, seen by the run itself as it trains
    quiet_seen, quiet = trained(10.0 ** 9, "quiet")
    assert max(quiet_seen) == 0 and live == quiet  # the same values, and each step once: 0, 1, ... in order
    assert all([step for step, _ in points] == list(range(len(points))) for run in live for points in run.values())


@pytest.fixture
def served(cluster_services):
    """The session's PostgreSQL and `mlflow server` with served artifacts: its URI and login."""
    return cluster_services["tracking_uri"], cluster_services["login"]


@pytest.mark.slow  # PostgreSQL and a tracking server
def test_train_resumes_from_a_checkpoint_on_the_tracking_server(served, tmp_path, cli_in_process):
    """The checkpoints go to the server's artifact store and come back from it: a run stopped there
    and resumed ends as the run never stopped."""
    from harness.runs import load_state_dict

    uri, login = served
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "served-resume", **login}
    never = tmp_path / "never.py"
    never.write_text(STOPPING.format(stop_at=-1, where=tmp_path))
    assert cli_in_process("train", "--experiment", never, *FLAGS, cwd=tmp_path, env=env).returncode == 0
    per_epoch = (load(str(never)).metrics.__globals__["CALLS"][0] - 1) // 6
    stops = tmp_path / "stops.py"
    stops.write_text(STOPPING.format(stop_at=1 + 4 * per_epoch + 1, where=tmp_path))
    assert cli_in_process("train", "--experiment", stops, *FLAGS, cwd=tmp_path, env=env).returncode == 130
    client = MlflowClient(uri)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in login.items():
            patch.setenv(name, value)
        experiment = client.get_experiment_by_name("served-resume").experiment_id
        runs = {r.info.status: r for r in client.search_runs([experiment])}
        stopped, reference = runs["KILLED"].info.run_id, runs["FINISHED"].info.run_id
        assert runs["KILLED"].info.artifact_uri.startswith("mlflow-artifacts:")
        out = cli_in_process("train", "--experiment", stops, *FLAGS, "--resume", stopped, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        resumed = client.get_run(stopped)
        assert resumed.info.status == "FINISHED" and resumed.data.tags[RESUMED_TAG] == "4"
        names = [n for n in resumed.data.metrics if not n.startswith("final_")]
        assert curves(client, stopped, names) == curves(client, reference, names)
        weights = [load_state_dict(client, run) for run in (reference, stopped)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))


@pytest.mark.slow  # a whole batched search in-process
def test_a_stack_says_it_writes_no_checkpoints_and_writes_none(in_workdir, cli_in_process):
    """Under --batch K a stack's members start at epoch 0 together: no checkpoint is written for them,
    and the search says so once instead of leaving the user to find out after a preemption."""
    out = cli_in_process("search", "--batch", 4, "--n-trials", 4, "--epochs-range", 5, 6, "--pairs", "sgd+l1",
                         "--checkpoint-every", 1, "--no-progress", cwd=in_workdir)
    assert out.returncode == 0, out.stderr
    assert "--batch 4: trials trained in a stack write no checkpoints" in out.stderr
    assert not list((in_workdir / "mlruns").rglob("checkpoint-*.pt"))


def _tampered(case):
    def edit(state):
        if case == "a curve of 10 million zero-stride values":
            state["history"]["test_loss"] = torch.zeros(1, dtype=torch.float64).expand(10_000_000)
        elif case == "no model":
            del state["model"]
        elif case == "a torch generator state of 3 bytes":
            state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
        elif case == "a python generator state of the wrong size":
            state["rng"]["python"][1] = torch.zeros(5, dtype=torch.int64)
        elif case == "model tensors of other shapes":
            state["model"] = {k: torch.zeros(50, 50) for k in state["model"]}
        elif case == "curves this run does not record":
            state["history"]["../evil//x"] = state["history"]["train_loss"].clone()
        elif case == "an epoch count that is a bool":
            state["epochs_done"] = True
        elif case == "an epoch count without its curves":
            state["epochs_done"], state["history"] = 2, {}
        return state
    return edit


TAMPER_FLAGS = ["train", "--epochs", 12, "--checkpoint-every", 3, "--checkpoint-seconds", 0]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, migrated_db):
    """A store holding one run of TAMPER_FLAGS (checkpoints after epochs 3, 6, 9: slots 0, 1, 0), trained
    once for the module: each test resumes a copy of it (each trained its own)."""
    from conftest import main_in, new_store

    folder = new_store(tmp_path_factory.mktemp("checkpointed"), migrated_db)
    assert main_in(folder, *TAMPER_FLAGS) == 0
    return folder


def checkpointed_copy(checkpointed, tmp_path):
    """A copy of ``checkpointed`` to resume and damage, and its one run's id."""
    from conftest import copy_store

    workdir = copy_store(checkpointed, tmp_path / "store")
    _, found = runs_of(workdir)
    (run_id,) = found
    return workdir, run_id


# Each case trains again from epoch 0: the fast tier tampers in one way, the whole suite in every one.
@pytest.mark.parametrize("case", slow_cases([
    "a curve of 10 million zero-stride values", "no model", "a torch generator state of 3 bytes",
    "a python generator state of the wrong size", "model tensors of other shapes", "curves this run does not record",
    "an epoch count that is a bool", "an epoch count without its curves"]))
def test_a_checkpoint_tampered_inside_is_refused_in_one_line_and_the_run_trains_again(checkpointed, tmp_path,
                                                                                       cli_in_process, case):
    """Its format, config and experiment sha256 right, its inside not: refused in one line (not a
    traceback, not blamed on the experiment's code, no write that grows without bound), and the run
    trains again from epoch 0, ending FINISHED with each epoch once."""
    flags = TAMPER_FLAGS
    in_workdir, run_id = checkpointed_copy(checkpointed, tmp_path)
    client = runs_of(in_workdir)[0]
    client.set_terminated(run_id, "KILLED")  # as a run stopped early leaves it
    for slot in (0, 1):
        path = artifact_folder(in_workdir, run_id) / checkpoint_name(slot)
        torch.save(_tampered(case)(torch.load(path, weights_only=True)), path)
    out = cli_in_process(*flags, "--resume", run_id, cwd=in_workdir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "refused" in out.stderr and "experiment's code" not in out.stderr, out.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "test_loss")] == list(range(12))


@pytest.mark.slow  # whole trainings in-process
def test_one_slot_of_another_config_is_refused_and_the_other_used_and_an_empty_resume_is_refused(checkpointed, tmp_path,
                                                                                                   cli_in_process):
    flags = TAMPER_FLAGS
    in_workdir, run_id = checkpointed_copy(checkpointed, tmp_path)
    client = runs_of(in_workdir)[0]
    out = cli_in_process(*flags, "--resume", "", cwd=in_workdir)
    assert out.returncode == 2 and "--resume needs the id" in out.stderr and len(runs_of(in_workdir)[1]) == 1
    client.set_terminated(run_id, "KILLED")
    path = artifact_folder(in_workdir, run_id) / checkpoint_name(0)
    state = torch.load(path, weights_only=True)
    state["config"]["seed"] = 7
    torch.save(state, path)
    out = cli_in_process(*flags, "--resume", run_id, cwd=in_workdir)
    assert out.returncode == 0 and "the other slot is used" in out.stderr, out.stderr
    assert client.get_run(run_id).data.tags[RESUMED_TAG] == "6"  # slot 1 (after epochs 3, 6, 9: slots 0, 1, 0)
