"""Every run says where it came from beyond its config (issue 29): the commit and uncommitted changes
of the experiment's code and of the harness's, the installed packages, the data and the machine;
`harness reproduce` names each way a re-run's differ before its verdict."""
import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import ROOT, all_runs, client_for, copy_store, new_store, redirects_restored
from harness import provenance, schema
from harness.urls import local_folder
from harness.cli import main

TRAIN = ["train", "--epochs", "3"]
EVERY_RUN = {schema.GIT_COMMIT_TAG, schema.SOURCE_NAME_TAG, schema.SOURCE_TYPE_TAG, schema.USER_TAG,
             schema.SOURCE_DIRTY_TAG, schema.HARNESS_COMMIT_TAG, schema.HARNESS_DIRTY_TAG, schema.PACKAGES_TAG,
             schema.data_tag("train"), schema.data_tag("test"), schema.HOST_TAG, schema.CPU_TAG, schema.GPU_TAG,
             schema.CUDA_TAG, schema.PYTHON_TAG}


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def forget() -> None:
    """A new process's state: nothing worked out yet."""
    for cached in (provenance.code, provenance._checkout, provenance._harness_code, provenance.requirements,
                   provenance.machine, provenance.held_out_tag):
        cached.cache_clear()
    provenance._data.clear()


def artifact(client, run_id: str, name: str, tmp_path) -> bytes:
    return Path(client.download_artifacts(run_id, name, str(tmp_path))).read_bytes()


def test_a_train_run_records_its_code_packages_data_and_machine(in_workdir, tmp_path):
    assert main(TRAIN) == 0
    [run] = all_runs(in_workdir)
    tags, client = run.data.tags, client_for(in_workdir)
    assert EVERY_RUN <= set(tags)
    # This checkout's commit, for the experiment (experiments/ here) and the harness alike.
    head = git(ROOT, "rev-parse", "HEAD")
    assert tags[schema.GIT_COMMIT_TAG] == tags[schema.HARNESS_COMMIT_TAG] == head
    assert tags[schema.SOURCE_NAME_TAG] == str(ROOT / "experiments" / "linear_regression.py")
    assert tags[schema.SOURCE_TYPE_TAG] == "LOCAL"
    dirty = git(ROOT, "status", "--porcelain") != ""
    assert tags[schema.HARNESS_DIRTY_TAG] == str(dirty).lower()
    if dirty:  # the changes themselves are among the run's artifacts
        diff = artifact(client, run.info.run_id, tags[schema.HARNESS_DIFF_TAG], tmp_path)
        assert hashlib.sha256(diff).hexdigest()[:16] in tags[schema.HARNESS_DIFF_TAG]
    # The packages: the list the run keeps, and its sha256 on the run.
    name = provenance.requirements_artifact(tags[schema.PACKAGES_TAG])
    listed = artifact(client, run.info.run_id, name, tmp_path)
    assert hashlib.sha256(listed).hexdigest() == tags[schema.PACKAGES_TAG]
    assert f"torch=={torch.__version__}" in listed.decode().splitlines()
    # The data as the experiment returns it, and the machine: a CPU run names no GPU.
    from harness.experiment import load

    data = load("linear_regression").load_data()
    assert tags[schema.data_tag("train")] == provenance.digest((data.X_train, data.y_train)).hexdigest()
    assert tags[schema.data_tag("test")] == provenance.digest((data.X_test, data.y_test)).hexdigest()
    assert tags[schema.GPU_TAG] == "none used (device cpu)" and schema.GPU_DRIVER_TAG not in tags
    assert tags[schema.CUDA_TAG] == (torch.version.cuda or "none")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, migrated_db):
    """One study searched twice in-process, as a new process would (4 trials, then 2 more), made once
    for the module (three tests each ran a search of their own), and what working out provenance
    cost it: (folder, {"checkouts": ..., "requirements": ..., "hashed": ...})."""
    import signal

    folder = new_store(tmp_path_factory.mktemp("searched"), migrated_db)
    forget()
    hashed = []
    real = provenance._hashed
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # main() ends ignoring them
    with redirects_restored(), pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        patch.setattr(provenance, "_hashed", lambda value: hashed.append(1) or real(value))
        try:
            assert main(["search", "--n-trials", "4", "--no-progress", "--epochs-range", "5", "10"]) == 0
            assert main(["search", "--n-trials", "2", "--no-progress", "--epochs-range", "5", "10"]) == 0
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
    return folder, {"checkouts": provenance._checkout.cache_info().misses,
                    "requirements": provenance.requirements.cache_info().misses, "hashed": len(hashed)}


