"""One line for a mistyped flag, command or name, with the closest valid one (in-process: fast tier)."""
import pytest

from harness.cli import main


@pytest.mark.parametrize("argv, line", [
    (["train", "--optimzer", "adam"], "unrecognized arguments: --optimzer adam (did you mean --optimizer?)"),
    (["train", "--seeed=3"], "unrecognized arguments: --seeed=3 (did you mean --seed?)"),
    (["search", "--n-trails", "3"], "unrecognized arguments: --n-trails 3 (did you mean --n-trials?)"),
    (["serch"], "(did you mean search?)"),
    (["train", "--optimizer", "adm"], "unknown optimizer 'adm'; allowed: adadelta, adafactor, adagrad, adam, adamax, adamw, asgd, muon, nadam, radam, rmsprop, rprop, sgd, sparseadam (did you mean 'adam'?)"),
    (["train", "--experiment", "linear_regresion"], "(did you mean 'linear_regression'?)"),
    (["train", "--set", "wieght_decay=0.1"], "(did you mean 'weight_decay'?)"),
    (["search", "--tune", "weight_decy"], "unknown search-space key 'weight_decy' in command line; allowed: lr, epochs, pairs, grid_points, batch_size, weight_decay, momentum, scheduler, grad_clip_norm, grad_clip_value, patience, min_delta, lambd, alpha, t0, rho, eps, "),
])
def test_a_typo_gets_one_line_and_the_closest_valid_name(argv, line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_flag_of_another_command_is_not_suggested_as_itself(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--sampler", "tpe"]) == 2  # --sampler is search's, not train's
    err = capsys.readouterr().err
    assert "unrecognized arguments: --sampler tpe" in err and "did you mean" not in err
