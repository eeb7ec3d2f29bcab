"""Preemption (issue 28, item 3): SIGTERM (what a spot machine or a scheduler sends) or Ctrl-C while a
run that writes checkpoints trains stops it at the next batch boundary with one more checkpoint, and
closes it as interrupted; continued from that checkpoint (taken inside an epoch, as often as not), the
run ends bit for bit as one never stopped. `kill -9` loses what came after the last checkpoint, and
no more. A second signal, or a boundary that does not come within the grace, stops at once."""
import io
import os
import random
import signal
import time
from dataclasses import replace

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from conftest import all_runs, cli_env, client_for, copy_store, new_store, run_cli, slow_cases
from test_checkpoints import FLAGS, curves, resolved, runs_of

from harness import checkpoint, config, signals, training
from harness.experiment import Datasets, Experiment, load
from harness.runs import load_state_dict
from harness.schema import RESUMED_FROM_TAG, RESUMED_TAG

class Augmented(Dataset):
    """(x, y) samples whose input gets noise drawn from torch's generator (the one a run seeds) each
    time it is read: an augmentation, which reading the batches an epoch has done again draws anew."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(3), self.y[i]


def augmented_step(model, batch, loss_fn, cfg):
    x, y = batch
    return loss_fn(model(x), y)


AUGMENTED = Experiment("augmented", lambda: Datasets(Augmented(96, 0), Augmented(30, 1), Augmented(30, 2)),
                       lambda: nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1)), step=augmented_step,
                       defaults={"optimizer": "adam", "loss": "mse", "lr": 0.05, "epochs": 5, "batch_size": 16})

CASES = {
    "full batch": ("linear_regression", {"epochs": 8}),
    "mini-batch, shuffled": ("linear_regression", {"epochs": 6, "batch_size": 10}),
    "per-batch schedule (OneCycle)": ("linear_regression", {"epochs": 6, "batch_size": 10, "scheduler": "onecycle"}),
    "early stopping, adam": ("linear_regression", {"epochs": 20, "batch_size": 10, "patience": 3, "optimizer": "adam",
                                                   "lr": 0.05, "valid_fraction": 0.2}),
    "dropout": ("digits", {"epochs": 3, "batch_size": 128}),
    "Datasets, own step, augmentation": (AUGMENTED, {}),
}


@pytest.fixture
def fresh_signals(monkeypatch):
    """This test's signals only: none received before it, none kept after."""
    monkeypatch.setattr(signals, "_received", [])
    monkeypatch.setattr(signals, "_acted", [0])


def case(name):
    experiment, overrides = CASES[name]
    if isinstance(experiment, str):
        return resolved(experiment, overrides)
    return config.resolve({"device": "cpu", **overrides}, experiment=experiment)[0], experiment, None


def signalling(experiment, at: dict, then=None):
    """The experiment, sending this process the signals ``at[call]`` at its ``call``-th metrics call
    (or own step's: each batch, trained or evaluated, has one), then running ``then()``; and its
    count of calls."""
    calls = [0]

    def counted():
        calls[0] += 1
        for signum in at.get(calls[0], ()):
            os.kill(os.getpid(), signum)
        if calls[0] in at and then is not None:
            then()
    if experiment.step is not None:
        own_step = experiment.step

        def step(model, batch, loss_fn, cfg):
            counted()
            return own_step(model, batch, loss_fn, cfg)
        return replace(experiment, step=step), calls
    own = experiment.metrics

    def metrics(pred, y):
        counted()
        return {} if own is None else own(pred, y)
    return replace(experiment, metrics=metrics), calls


def kept():
    written = []
    return written, checkpoint.Checkpoints(write=lambda state: written.append(checkpoint.to_bytes(state)), every=3)