@pytest.mark.slow  # whole trainings, searches and reproductions in-process
def test_a_search_s_trials_carry_the_parent_s_provenance_and_point_to_its_artifacts(searched, tmp_path):
    folder, _ = searched
    runs = all_runs(folder)
    [parent] = [r for r in runs if r.data.tags.get(schema.ROLE_TAG) == schema.ROLE_STUDY]
    trials = [r for r in runs if r.data.tags.get(schema.PARENT_TAG) == parent.info.run_id]
    assert len(trials) == 4 + 2
    client = client_for(folder)
    for run in [parent, *trials]:
        assert EVERY_RUN <= set(run.data.tags), run.info.run_name
        # The search holds out valid_fraction of the training data: which samples, recorded.
        assert schema.data_tag("held_out") in run.data.tags
    for trial in trials:
        assert {k: trial.data.tags[k] for k in EVERY_RUN} == {k: parent.data.tags[k] for k in EVERY_RUN}
        assert client.list_artifacts(trial.info.run_id, "provenance") == []  # once, on the parent
    name = provenance.requirements_artifact(parent.data.tags[schema.PACKAGES_TAG])
    listed = artifact(client, parent.info.run_id, name, tmp_path)
    assert hashlib.sha256(listed).hexdigest() == parent.data.tags[schema.PACKAGES_TAG]


@pytest.mark.slow  # the module's two searches (~4 s idle)
def test_provenance_is_worked_out_once_per_process(searched):
    folder, worked_out = searched
    assert len(all_runs(folder)) == 4 + 2 + 1
    assert worked_out["checkouts"] == 1  # the experiment and the harness share a checkout
    assert worked_out["requirements"] == 1
    # Each search loads its experiment's data once: each split hashed once per search, never per trial.
    assert worked_out["hashed"] == 2 * 2


