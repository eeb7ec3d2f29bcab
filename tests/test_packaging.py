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
    conda_pip = {d for d in pip_section["pip"] if not d.startswith("-e")}
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