# digits' nine trainings are the fast tier's costliest test (~9 s idle, 17 s under load): the whole suite
# runs them; the fast tier keeps dropout's draws through the own-step case's model.
@pytest.mark.parametrize("name", slow_cases(CASES, slow=["dropout"]))
def test_a_run_stopped_by_a_signal_goes_on_from_the_next_batch_bit_for_bit(name, fresh_signals):
    """SIGTERM or SIGINT at seeded-random batches: training raises KeyboardInterrupt (the run is then
    closed as interrupted) after writing the state at the next batch boundary; that checkpoint reads
    back with weights_only, and the run continued from it ends with the weights, every curve point
    and early stopping's epoch of the run never stopped."""
    cfg, experiment, data = case(name)
    at: dict = {}
    signalled, calls = signalling(experiment, at)
    whole = training.train(cfg, signalled, data, checkpoints=kept()[1])
    total, places = calls[0], []
    for n, call in enumerate(sorted(random.Random(28).sample(range(2, total - 1), 4))):
        signals._received.clear()
        at.clear()
        at[calls[0] + call] = [signal.SIGTERM if n % 2 else signal.SIGINT]
        written, checkpoints = kept()
        try:
            training.train(cfg, signalled, data, checkpoints=checkpoints)
        except KeyboardInterrupt:
            pass
        else:  # the signal came in the last epoch's evaluation: no boundary after it, the run ended
            assert signals.interrupted()
            continue
        state = torch.load(io.BytesIO(written[-1]), weights_only=True)
        assert checkpoint.matches(state, cfg.to_dict(), experiment.sha256) is None
        places.append((state["epochs_done"], checkpoint.batches_done(state)))
        at.clear()
        again = training.train(cfg, signalled, data, resume=state)
        assert again.history.values == whole.history.values, places[-1]
        assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                     again.model.state_dict().values())), places[-1]
        assert (again.history.best_epoch, again.history.early_stop, again.scalars) == \
            (whole.history.best_epoch, whole.history.early_stop, whole.scalars)
    assert places, "no signal landed where the run could stop"
    if cfg.batch_size is not None:
        assert any(batches for _, batches in places), places  # inside an epoch, not only at its end


def test_a_second_signal_stops_at_once_without_waiting_for_the_boundary(fresh_signals):
    cfg, experiment, data = resolved("linear_regression", {"epochs": 6, "batch_size": 10})
    signalled, _ = signalling(experiment, {7: [signal.SIGTERM, signal.SIGINT]})
    written = []
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, signalled, data, checkpoints=checkpoint.Checkpoints(write=written.append, every=100))
    assert written == []  # stopped inside the batch: no checkpoint of a boundary it never reached


def test_a_boundary_that_does_not_come_within_the_grace_stops_the_run_at_once(fresh_signals, monkeypatch):
    """A batch that hangs after the signal: the grace expires and the run stops where it is (its last
    periodic checkpoint stays the one to go on from), instead of waiting for a boundary."""
    monkeypatch.setattr(signals, "GRACE_SECONDS", 0.05)
    cfg, experiment, data = resolved("linear_regression", {"epochs": 6, "batch_size": 10})

    def hang():
        for _ in range(3000):  # 30 s: far past the grace
            time.sleep(0.01)
    signalled, _ = signalling(experiment, {7: [signal.SIGTERM]}, then=hang)
    written = []
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, signalled, data, checkpoints=checkpoint.Checkpoints(write=written.append, every=100))
    assert written == []


def test_without_checkpoints_a_signal_interrupts_at_once_as_before(fresh_signals):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before (put back after)
    cfg, experiment, data = resolved("linear_regression", {"epochs": 6, "batch_size": 10})
    signalled, calls = signalling(experiment, {7: [signal.SIGINT]})
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, signalled, data)
    assert calls[0] == 7  # not one batch more


