"""The project's own files agree with each other: a user of conda gets what pip users get."""
import tomllib

import yaml

from harness import config
from conftest import ROOT


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_conda_env_names_the_same_dependencies_as_pyproject():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    [pip_section] = [d for d in conda["dependencies"] if isinstance(d, dict)]
    conda_pip = {d for d in pip_section["pip"] if not d.startswith("-")}
    assert "-c constraints.txt" in {d.split("#")[0].strip() for d in pip_section["pip"]}
    assert conda_pip == set(pyproject()["project"]["dependencies"])
    assert "python=3.11" in conda["dependencies"]


def test_torch_requirement_admits_the_pinned_cpu_build():
    from packaging.requirements import Requirement

    [torch_req] = [Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req.specifier.contains("2.13.0")


def test_mlproject_train_defaults_are_the_reference_config():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    params = project["entry_points"]["train"]["parameters"]
    cfg, _ = config.resolve({"device": "auto"})
    defaults = {name: spec["default"] for name, spec in params.items()}
    unset = {k: "" for k, v in cfg.to_dict().items() if v is None}  # MLproject passes "" for "not set"
    assert defaults == {**cfg.to_dict(), **unset, "device": "auto", "config": "", "checkpoint_every": "",
                        "checkpoint_seconds": ""}
    command = project["entry_points"]["train"]["command"]
    for name in params:
        assert f"--{name.replace('_', '-')} {{{name}}}" in command or f"--set {name}={{{name}}}" in command
    given = mlproject_args("train", checkpoint_every="3", checkpoint_seconds="0")
    assert config.checkpoint_policy(given.checkpoint_every, given.checkpoint_seconds, 300.0) == (3, None)
    default = mlproject_args("train")
    assert config.checkpoint_policy(default.checkpoint_every, default.checkpoint_seconds, 300.0) == (None, 300.0)


def mlproject_args(entry_point: str, **given):
    """The arguments `mlflow run . -e ENTRY -P k=v` hands the harness: MLflow's own substitution
    and quoting of the entry point's command, split as the shell splits it."""
    import shlex

    from mlflow.projects._project_spec import load_project

    from harness.cli import build_parser

    command = load_project(str(ROOT)).get_entry_point(entry_point).compute_command(given, storage_dir=None)
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "harness"]
    args, unknown = build_parser().parse_known_args(words[3:])
    assert not unknown, unknown
    return args


def test_mlproject_main_entry_sets_every_search_option_the_cli_does(tmp_path):
    """Each of the main entry point's parameters reaches the same checked option as its CLI flag;
    left at their defaults they give the CLI's own defaults ("" is "not set")."""
    from harness.cli import build_parser
    from harness.search.options import SearchOptions

    def options(args):
        return SearchOptions.from_args(args)

    project = yaml.safe_load((ROOT / "MLproject").read_text())
    params = project["entry_points"]["main"]["parameters"]
    default = mlproject_args("main")
    plain = build_parser().parse_args(["search", "--no-progress"])
    mine, cli = options(default), options(plain)
    for field in ("study_name", "storage_url", "n_trials", "max_trials", "timeout", "n_jobs", "heartbeat",
                  "direction", "sampler_name", "allow_changed_experiment", "progress"):
        assert getattr(mine, field) == getattr(cli, field), field
    for field in ("objectives", "report_every", "batch", "mlflow_experiment", "trial_figures", "importance",
                  "checkpoint_every", "checkpoint_seconds", "base"):
        assert getattr(mine.trials, field) == getattr(cli.trials, field), field

    given = {"timeout": "60", "heartbeat": "20", "report_every": "3", "checkpoint_every": "2",
             "checkpoint_seconds": "0", "trial_figures": "true", "importance": "true",
             "allow_changed_experiment": "true", "device": "cpu", "max_trials": "9", "seed": "7"}
    assert set(given) <= set(params)
    mine = options(mlproject_args("main", **given))
    assert (mine.timeout, mine.heartbeat, mine.max_trials, mine.allow_changed_experiment) == (60.0, 20, 9, True)
    t = mine.trials
    assert (t.report_every, t.checkpoint_every, t.checkpoint_seconds, t.trial_figures, t.importance) == (
        3, 2, None, True, True)
    assert t.base.device == "cpu"
    command = project["entry_points"]["main"]["command"]
    for name in params:
        assert f"--{name.replace('_', '-')} {{{name}}}" in command, name


def test_the_tested_releases_are_what_the_readme_and_ci_install_and_pyproject_admits():
    """pyproject.toml's pins are wide (a user's MLflow 3 and Optuna 5 install beside the harness);
    constraints.txt pins the releases harness/compat.py takes its shortcuts on, and the README's
    install commands (which CI runs) use it."""
    import re

    from packaging.requirements import Requirement

    from harness import compat

    pinned = dict(re.match(r"^([\w-]+)==(\S+)$", line).groups()
                  for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#"))
    assert pinned["mlflow"] in compat.MLFLOW_TESTED and pinned["optuna"] in compat.OPTUNA_TESTED
    deps = {Requirement(d).name: Requirement(d) for d in pyproject()["project"]["dependencies"]}
    for name in ("mlflow", "optuna"):
        assert deps[name].specifier.contains(pinned[name])
    assert not deps["mlflow"].specifier.contains("4.0") and deps["mlflow"].specifier.contains("3.99")
    assert not deps["optuna"].specifier.contains("6.0") and deps["optuna"].specifier.contains("5.99")
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    # The lines after the quickstart's two markers, found as .ci/run finds the second (grep -F -A1).
    installs = [lines[n + 1] for marker in ("# 1. install and run the main job", "# 2. install and run the tests")
                for n in [next(n for n, line in enumerate(lines) if marker in line)]]
    assert all("pip install" in line and "-c constraints.txt" in line for line in installs), installs
