"""The one ask-and-tell loop every search runs (harness/search/loop.py), driven with plain objective
functions on a real journal or SQLite storage, read back with plain Optuna: what ``study.optimize``
gave a trial (FAIL on a raise or a NaN, PRUNED, a timeout, threads) and ``--max-trials`` across
threads and workers."""
import os
import threading

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from conftest import slow_cases
from harness.search import loop
from harness.search.study import open_storage

pytestmark = [
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# An Optuna SQLite storage builds its schema (~0.5 s a test): the fast tier runs each test on a journal.
@pytest.fixture(params=slow_cases(["journal", "sqlite"]))
def storage_url(request, tmp_path) -> str:
    return f"journal:{tmp_path / 'j.log'}" if request.param == "journal" else f"sqlite:///{tmp_path / 'o.db'}"


def stored(url: str, name: str = "s") -> list:
    """The study's trials as plain Optuna reads them back (no harness code)."""
    storage = JournalStorage(JournalFileBackend(url.split(":", 1)[1])) if url.startswith("journal:") else url
    return optuna.load_study(study_name=name, storage=storage).trials


def test_each_trial_is_told_as_optimize_would_and_names_its_worker(storage_url):
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url))
    outcomes = iter([1.0, float("nan"), optuna.TrialPruned()])

    def objective(trial):
        trial.report(0.5, 0)
        outcome = next(outcomes)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    loop.optimize(study, objective, 3)
    trials = stored(storage_url)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert trials[0].value == 1.0
    assert {t.user_attrs["harness.worker"]["pid"] for t in trials} == {os.getpid()}


def test_a_raising_objective_is_told_fail_and_the_error_ends_the_search(storage_url):
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url))

    def objective(trial):
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        loop.optimize(study, objective, 5)
    assert [t.state for t in stored(storage_url)] == [TrialState.FAIL]


def test_threads_share_n_trials_and_stop_at_the_cap(storage_url):
    """--n-jobs 4 with --max-trials 6: exactly 6 trials, from more than one thread; a trial that
    failed frees its place, and a queued one is asked in the full study."""
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url))
    together = threading.Barrier(2)  # trials 0 and 1 run at once: in two threads, or trial 0 fails

    def objective(trial):
        if trial.number < 2:
            together.wait(timeout=60)
        return trial.suggest_float("x", 0, 1)

    loop.optimize(study, objective, 20, n_jobs=4, max_trials=6)
    assert [t.state for t in stored(storage_url)] == [TrialState.COMPLETE] * 6
    loop.optimize(study, objective, 20, n_jobs=4)  # no cap: --n-trials alone
    assert len(stored(storage_url)) == 26

    study.enqueue_trial({"x": 0.25})
    loop.optimize(study, objective, 5, max_trials=6)
    trials = stored(storage_url)
    assert len(trials) == 27 and trials[-1].params == {"x": 0.25} and trials[-1].state == TrialState.COMPLETE


def test_a_timeout_stops_before_the_next_ask(storage_url):
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url))
    loop.optimize(study, lambda trial: 1.0, 10, timeout=0)
    assert stored(storage_url) == []


def test_a_batch_of_a_full_study_is_cut_at_the_cap(storage_url):
    """--batch 4 with 2 places left asks 2 and trains them together."""
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url))
    batches = []

    class Batched:
        def run_batch(self, trials):
            from harness.search.trials import Told

            batches.append(len(trials))
            return [Told("COMPLETE", 1.0) for _ in trials]

    loop.optimize(study, Batched(), 8, 4, max_trials=2)
    assert batches == [2] and [t.state for t in stored(storage_url)] == [TrialState.COMPLETE] * 2


def test_a_trial_of_a_plain_storage_names_its_worker_as_it_is_asked():
    """A harness storage names the worker as it creates the trial (storages.py); any other gets it
    from loop.ask, before the trial trains."""
    study = optuna.create_study()  # in memory
    assert loop.ask(study).user_attrs["harness.worker"]["pid"] == os.getpid()


def test_a_grid_used_up_ends_the_search_with_every_trial_told(storage_url):
    """GridSampler calls study.stop() in after_trial once its grid is used up; outside Study.optimize
    Optuna refuses it mid-tell (a RuntimeError, the trial left RUNNING). The loop takes it as
    optimize does: the last grid point is told COMPLETE and no trial runs past the grid."""
    sampler = optuna.samplers.GridSampler({"x": [1.0, 2.0, 3.0]}, seed=0)
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url), sampler=sampler)
    loop.optimize(study, lambda trial: trial.suggest_float("x", 0, 5), 10)
    trials = stored(storage_url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert sorted(t.params["x"] for t in trials) == [1.0, 2.0, 3.0]
    loop.optimize(study, lambda trial: trial.suggest_float("x", 0, 5), 1)  # a later invocation: as optimize
    assert len(stored(storage_url)) == 4