def _stopped_inside_an_epoch():
    cfg, experiment, data = resolved("linear_regression", {"epochs": 6, "batch_size": 10})
    signalled, _ = signalling(experiment, {7: [signal.SIGTERM]})
    written, checkpoints = kept()
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, signalled, data, checkpoints=checkpoints)
    state = torch.load(io.BytesIO(written[-1]), weights_only=True)
    assert checkpoint.batches_done(state) > 0
    return cfg, experiment, data, state


@pytest.mark.parametrize("edit", [
    lambda s: s["partial"].update(batches_done=10 ** 9),
    lambda s: s["partial"].update(sizes=torch.ones(1, dtype=torch.int64).expand(s["partial"]["batches_done"])),
    lambda s: s["partial"]["values"].update(loss=torch.zeros(1).expand(10 ** 7)),
    lambda s: s["partial"]["values"].pop("loss"),
    lambda s: s.pop("partial"),
    lambda s: s["partial"].update(lr="fast"),
    # The seventh probe's: each failed the user's run at the epoch's end instead of being refused.
    lambda s: s["partial"]["values"].update(loss=torch.zeros(len(s["partial"]["values"]["loss"]), 16)),
    lambda s: s["partial"]["values"].update(loss=s["partial"]["values"]["loss"].to("meta")),
    lambda s: s["partial"]["values"].update(loss=torch.full_like(s["partial"]["values"]["loss"], float("nan"))),
    lambda s: s["partial"]["values"].update(loss=s["partial"]["values"]["loss"].to(torch.complex64)),
    lambda s: s["partial"]["values"].update(loss=s["partial"]["values"]["loss"].to(torch.int64)),
], ids=["a billion batches", "zero-stride sizes", "ten million losses", "no losses", "no place", "a text lr",
        "sixteen values a batch", "meta tensors", "NaN losses", "complex losses", "integer losses"])
def test_a_mid_epoch_checkpoint_whose_place_is_tampered_with_is_refused_in_one_line(edit, fresh_signals):
    cfg, experiment, _, state = _stopped_inside_an_epoch()
    edit(state)
    why = checkpoint.matches(state, cfg.to_dict(), experiment.sha256)
    assert why and "\n" not in why


def test_a_mid_epoch_checkpoint_past_the_epochs_end_trains_the_run_again(fresh_signals):
    """Its shape right, its place not one of this run's epochs (more batches than an epoch has):
    refused as Unusable, and train_from trains the run from its start, ending as one never stopped."""
    cfg, experiment, data, state = _stopped_inside_an_epoch()
    done = state["partial"]["batches_done"] + 50
    state["partial"].update(batches_done=done, sizes=torch.ones(done, dtype=torch.int64),
                            values={"loss": torch.zeros(done)})
    assert checkpoint.matches(state, cfg.to_dict(), experiment.sha256) is None
    refused = []
    again = training.train_from(cfg, experiment, data, [], training.History(), None, state, refused.append)
    assert refused and "batch" in refused[0]
    assert again.history.values == training.train(cfg, experiment, data).history.values


def _losses(state):
    return state["partial"]["values"]["loss"]


