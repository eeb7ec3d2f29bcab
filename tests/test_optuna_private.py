"""Every private Optuna API the harness uses (harness/search/optuna_private.py) still does what the
harness relies on. A failure here after an Optuna upgrade names the one that changed; the pin in
pyproject.toml admits only the versions this passed on."""
import re
import tomllib
import warnings

import optuna
import pytest
from packaging.specifiers import SpecifierSet

from conftest import ROOT
from harness.search import optuna_private, study as study_module
from harness.search.storages import StudyFull


def test_the_installed_optuna_is_a_tested_release_inside_the_pin():
    from harness import compat

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in deps if re.match(r"optuna\b", d)]
    assert optuna.__version__ in SpecifierSet(pin.removeprefix("optuna")), (optuna.__version__, pin)
    assert optuna.__version__ in compat.OPTUNA_TESTED, (
        f"Optuna {optuna.__version__} is not in compat.OPTUNA_TESTED: if this file passes on it, add it there")


def test_an_optuna_without_the_creation_hook_refuses_the_cap_instead_of_ignoring_it(tmp_path, monkeypatch):
    from harness.errors import UsageError

    monkeypatch.setattr(optuna_private, "has_hook", lambda cls, name: name != optuna_private.CREATE_TRIAL_HOOK)
    with pytest.raises(UsageError, match=r"^--max-trials 2 on a database storage needs Optuna's "
                                         r"RDBStorage\._create_new_trial, which Optuna .* does not have"):
        study_module.open_storage(f"sqlite:///{tmp_path / 'o.db'}", max_trials=2)
    assert study_module.open_storage(f"sqlite:///{tmp_path / 'o.db'}").max_trials is None  # no cap: nothing needed
    journal = study_module.open_storage(f"journal:{tmp_path / 'j.log'}", max_trials=2)  # the journal's is public
    study = optuna.create_study(storage=journal)
    study.ask(), study.ask()
    with pytest.raises(StudyFull):
        study.ask()


def test_the_trial_cap_sits_where_optunas_cache_creates_trials(tmp_path):
    # The cache wrapper must call the RDB backend's private creation method, where the cap is.
    storage = study_module.open_storage(f"sqlite:///{tmp_path / 'o.db'}", max_trials=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(storage=storage)
        assert type(optuna_private.storage_of(study)).__name__ == "_CachedStorage"
        assert optuna_private.backend(optuna_private.storage_of(study)) is storage
        study.ask(), study.ask()
        with pytest.raises(StudyFull):
            study.ask()


def test_the_trial_model_counts_a_studys_trials(tmp_path):
    from sqlalchemy import func, select

    storage = study_module.open_storage(f"sqlite:///{tmp_path / 'o.db'}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(storage=storage)
        study.ask()
        study.tell(study.ask(), 1.0)
    trials = optuna_private.trial_model()
    with storage.engine.connect() as connection:
        count = connection.execute(select(func.count()).select_from(trials).where(
            trials.study_id == study._study_id, trials.state.in_([optuna.trial.TrialState.COMPLETE]))).scalar_one()
    assert count == 1


def test_journal_file_lock_and_trial_ids(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    path = str(tmp_path / "j.log")
    backend = JournalFileBackend(path)
    storage = optuna.storages.JournalStorage(backend)
    assert optuna_private.journal_file(storage) == path
    study = optuna.create_study(storage=storage)
    study.tell(study.ask(), 2.0)
    [frozen] = study.trials
    assert storage.get_trial(optuna_private.trial_id(frozen)).number == frozen.number
    with optuna_private.journal_lock(backend):  # Optuna's own lock, taken and released
        pass
    with optuna_private.journal_lock(backend):
        pass
    study.tell(study.ask(), 1.0)  # and Optuna's appends still take it afterwards
    assert len(optuna.load_study(study_name=study.study_name, storage=storage).trials) == 2