def test_uncommitted_changes_are_kept_as_a_diff_and_a_big_one_is_cut(tmp_path, monkeypatch):
    forget()
    repo = tmp_path / "code"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "exp.py").write_text("A = 1\n")
    git(repo, "add", "exp.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "first")
    clean = provenance.code(repo)
    assert clean.commit == git(repo, "rev-parse", "HEAD") and clean.dirty == "false" and clean.diff == b""
    (repo / "exp.py").write_text("A = 2\n")
    (repo / "new.py").write_text("B = 1\n")
    forget()
    changed = provenance.code(repo)
    assert changed.dirty == "true" and b"+A = 2" in changed.diff and b"# untracked: new.py" in changed.diff
    forget()
    monkeypatch.setattr(provenance, "MAX_DIFF_BYTES", 20)
    cut = provenance.code(repo).diff
    assert cut.startswith(changed.diff[:20]) and f"# diff cut here: {len(changed.diff)} bytes in all".encode() in cut


@pytest.mark.slow  # whole trainings, searches and reproductions in-process
def test_no_git_or_no_checkout_says_so_and_the_run_goes_on(in_workdir, tmp_path, monkeypatch):
    forget()
    mine = tmp_path / "mine"  # not a git checkout
    mine.mkdir()
    source = (ROOT / "experiments" / "linear_regression.py").read_text()
    (mine / "my_experiment.py").write_text(source.replace('name="linear_regression"', 'name="mine"'))
    assert main([*TRAIN, "--experiment", str(mine / "my_experiment.py")]) == 0
    [run] = all_runs(in_workdir)
    assert run.data.tags[schema.GIT_COMMIT_TAG] == provenance.NOT_GIT == run.data.tags[schema.SOURCE_DIRTY_TAG]
    assert run.data.tags[schema.HARNESS_COMMIT_TAG] == git(ROOT, "rev-parse", "HEAD")
    forget()
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert provenance.code(ROOT) == provenance.Code(provenance.NOT_GIT, provenance.NOT_GIT)


def test_a_dataset_is_hashed_sample_by_sample_with_dtype_and_shape():
    from torch.utils.data import TensorDataset

    X = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    same = provenance.digest(TensorDataset(X, X.sum(1))).hexdigest()
    assert provenance.digest(TensorDataset(X.clone(), X.sum(1))).hexdigest() == same
    other = X.clone()
    other[5, 1] += 1
    assert provenance.digest(TensorDataset(other, X.sum(1))).hexdigest() != same
    # The same bytes as another dtype or shape are other data.
    assert provenance.digest(X).hexdigest() != provenance.digest(X.view(torch.int32)).hexdigest()
    assert provenance.digest(X).hexdigest() != provenance.digest(X.reshape(3, 4)).hexdigest()


def recorded_otherwise(client: MlflowClient, run_id: str, holder: str | None = None) -> str:
    """The run's record as another machine would have left it: other data, packages, commit, host;
    its packages' list among the artifacts of ``holder`` (a trial's parent run), else its own."""
    changed = provenance.requirements().decode().replace(f"torch=={torch.__version__}", "torch==1.0.0")
    changed += "zz-gone-package==0.1\n"
    sha = hashlib.sha256(changed.encode()).hexdigest()
    # Into the run's folder itself: MLflow keeps one artifact store per run id for the whole process,
    # so log_artifact would write to the first store that run id was seen in, not to a copy of it.
    listed = local_folder(client.get_run(holder or run_id).info.artifact_uri) / provenance.requirements_artifact(sha)
    listed.parent.mkdir(parents=True, exist_ok=True)
    listed.write_text(changed)
    for tag, value in {schema.PACKAGES_TAG: sha, schema.data_tag("train"): "0" * 64,
                       schema.HARNESS_COMMIT_TAG: "1" * 40, schema.HOST_TAG: "elsewhere"}.items():
        client.set_tag(run_id, tag, value)
    return sha


@pytest.mark.slow  # whole trainings, searches and reproductions in-process
def test_reproduce_names_every_difference_of_provenance_before_its_verdict(in_workdir, cli_in_process):
    assert main(TRAIN) == 0
    [run] = all_runs(in_workdir)
    run_id = run.info.run_id
    same = cli_in_process("reproduce", run_id, cwd=in_workdir)
    assert same.returncode == 0 and "bitwise identical" in same.stdout
    assert "harness: other" not in same.stderr  # the same process: nothing differs
    recorded_otherwise(client_for(in_workdir), run_id)
    out = cli_in_process("reproduce", run_id, cwd=in_workdir)
    assert out.returncode == 0 and "bitwise identical" in out.stdout, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("harness: other")]
    assert lines == [
        f"harness: other data: the train split's sha256 is {'0' * 16} in the run, "
        f"{run.data.tags[schema.data_tag('train')][:16]} here",
        f"harness: other packages: torch 1.0.0 -> {torch.__version__}; zz-gone-package 0.1 removed",
        f"harness: other commit or changes of the harness's code: commit {'1' * 12} with "
        f"{_changes(run.data.tags)} in the run, commit {run.data.tags[schema.HARNESS_COMMIT_TAG][:12]} with "
        f"{_changes(run.data.tags)} here",
        f"harness: other host: 'elsewhere' in the run, {run.data.tags[schema.HOST_TAG]!r} here",
    ], out.stderr