def _cancelling(state, magnitude):
    """Per-batch losses +magnitude, -magnitude, ... (0 for an odd last one): their sum is 0."""
    done = state["partial"]["batches_done"]
    return torch.tensor([magnitude, -magnitude] * (done // 2) + [0.0] * (done % 2))


# The eighth probe's: each passed the checks, then failed the user's run (a stack of unequal sizes, or
# a divergence read into an average that overflows float32), blaming the experiment's code.
@pytest.mark.parametrize("edit", [
    lambda s: s["partial"]["values"].update(loss=torch.full_like(_losses(s), 1e300, dtype=torch.float64)),
    lambda s: s["partial"]["values"].update(loss=torch.full_like(_losses(s), 3e38)),  # its weighted sum overflows
    # The ninth probe's: a weighted sum that cancels to 0 in the check, and overflows in the loop once
    # the next batches are added (batch sizes of 1, as the probe wrote them, or the real ones).
    lambda s: s["partial"].update(sizes=torch.ones_like(s["partial"]["sizes"]), values={"loss": _cancelling(s, 3e38)}),
    lambda s: s["partial"]["values"].update(loss=_cancelling(s, 3e37)),
], ids=["beyond float32", "an overflowing average", "a cancelling sum, sizes 1", "a cancelling sum"])
def test_a_mid_epoch_checkpoint_whose_values_cannot_be_averaged_is_refused_in_one_line(edit, fresh_signals):
    cfg, experiment, _, state = _stopped_inside_an_epoch()
    edit(state)
    why = checkpoint.matches(state, cfg.to_dict(), experiment.sha256)
    assert why and "\n" not in why and "loss" in why


def _within_one_more_batch(state):
    """Losses whose mean stays within float32 over the batches kept and one more, and could overflow
    over the whole epoch's (each |loss * size| past float32's max / 2 / the epoch's batch count)."""
    done, size = state["partial"]["batches_done"], float(state["partial"]["sizes"][0])
    return torch.full_like(_losses(state), torch.finfo(torch.float32).max / (2 * (done + 1) + 1) / size)


@pytest.mark.parametrize("edit, given", [
    (lambda s: s["partial"]["values"].update(loss=_losses(s).reshape(-1, 1)), "of shape [1]"),
    (lambda s: s["partial"]["values"].update(loss=_losses(s).to(torch.float64)), "torch.float64"),
    # The ninth probe's class: what the kept values are weighed with shows only in the continued
    # epoch (the skipped batches' sizes, the epoch's batch count).
    (lambda s: s["partial"].update(sizes=torch.ones_like(s["partial"]["sizes"])), "holds 1 samples"),
    (lambda s: s["partial"].update(sizes=s["partial"]["sizes"] + 1), "samples"),
    (lambda s: s["partial"]["values"].update(loss=_within_one_more_batch(s)), "overflow"),
], ids=["one-element rows", "float64 losses", "sizes 1", "sizes one more", "losses too large for the epoch"])
def test_a_mid_epoch_checkpoint_whose_values_are_not_the_runs_kind_trains_the_run_again(edit, given, fresh_signals):
    """Readable, but not what this run's batches give (as its shape and dtype show only once a batch
    has run, its sizes and magnitudes only once the batches done are skipped): refused as Unusable,
    and the run trains from its start, ending as one never stopped."""
    cfg, experiment, data, state = _stopped_inside_an_epoch()
    edit(state)
    assert checkpoint.matches(state, cfg.to_dict(), experiment.sha256) is None
    refused = []
    again = training.train_from(cfg, experiment, data, [], training.History(), None, state, refused.append)
    assert len(refused) == 1 and "\n" not in refused[0] and given in refused[0], refused
    assert again.history.values == training.train(cfg, experiment, data).history.values


# An experiment that sends its own process the signals PREEMPT_AT names ("SIGTERM:50,SIGKILL:90": the
# signal at that metrics call, counted from the process's start; default {at}). One file for every
# invocation of a store: a run goes on only from a checkpoint of the same experiment file.
PREEMPTED = """
import os
import signal
from dataclasses import replace

from experiments.digits import EXPERIMENT as DIGITS

CALLS = [0]
AT = {int(at): getattr(signal, name) for name, _, at in
      (part.partition(":") for part in os.environ.get("PREEMPT_AT", "{at}").split(",") if part)}


def metrics(pred, y):
    CALLS[0] += 1
    if CALLS[0] in AT:
        os.kill(os.getpid(), AT[CALLS[0]])
    return DIGITS.metrics(pred, y)


EXPERIMENT = replace(DIGITS, name="preempted", metrics=metrics,
                     search_space={"lr": [1e-3, 1e-2], "epochs": [3, 4], "pairs": ["adam+cross_entropy"]})
"""
SEARCH = ["search", "--experiment", "preempted.py", "--n-trials", "10", "--max-trials", "4", "--set", "batch_size=128",
          "--checkpoint-every", "1", "--checkpoint-seconds", "0", "--pruner", "none", "--no-progress", "--seed", "0",
          "--sampler", "random"]
QUEUED = [(0.002, 3), (0.005, 4), (0.01, 3)]  # after the sampler's first trial: the same trials in every store


def started(folder, migrated_db, cli_in_process):
    """A new store in ``folder`` holding a study of four trials: the sampler's first, trained, and
    three queued (the same four in every copy of the store, whatever its invocations' order). The
    first trial is trained in-process (was a process of its own): no signal is sent to it."""
    folder.mkdir()
    new_store(folder, migrated_db)
    # Its own content (this process keeps one module per file content, and its CALLS with it).
    (folder / "preempted.py").write_text(PREEMPTED.replace("{at}", "") + "# the searches' experiment\n")
    first = cli_in_process(*SEARCH, "--max-trials", "1", cwd=folder)
    assert first.returncode == 0, first.stderr
    study = study_in(folder)
    for lr, epochs in QUEUED:
        study.enqueue_trial({**study.trials[0].params, "lr": lr, "epochs": epochs})
    return folder


def searched(folder, kills: list[str], *flags) -> list:
    """The study in ``folder`` trained by one invocation per entry of ``kills`` (its PREEMPT_AT)."""
    return [run_cli(*SEARCH, *flags, cwd=folder, env=cli_env(PREEMPT_AT=kill)) for kill in kills]


def study_in(folder):
    return optuna.load_study(study_name="preempted-search", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "optuna_journal.log"))))


