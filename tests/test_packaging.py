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
    assert defaults == {**cfg.to_dict(), **unset, "device": "auto", "config": ""}
    command = project["entry_points"]["train"]["command"]
    for name in params:
        assert f"--{name} {{{name}}}" in command or f"--set {name}={{{name}}}" in command


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
