"""What a sixth outside probe broke (issue 26), each as its class: code an experiment loads from its
own package or folder that its sha256 did not cover, and a checkpoint whose optimizer was not the
run's. (Its findings on `harness cluster --postgres` are in test_cluster_security.py.)"""
import pytest

WRAPPED = ("from dataclasses import replace\nfrom experiments.linear_regression import EXPERIMENT as BASE\n"
           "WEIGHT = 0.7\nEXPERIMENT = replace(BASE, name={name!r})\n")


def search_twice_then_edit(code, edited, in_workdir, cli_in_process, experiment, study):
    """Search, resume unchanged (exit 0), append to ``edited`` and resume again: the CompletedProcess."""
    search = ["search", "--experiment", experiment, "--study-name", study, "--n-trials", 1,
              "--epochs-range", 5, 10, "--no-progress"]
    first = cli_in_process(*search, cwd=in_workdir)
    assert first.returncode == 0, first.stderr
    again = cli_in_process(*search, cwd=in_workdir)
    assert again.returncode == 0, again.stderr  # unchanged: resumed
    with (code / edited).open("a") as file:
        file.write("WEIGHT = 5.0\n")
    return cli_in_process(*search, cwd=in_workdir)


@pytest.mark.parametrize("package, import_line", [
    ("p6pkg", "from .helper import EXPERIMENT"),
    ("p6pkg_module", "from . import helper\nEXPERIMENT = helper.EXPERIMENT"),
])
def test_a_package_experiment_s_relative_import_is_part_of_its_identity(tmp_path, in_workdir, cli_in_process,
                                                                       monkeypatch, package, import_line):
    """`p6pkg/exp.py` takes its data from `.helper`: an edited helper is refused as an edited exp.py is,
    an edited module of the package that it does not load is not."""
    code = tmp_path / "code" / package
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "helper.py").write_text(WRAPPED.format(name=package))
    (code / "exp.py").write_text(import_line + "\n")
    (code / "unrelated.py").write_text("")
    monkeypatch.syspath_prepend(str(code.parent))
    out = search_twice_then_edit(code, "unrelated.py", in_workdir, cli_in_process, f"{package}.exp", "rel")
    assert out.returncode == 0, out.stderr
    out = search_twice_then_edit(code, "helper.py", in_workdir, cli_in_process, f"{package}.exp", "rel")
    assert out.returncode == 2 and "study 'rel' was created with experiment" in out.stderr, out.stderr


@pytest.mark.parametrize("name_expression", ["'p6dyn_literal'", "'p6dyn_' + 'computed'"])
def test_a_helper_a_file_experiment_loads_with_import_module_is_part_of_its_identity(
        tmp_path, in_workdir, cli_in_process, monkeypatch, name_expression):
    """`a/exp.py` puts its folder on sys.path and loads its helper with importlib.import_module, by a
    literal name or a computed one."""
    name = eval(name_expression)
    code = tmp_path / "a"
    code.mkdir()
    (code / f"{name}.py").write_text(WRAPPED.format(name=name))
    (code / "exp.py").write_text(
        "import importlib, os, sys\nsys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
        f"EXPERIMENT = importlib.import_module({name_expression}).EXPERIMENT\n")
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # what exp.py adds goes with the test
    out = search_twice_then_edit(code, f"{name}.py", in_workdir, cli_in_process, code / "exp.py", "dyn")
    assert out.returncode == 2 and "study 'dyn' was created with experiment" in out.stderr, out.stderr
