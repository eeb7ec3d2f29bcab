"""Input that grows or lies (in-process, fast tier): a YAML alias bomb, text that is not UTF-8, a
run id MLflow refuses, queued params a search's space does not hold. Each gets one line and exit 2
(or, for a queued trial, that trial fails and the search goes on), and nothing is half-written."""
import optuna
import pytest
from optuna.trial import TrialState

from harness import schema
from harness.cli import main
from conftest import all_runs
from search_helpers import check_refused_in_process, journal_study

# 9**7 values from 7 lines: built lazily by the YAML parser, expanded by anything that prints it.
BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"] +
                 [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]) + "\n"


@pytest.mark.parametrize("argv", [["search", "--config", "BOMB"], ["search", "--space", "BOMB"],
                                  ["train", "--config", "BOMB"],
                                  ["search", "--tune", "lr=" + "{" + BOMB.replace("\n", ", ").rstrip(", ") + "}"]],
                         ids=["search config", "space", "train config", "tune range"])
def test_a_yaml_alias_bomb_is_measured_not_expanded(argv, capsys, tmp_path, monkeypatch):
    bomb = tmp_path.parent / f"{tmp_path.name}-bomb.yaml"
    bomb.write_text(BOMB)
    argv = [str(bomb) if a == "BOMB" else a for a in argv]
    check_refused_in_process(argv, "through its aliases (*name); at most 100000 allowed", capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("name, text", [("c.yaml", "lr: 0.1\nepochs: 5\nlr: 0.2\n"),
                                        ("c.json", '{"lr": 0.1, "lr": 0.2}'),
                                        ("s.yaml", "lr: [0.001, 0.1]\nhparams:\n  a: 1\n  a: 2\n")])
def test_a_key_given_twice_is_refused_not_silently_the_last(name, text, capsys, tmp_path, monkeypatch):
    config = tmp_path.parent / f"{tmp_path.name}-{name}"
    config.write_text(text)
    check_refused_in_process(["train", "--config", str(config)], "is given twice", capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("argv", [["search", "--space", "FILE"], ["train", "--config", "FILE"]])
@pytest.mark.parametrize("text", ["epochs: [5, 10]\n<<: {epochs: [5, 20]}\n",
                                  "base: &b {lr: 0.1}\nrun:\n  <<: *b\n  lr: 0.2\n"])
def test_a_yaml_merge_key_is_refused_not_silently_one_of_two_values(argv, text, capsys, tmp_path, monkeypatch):
    """A key given beside a merge (<<) of the same key kept one of the two silently (third probe)."""
    file = tmp_path.parent / f"{tmp_path.name}-merge.yaml"
    file.write_text(text)
    check_refused_in_process([str(file) if a == "FILE" else a for a in argv], "a YAML merge key (<<) is not taken",
                             capsys, tmp_path, monkeypatch)


@pytest.mark.slow  # parses 51,000 lines (~1.5 s)
def test_a_small_yaml_with_aliases_is_read(tmp_path):
    from harness.config import parse_yaml

    assert parse_yaml("base: &b [0.001, 0.1]\nlr: *b\n", "space") == {"base": [0.001, 0.1], "lr": [0.001, 0.1]}
    # The bound is on what aliases add: a file of more values than that, all written out, is read.
    big = "\n".join(f"k{i}: 1" for i in range(51_000))
    assert len(parse_yaml(big, "config")) == 51_000


NOT_UTF8 = "d\udcff"  # how Python hands over a file name holding the byte 0xff


@pytest.mark.parametrize("argv", [["train", "--experiment", f"{NOT_UTF8}/mine.py"],
                                  ["search", "--study-name", f"s{NOT_UTF8}"],
                                  ["search", "--config", f"{NOT_UTF8}.yaml"],
                                  ["predict", f"run{NOT_UTF8}", "--x", "1"]])
def test_an_argument_that_is_not_utf8_text_is_refused_before_anything_is_written(argv, capsys, tmp_path,
                                                                               monkeypatch):
    check_refused_in_process(argv, "is not UTF-8 text", capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("home, xdg", [("relhome", None), ("", None), ("relhome", "/tmp")])
@pytest.mark.parametrize("argv", [["train", "--epochs", "1"], ["search", "--n-trials", "1", "--no-progress"]])
def test_a_relative_home_is_refused_naming_it_before_anything_is_made(argv, home, xdg, capsys, tmp_path, monkeypatch):
    """Was: exit 1 "this user has no home folder" once the store was made (and MLflow's ~/.config in
    the working directory): ~ would be another folder in each working directory."""
    monkeypatch.setenv("HOME", home)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    check_refused_in_process(argv, "environment variable HOME=", capsys, tmp_path, monkeypatch)


def test_an_experiment_file_in_a_folder_whose_name_is_not_utf8_is_refused(capsys, tmp_path, monkeypatch):
    import os
    import shutil

    from pathlib import Path

    folder = os.path.join(os.fsencode(tmp_path), b"d\xff")
    os.mkdir(folder)
    shutil.copy(Path(__file__).parents[1] / "experiments" / "linear_regression.py", os.path.join(folder, b"mine.py"))
    monkeypatch.chdir(folder)
    assert main(["train", "--experiment", "mine.py", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not UTF-8 text" in err and os.listdir(folder) == [b"mine.py"]


def _in_store(workdir, monkeypatch):
    """In-process commands in ``workdir``, on its store named absolutely: MLflow keeps the store of
    a relative URI (its default sqlite:///mlflow.db) opened in an earlier test's folder."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.mark.parametrize("run_id", ["bad id!", "../etc", "_abc", "x" * 300, "a\nb"])
@pytest.mark.parametrize("command", [["predict", "ID", "--x", "1"], ["reproduce", "ID"]])
def test_a_run_id_mlflow_refuses_is_bad_input_not_a_store_failure(workdir, command, run_id, capsys, monkeypatch):
    _in_store(workdir, monkeypatch)
    before = sorted(p.name for p in workdir.iterdir())
    assert main([run_id if a == "ID" else a for a in command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run id" in err, err
    assert sorted(p.name for p in workdir.iterdir()) == before and all_runs(workdir) == []


@pytest.mark.slow  # a whole search in-process
def test_queued_params_the_space_does_not_hold_fail_that_trial_and_the_search_goes_on(workdir, capsys,
                                                                                      monkeypatch):
    _in_store(workdir, monkeypatch)
    argv = ["search", "--study-name", "s", "--epochs-range", "5", "30", "--no-progress", "--seed", "0"]
    assert main([*argv, "--n-trials", "1"]) == 0
    study = journal_study(workdir, "s")
    study.enqueue_trial({schema.PAIR_TRIAL_PARAM: "adam+bogus"})  # not among the space's pairs
    study.enqueue_trial({"epochs": "many"})  # not a number: config validation refuses it
    study.enqueue_trial({"lr": 5.0, "epochs": 7})  # out of range: Optuna runs it, with a warning
    capsys.readouterr()
    assert main([*argv, "--n-trials", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("queued params do not fit this search") == 2, err
    trials = journal_study(workdir, "s").trials
    states = [t.state for t in trials]
    assert states[1:3] == [TrialState.FAIL, TrialState.FAIL] and states.count(TrialState.COMPLETE) == 3
    assert all("queued params" in t.user_attrs[schema.FAIL_REASON_ATTR] for t in trials[1:3])
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]  # not queued again
    runs = all_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_trial = {r.data.tags[schema.TRIAL_NUMBER_TAG]: r for r in runs if schema.TRIAL_NUMBER_TAG in r.data.tags}
    assert sorted(by_trial) == ["0", "1", "2", "3", "4"]  # every trial has its run, the refused ones too
    for number, queued in (("1", {schema.PAIR_TRIAL_PARAM: "adam+bogus"}), ("2", {"epochs": "many"})):
        run = by_trial[number]
        assert run.info.status == "FAILED" and "queued params" in run.data.tags[schema.FAIL_REASON_TAG]
        assert queued.items() <= run.data.params.items()
    capsys.readouterr()
    assert main(["audit", "--study", "s"]) == 0, capsys.readouterr()


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(trained, capsys, monkeypatch):
    """`harness predict ... | head -1`, `harness compare | head`: the reader has what it wanted."""
    import os
    import sys

    path, run_id = trained
    monkeypatch.chdir(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
    read, write = os.pipe()
    os.close(read)
    closed = open(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        assert main(["predict", run_id, "--x", "1", "2"]) == 141
        closed.write("flushed at exit\n")  # what Python's exit does: it reaches /dev/null now
    finally:
        closed.close()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", [["train", "--epochs", "2"], ["search", "--n-trials", "1", "--no-progress"]])
def test_a_store_folder_holding_a_percent_is_refused_before_anything_is_written(command, capsys, tmp_path,
                                                                               monkeypatch):
    """MLflow writes a run's figures to its artifact path %xx-decoded and the harness's files to it as
    written: the record of every run there would be split in two folders."""
    folder = tmp_path / "p%41ct"
    folder.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_refused_in_process(command, "holds a '%'", capsys, folder, monkeypatch)