def complete_values(folder) -> dict:
    return {(t.params["lr"], t.params["epochs"]): t.value for t in study_in(folder).trials
            if t.state == optuna.trial.TrialState.COMPLETE}


def finished_trials(folder) -> dict:
    """Each FINISHED trial run by its configuration: params, final metrics, every curve point, state_dict."""
    client = client_for(folder)
    out = {}
    for run in all_runs(folder):
        if "optuna.trial_number" not in run.data.tags or run.info.status != "FINISHED":
            continue
        params = {k: v for k, v in run.data.params.items() if k not in ("experiment", "trial_number")}
        key = (params["lr"], params["epochs"])
        assert key not in out, key  # one finished run a configuration
        curves = {name: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, name),
                                                            key=lambda m: m.step)] for name in run.data.metrics}
        out[key] = (params, run.data.metrics, curves, load_state_dict(client, run.info.run_id), run.data.tags)
    return out


@pytest.mark.slow  # seven searches of digits, five of them processes (about 60 s alone, minutes on a busy machine)
def test_a_search_killed_with_sigterm_and_kill_9_then_resumed_ends_as_one_never_interrupted(tmp_path, migrated_db,
                                                                                            cli_in_process):
    """SIGTERM, then `kill -9`, each at a seeded-random batch of a search (checkpoints every epoch),
    then a last invocation; and, in another copy of the store, SIGTERM to a search of two threads
    (--n-jobs 2), then another: each study ends with the same four trials as a search never
    interrupted, each with the same params, value, every curve point and state_dict; the trials cut
    short are retried from their checkpoints; `harness audit` finds the studies clean."""
    rng = random.Random(28)
    # The threads' signal lands in a trial's first two epochs: the main thread sets the stop when it
    # next holds the GIL, some batches later on a busy machine, and the trial must not end before.
    term, kill, threaded = rng.randrange(2, 60), rng.randrange(2, 40), rng.randrange(2, 20)
    never = started(tmp_path / "never", migrated_db, cli_in_process)
    cut, jobs = copy_store(never, tmp_path / "cut"), copy_store(never, tmp_path / "jobs")
    reference = cli_in_process(*SEARCH, cwd=never)  # never interrupted: in-process (was a process)
    assert reference.returncode == 0, reference.stderr
    sigterm, killed, last = searched(cut, [f"SIGTERM:{term}", f"SIGKILL:{kill}", ""])
    assert sigterm.returncode == 130 and "interrupted" in sigterm.stderr, sigterm.stderr
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert last.returncode == 0 and "left RUNNING by a worker that is gone" in last.stderr, last.stderr
    sigterm, last = searched(jobs, [f"SIGTERM:{threaded}", ""], "--n-jobs", "2")
    assert sigterm.returncode == 130 and "checkpoint written" in sigterm.stderr, sigterm.stderr
    assert last.returncode == 0, last.stderr

    ended = finished_trials(never)
    assert len(ended) == 4
    for store in (cut, jobs):
        trained = finished_trials(store)
        assert set(trained) == set(ended), store
        for key, (params, metrics, curves, weights, _) in ended.items():
            got_params, got_metrics, got_curves, got_weights, _ = trained[key]
            assert got_params == params and got_metrics == metrics and got_curves == curves, (store, key)
            assert weights.keys() == got_weights.keys() and all(torch.equal(weights[k], got_weights[k])
                                                                for k in weights), (store, key)
        resumed = [tags for *_, tags in trained.values() if RESUMED_TAG in tags]
        assert resumed and all(tags[RESUMED_FROM_TAG] for tags in resumed), store  # from a checkpoint, not from 0
        assert complete_values(store) == complete_values(never)
        audit = cli_in_process("audit", "--study", "preempted-search", cwd=store)  # in-process (was a process)
        assert audit.returncode == 0 and "clean" in audit.stdout, audit.stdout + audit.stderr