@pytest.mark.slow  # whole trainings, searches and reproductions in-process
def test_reproducing_a_trial_finds_its_packages_on_the_study_s_parent_run(searched, tmp_path, cli_in_process):
    workdir = copy_store(searched[0], tmp_path / "copy")  # the module's search, to write to
    trial = next(r for r in all_runs(workdir) if schema.PARENT_TAG in r.data.tags and r.info.status == "FINISHED")
    recorded_otherwise(client_for(workdir), trial.info.run_id, holder=trial.data.tags[schema.PARENT_TAG])
    out = cli_in_process("reproduce", trial.info.run_id, cwd=workdir)
    assert out.returncode == 0 and "bitwise identical" in out.stdout, out.stderr
    assert f"harness: other packages: torch 1.0.0 -> {torch.__version__}; zz-gone-package 0.1 removed\n" in out.stderr


def _changes(tags) -> str:
    if tags[schema.HARNESS_DIRTY_TAG] != "true":
        return "no uncommitted changes"
    return f"uncommitted changes ({tags[schema.HARNESS_DIFF_TAG]!r})"


@pytest.mark.slow  # whole trainings, searches and reproductions in-process
def test_a_run_recorded_before_provenance_says_so_in_one_line(in_workdir, cli_in_process):
    assert main(TRAIN) == 0
    [run] = all_runs(in_workdir)
    client = client_for(in_workdir)
    for tag in run.data.tags:
        if tag in EVERY_RUN or tag.startswith(("harness.data_sha256.", "harness.git.", "harness.source.")):
            client.delete_tag(run.info.run_id, tag)
    out = cli_in_process("reproduce", run.info.run_id, cwd=in_workdir)
    assert out.returncode == 0 and "bitwise identical" in out.stdout
    said = [line for line in out.stderr.splitlines() if "provenance" in line or line.startswith("harness: other")]
    assert said == [f"harness: run {run.info.run_id} recorded no provenance (logged before the harness recorded "
                    "it): its code, packages, data and machine are not compared"]


def test_a_run_mlflow_run_made_keeps_mlflow_s_source_tags(in_workdir, monkeypatch):
    client = client_for(in_workdir)
    made = client.create_run("0", tags={schema.SOURCE_TYPE_TAG: "PROJECT", schema.SOURCE_NAME_TAG: "file:///project",
                                        schema.GIT_COMMIT_TAG: "2" * 40})
    monkeypatch.setenv("MLFLOW_RUN_ID", made.info.run_id)
    assert main(TRAIN) == 0
    tags = client.get_run(made.info.run_id).data.tags
    assert (tags[schema.SOURCE_TYPE_TAG], tags[schema.SOURCE_NAME_TAG], tags[schema.GIT_COMMIT_TAG]) == (
        "PROJECT", "file:///project", "2" * 40)
    assert tags[schema.PACKAGES_TAG] == hashlib.sha256(provenance.requirements()).hexdigest()


@pytest.mark.parametrize("tag", ["../../../etc/passwd", "x" * 64, ""])
def test_a_packages_tag_that_is_no_sha256_names_no_artifact(tag):
    assert provenance.requirements_artifact(tag) is None


def test_a_cuda_run_names_its_gpu_and_driver_and_a_cpu_run_never_starts_cuda(tmp_path, monkeypatch):
    forget()
    started = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: started.append(device) or "NVIDIA H200")
    assert provenance.machine("cpu")[schema.GPU_TAG] == "none used (device cpu)" and started == []
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    monkeypatch.setattr(provenance, "NVIDIA_VERSION", driver)
    tags = provenance.machine("cuda")
    assert (tags[schema.GPU_TAG], tags[schema.GPU_DRIVER_TAG]) == ("NVIDIA H200", "550.54.15")
    forget()
    monkeypatch.setattr(provenance, "NVIDIA_VERSION", tmp_path / "absent")
    assert provenance.machine("cuda")[schema.GPU_DRIVER_TAG] == "unknown"
    forget()
