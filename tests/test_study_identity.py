"""A study resumes only with the experiment file it was created with: another file of the same
experiment name and space (other data, another model) would otherwise resume it silently, and its
best trial would compare losses of different code."""
import hashlib

import optuna
import pytest
from mlflow import MlflowClient

from conftest import ROOT, all_runs
from harness import schema
from harness.cli import main
from harness.errors import UsageError
from harness.experiment import load
from harness.search import space as space_module
from harness.search.study import create_study, existing_study, make_pruner, open_storage, record_source
from search_helpers import journal_study

SEARCH = ["search", "--n-trials", "1", "--epochs-range", "5", "10", "--pruner", "none", "--no-progress"]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # whole searches in-process
def test_another_file_of_the_same_experiment_is_refused_unless_allowed(in_workdir, capsys):
    assert main(SEARCH) == 0  # the bundled linear_regression, study linear_regression-search
    bundled = sha(ROOT / "experiments" / "linear_regression.py")
    assert journal_study(in_workdir).user_attrs[schema.STUDY_EXPERIMENT_SHA_ATTR] == bundled
    # A copy with other data: the same experiment name, so the same default study name and space.
    copy = in_workdir / "copy.py"
    copy.write_text((ROOT / "experiments" / "linear_regression.py").read_text().replace(
        "WEIGHT, BIAS = 0.7, 0.3", "WEIGHT, BIAS = 2.0, -1.0"))
    changed = sha(copy)
    journal, runs = (in_workdir / "optuna_journal.log").read_bytes(), len(all_runs(in_workdir))
    capsys.readouterr()

    assert main([*SEARCH, "--experiment", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and bundled[:12] in err and changed[:12] in err, err
    assert "--study-name" in err and "--allow-changed-experiment" in err
    assert (in_workdir / "optuna_journal.log").read_bytes() == journal and len(all_runs(in_workdir)) == runs

    assert main(SEARCH) == 0  # the file it was created with resumes it
    assert len(journal_study(in_workdir).trials) == 2

    # Accepted: the study records the new file and the trial it starts at; the trial's run has its sha256.
    assert main([*SEARCH, "--experiment", str(copy), "--allow-changed-experiment"]) == 0
    assert f"(was {bundled[:12]}) from trial 2 on" in capsys.readouterr().err
    study = journal_study(in_workdir)
    assert study.user_attrs[schema.STUDY_EXPERIMENT_SHA_ATTR] == changed
    assert study.user_attrs[schema.EXPERIMENT_CHANGES_ATTR] == [{"trial": 2, "sha256": changed, "was": bundled}]
    client = MlflowClient(f"sqlite:///{in_workdir / 'mlflow.db'}")
    shas = [client.get_run(t.user_attrs[schema.RUN_ATTR]).data.params[schema.EXPERIMENT_SHA_PARAM]
            for t in study.trials]
    assert shas == [bundled, bundled, changed]
    # From now on the study is the copy's: the bundled file is the changed one.
    assert main([*SEARCH, "--experiment", str(copy)]) == 0
    assert main(SEARCH) == 2
    assert len(journal_study(in_workdir).trials) == 4


def test_a_study_without_a_recorded_file_takes_the_first_it_resumes_with(tmp_path):
    experiment = load("linear_regression")
    options = dict(direction="minimize", sampler=None, pruner=make_pruner("none"),
                   space=space_module.resolve(experiment), experiment=experiment.name)
    url = f"journal:{tmp_path / 'j.log'}"
    create_study("old", open_storage(url), **options)  # as the harness made studies before it recorded the file
    study = existing_study("old", open_storage(url), **options, experiment_sha256=experiment.sha256)
    assert schema.STUDY_EXPERIMENT_SHA_ATTR not in study.user_attrs
    record_source(study, experiment.sha256)
    stored = optuna.load_study(study_name="old", storage=open_storage(url))
    assert stored.user_attrs[schema.STUDY_EXPERIMENT_SHA_ATTR] == experiment.sha256
    assert schema.EXPERIMENT_CHANGES_ATTR not in stored.user_attrs
    # Another worker's create_study, with another file, finds the study a moment after it was made.
    with pytest.raises(UsageError, match=f"sha256 {experiment.sha256[:12]}, not this one's {'0' * 12}"):
        create_study("old", open_storage(url), **options, experiment_sha256="0" * 64)
    with pytest.raises(UsageError, match="--allow-changed-experiment"):
        existing_study("old", open_storage(url), **options, experiment_sha256="0" * 64)
