"""What a person sees in `mlflow ui` while a search runs and after it, checked in headless Chromium (skipped without it).

Screenshots go to $HARNESS_UI_SCREENSHOTS when set (else the test's tmp folder), to look at.
"""
import base64
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from browser import Browser, chromium
from conftest import cli_env, client_for
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


def test_the_parent_run_tells_the_story_and_pruned_trials_say_so(workdir, tmp_path, cli_in_process):
    """The search in-process (was a process): the UI's server reads what it wrote."""
    out = cli_in_process("search", "--n-trials", 10, "--seed", 1, "--no-progress", cwd=workdir)
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


def test_a_two_objective_study_shows_its_pareto_front_on_the_parent_run(workdir, tmp_path, cli_in_process):
    """The search in-process (was a process): the UI's server reads what it wrote."""
    out = cli_in_process("search", "--objectives", "valid_loss", "epochs", "--sampler", "nsga2", "--n-trials", 6,
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


# A trial that trains until the test lets it finish: each epoch waits a little, so that it runs past
# the live interval, until the file named `release` exists (at most five minutes).
SLOW = """
import os
import time
from dataclasses import replace
from experiments.linear_regression import EXPERIMENT as BASE

STARTED = time.time()

def metrics(pred, y):
    if not os.path.exists({release!r}) and time.time() - STARTED < 300:
        time.sleep(0.05)
    return {{}}

EXPERIMENT = replace(BASE, name="slow", metrics=metrics)
"""


def test_a_running_trials_curves_and_the_running_trial_show_in_mlflow_ui_before_it_ends(workdir, tmp_path):
    """Issue 28: while a trial trains, its run page shows the curves logged so far (the metrics table
    a value the run logged, the charts drawn lines), and the parent run's page shows it among the
    running trials with its epochs; the trial is still RUNNING when all of it has shown."""
    release = tmp_path / "release"
    code = tmp_path / "slow.py"
    code.write_text(SLOW.format(release=str(release)))
    search = subprocess.Popen([sys.executable, "-m", "harness", "search", "--experiment", str(code), "--n-trials", "1",
                               "--epochs-range", "2000", "2001", "--seed", "0", "--no-progress"],
                              cwd=workdir, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shots, client = _shots(tmp_path), client_for(workdir)
    try:
        server = TrackingServer(f"sqlite:///{workdir / 'mlflow.db'}", tmp_path / "served", workers=1).start()
        try:
            running = _running_trial_shown(client, search)  # in the store first: what the pages are to show
            run_id, parent = running.info.run_id, running.data.tags["mlflow.parentRunId"]
            number, experiment_id = running.data.tags["optuna.trial_number"], running.info.experiment_id
            with Browser() as browser:
                login = base64.b64encode(f"{ADMIN}:{server.password}".encode()).decode()
                browser.send("Network.enable")
                browser.send("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {login}"}})
                browser.open(f"{server.url}/#/experiments/{experiment_id}/runs/{parent}")
                browser.wait_for_text("Running now:", "epochs done", f"trial-{number}", timeout=90)
                browser.evaluate("[...document.querySelectorAll('button, a, span')]"
                                 ".find(e => e.innerText === 'Show more')?.click()")
                browser.evaluate("[...document.querySelectorAll('strong')]"
                                 ".find(e => e.innerText.startsWith('Running now'))?.scrollIntoView()")
                browser.screenshot(shots / "live_parent_run.png")

                browser.open(f"{server.url}/#/experiments/{experiment_id}/runs/{run_id}")
                text = browser.wait_for_text("Metrics (", "train_loss\n", "valid_loss\n", timeout=60)
                shown = float(text.split("train_loss\n", 1)[1].split("\n", 1)[0])
                browser.screenshot(shots / "live_trial_overview.png")
                browser.open(f"{server.url}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics")
                browser.wait_for_text("train_loss", "valid_loss", timeout=60)
                # A chart's line: Plotly's path through two points or more ("M x,y L x,y ...").
                drawn = "[...document.querySelectorAll('.js-plotly-plot path.js-line')].some(p => " \
                        "(p.getAttribute('d') || '').includes('L'))"
                deadline = time.time() + 60
                while not browser.evaluate(drawn) and time.time() < deadline:
                    time.sleep(0.5)
                browser.screenshot(shots / "live_trial_curves.png")
                assert browser.evaluate(drawn)
        finally:
            server.stop()
        assert client.get_run(run_id).info.status == "RUNNING"  # all of it shown before the trial ended
        assert shown in [m.value for m in client.get_metric_history(run_id, "train_loss")]
    finally:
        release.touch()
        out, err = search.communicate(timeout=180)
    assert search.returncode == 0, err
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "**Trials:** 1 (1 complete)" in note and "Running now" not in note  # the summary replaced it
    assert (shots / "live_trial_curves.png").stat().st_size > 10_000


def _running_trial_shown(client, search):
    """The running trial's run, once it holds curve points and the parent's description shows it with
    its epochs (bounded by the trial's own five minutes)."""
    while search.poll() is None:
        everywhere = [e.experiment_id for e in client.search_experiments()]
        for run in client.search_runs(everywhere, "attributes.status = 'RUNNING'"):
            parent = run.data.tags.get("mlflow.parentRunId")
            if not parent or not client.get_metric_history(run.info.run_id, "train_loss"):
                continue
            note = client.get_run(parent).data.tags.get("mlflow.note.content", "")
            number = run.data.tags["optuna.trial_number"]
            if re.search(rf"\| {number} \| [1-9]\d* / 200[01] \|.*\[trial-{number}\]\(", note):
                return run
        time.sleep(0.5)
    raise AssertionError(f"the search ended first: {search.communicate()}")
