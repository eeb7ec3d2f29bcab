"""What a person sees in `mlflow ui` after a search, checked in headless Chromium (skipped without it).

Screenshots go to $HARNESS_UI_SCREENSHOTS when set (else the test's tmp folder), to look at.
"""
import base64
import contextlib
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

from browser import Browser, chromium
from conftest import client_for, run_cli
from harness.cluster import ADMIN, TrackingServer
from search_helpers import journal_study

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium() is None, reason="needs Chromium (Debian: apt-get install chromium)")]


def _shots(tmp_path) -> Path:
    folder = Path(os.environ.get("HARNESS_UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def experiment_of(workdir, run_id: str) -> str:
    """The MLflow experiment a run is in (a search's: the one named after its harness experiment)."""
    return client_for(workdir).get_run(run_id).info.experiment_id


@contextlib.contextmanager
def parent_page(workdir, tmp_path, parent: str, *needles: str):
    """A browser on the study's parent run in `mlflow ui`, once ``needles`` show, its description expanded."""
    server = TrackingServer(f"sqlite:///{workdir / 'mlflow.db'}", tmp_path / "served", workers=1).start()
    try:
        with Browser() as browser:
            # The login a person types into the browser's prompt, which then goes with every request.
            login = base64.b64encode(f"{ADMIN}:{server.password}".encode()).decode()
            browser.send("Network.enable")
            browser.send("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {login}"}})
            browser.open(f"{server.url}/#/experiments/{experiment_of(workdir, parent)}/runs/{parent}")
            browser.wait_for_text("Optuna study linear_regression-search", *needles, timeout=90)
            browser.evaluate("[...document.querySelectorAll('button, a, span')]"
                             ".find(e => e.innerText === 'Show more')?.click()")
            yield browser, server.url
    finally:
        server.stop()
    shutil.rmtree(tmp_path / "served", ignore_errors=True)


def test_the_parent_run_tells_the_story_and_pruned_trials_say_so(workdir, tmp_path):
    out = run_cli("search", "--n-trials", 10, "--seed", 1, "--no-progress", cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    parent = study.user_attrs["mlflow_parent_run_id"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, "the check needs a pruned trial: choose another seed"
    # The default cadence on the default space: a report every 20th epoch, from epoch 0.
    assert all(step % 20 == 0 for t in study.trials for step in t.intermediate_values)
    shots = _shots(tmp_path)
    with parent_page(workdir, tmp_path, parent, "Search space:") as (browser, url):
        best = study.best_trial
        text = browser.wait_for_text(
            f"Trials: 10 ({10 - len(pruned)} complete, {len(pruned)} pruned)",
            f"trial-{best.number}",  # the top trials' table, each a link to its run
            f"harness reproduce {best.user_attrs['mlflow_run_id']}",
            "space.lr", "[0.0001, 0.1] log", "study.sampler", "TPESampler", "study.report_every\n20", "best_final_test_loss",
            "best_final_valid_loss", "best_weight", "Selected on")
        assert "rank\ttrial\tvalid_loss" in text  # rendered as a Markdown table, not as raw pipes
        browser.screenshot(shots / "parent_run.png")

        # The runs table, filtered as the UI guide (docs/ui.md) says, and the study expanded.
        where = urllib.parse.quote("tags.optuna.trial_state = 'PRUNED'")
        browser.open(f"{url}/#/experiments/{experiment_of(workdir, parent)}/runs?searchFilter={where}")
        browser.wait_for_text(f"{len(pruned) + 1} matching runs", timeout=60)
        deadline = time.time() + 30
        while "(pruned at epoch" not in browser.text() and time.time() < deadline:
            browser.evaluate("document.querySelector('[role=gridcell] button')?.click()")
            time.sleep(1)
        text = browser.wait_for_text(*(f"trial-{t.number} (pruned at epoch" for t in pruned), timeout=5)
        browser.screenshot(shots / "pruned_runs.png")
    assert (shots / "parent_run.png").stat().st_size > 10_000


def test_a_two_objective_study_shows_its_pareto_front_on_the_parent_run(workdir, tmp_path):
    out = run_cli("search", "--objectives", "valid_loss", "epochs", "--sampler", "nsga2", "--n-trials", 6,
                  "--seed", 1, "--no-progress", cwd=workdir)
    assert out.returncode == 0, out.stderr
    study = journal_study(workdir)
    parent = study.user_attrs["mlflow_parent_run_id"]
    front = study.best_trials
    assert front
    shots = _shots(tmp_path)
    with parent_page(workdir, tmp_path, parent, "Pareto front:") as (browser, url):
        browser.wait_for_text(*(f"trial-{t.number}" for t in front), "study.objectives", "valid_loss epochs")
        browser.screenshot(shots / "pareto_parent_run.png")
        browser.open(f"{url}/#/experiments/{experiment_of(workdir, parent)}/runs/{parent}/artifacts/pareto_front.png")
        browser.wait_for_text("pareto_front.png", "pareto_front.csv", timeout=60)
        # The figure itself is shown: the artifact's bytes, fetched into an <img> (a blob: URL), loaded.
        shown = "[...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 300)"
        deadline = time.time() + 30
        while not browser.evaluate(shown) and time.time() < deadline:
            time.sleep(1)
        browser.screenshot(shots / "pareto_front_artifact.png")
        assert browser.evaluate(shown)
