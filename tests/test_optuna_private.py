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
from harness.search import study as study_module
from harness.search.durable import optuna_private


def test_the_installed_optuna_is_a_tested_release_inside_the_pin():
    from harness import compat

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in deps if re.match(r"optuna\b", d)]
    assert optuna.__version__ in SpecifierSet(pin.removeprefix("optuna")), (optuna.__version__, pin)
    assert optuna.__version__ in compat.OPTUNA_TESTED, (
        f"Optuna {optuna.__version__} is not in compat.OPTUNA_TESTED: if this file passes on it, add it there")


def test_the_worker_is_named_where_optunas_cache_creates_trials(tmp_path):
    # The cache wrapper must call the RDB backend's private creation method, where the trial gets its
    # worker in the same write (a sampler's before_trial runs after it, inside study.ask()).
    from harness.schema import WORKER_ATTR
    from harness.search.durable.workers import identity

    storage = study_module.open_storage(f"sqlite:///{tmp_path / 'o.db'}")
    seen = []

    class Sampler(optuna.samplers.RandomSampler):
        def before_trial(self, study, trial):
            seen.append(trial.user_attrs.get(WORKER_ATTR))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(storage=storage, sampler=Sampler())
        assert type(optuna_private.storage_of(study)).__name__ == "_CachedStorage"
        assert optuna_private.backend(optuna_private.storage_of(study)) is storage
        study.ask()
    assert seen == [identity()]


def test_the_stale_check_sits_where_optunas_heartbeat_asks_for_stale_trials(tmp_path, monkeypatch):
    # fail_stale_trials, through Optuna's cache wrapper, must ask the RDB backend's private method
    # (storages.py keeps a live worker's trial out of its answer there).
    from optuna.storages import fail_stale_trials

    storage = study_module.open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat=1)
    asked = []
    monkeypatch.setattr(type(storage), optuna_private.STALE_TRIALS_HOOK, lambda self, study_id: asked.append(study_id) or [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(storage=storage)
        assert type(optuna_private.storage_of(study)).__name__ == "_CachedStorage"
        assert optuna_private.backend(optuna_private.storage_of(study)) is storage
        fail_stale_trials(study)
    assert asked == [study._study_id]


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