@pytest.mark.slow  # three in-process trainings of digits, each with its record
def test_train_stopped_by_sigterm_inside_an_epoch_resumes_to_the_run_never_stopped(in_workdir, cli_in_process,
                                                                                      tmp_path, fresh_signals):
    """SIGTERM inside epoch 5 of 6 (periodic checkpoints after epochs 2 and 4): `harness train` writes
    one more after that epoch's third batch, closes the run KILLED and exits 130; `--resume RUN_ID` goes
    on from that batch and ends FINISHED, its weights and every curve point those of a run never
    stopped, each step once."""
    never = tmp_path / "never.py"
    never.write_text(PREEMPTED.replace("{at}", ""))
    assert cli_in_process("train", "--experiment", never, *FLAGS, cwd=in_workdir).returncode == 0
    client, found = runs_of(in_workdir)
    (reference,) = found
    per_epoch = (load(str(never)).metrics.__globals__["CALLS"][0] - 1) // 6  # the pre-flight's call, then 6 epochs'
    stops = tmp_path / "stops.py"
    stops.write_text(PREEMPTED.replace("{at}", f"SIGTERM:{1 + 4 * per_epoch + 3}"))  # epoch 5's third batch
    out = cli_in_process("train", "--experiment", stops, *FLAGS, cwd=in_workdir)
    assert out.returncode == 130 and "stopped at epoch 4, batch 3 of" in out.stderr and "--resume" in out.stderr, \
        out.stderr
    stopped = next(run_id for run_id in runs_of(in_workdir)[1] if run_id != reference)
    assert client.get_run(stopped).info.status == "KILLED"
    signals._received.clear()
    out = cli_in_process("train", "--experiment", stops, *FLAGS, "--resume", stopped, cwd=in_workdir)
    assert out.returncode == 0, out.stderr
    found = runs_of(in_workdir)[1]
    assert found[stopped].info.status == "FINISHED" and found[stopped].data.tags[RESUMED_TAG] == "4"
    names = [n for n in found[reference].data.metrics if not n.startswith("final_")]
    assert curves(client, stopped, names) == curves(client, reference, names)
    assert found[stopped].data.metrics == found[reference].data.metrics
    weights = [load_state_dict(client, run) for run in (reference, stopped)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))
