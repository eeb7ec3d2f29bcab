"""Dependencies run one way (core <- search <- commands) and no module imports itself back, also
not through an import hidden in a function; the wings (acceleration, durability) are imported only
by the commands, the entry points and themselves."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "harness"
LAYERS = {"core": 0, "search": 1, "commands": 2}
# A wing sits beside the layer it extends: acceleration (harness/fast/) does the core's work faster,
# durability (harness/search/durable/) keeps a study whole across dead workers and crashes.
WINGS = {"harness.fast": "core", "harness.search.durable": "search"}
# Entry points sit above every layer: the CLI, and the package's front door, which hands out
# `harness.Objective` on first use.
TOP = ("harness", "harness.cli", "harness.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every harness module ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("harness")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("harness"):
                continue
            for alias in node.names:  # `from . import x` imports the module x when there is one
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return {m for m in found if _exists(m) and m != name}


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    for wing, beside in WINGS.items():
        if in_wing(module, wing):
            return LAYERS[beside]
    parts = module.split(".")
    return LAYERS.get(parts[1], LAYERS["core"]) if len(parts) > 1 else LAYERS["core"]


def in_wing(module: str, wing: str) -> bool:
    return module == wing or module.startswith(wing + ".")


def test_no_import_cycles():
    edges = graph()
    cycles = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets if a in edges.get(b, ())})
    assert not cycles, f"modules importing each other: {cycles}"
    # Longer cycles: a depth-first search for a back edge.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_dependencies_run_one_way():
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in graph().items() for b in targets
             if a not in TOP and layer(b) > layer(a)]
    assert not wrong, "core <- search <- commands broken:\n" + "\n".join(wrong)


def test_the_checks_see_imports_inside_functions():
    # audit.py imports harness.runs inside a function only: the graph must still hold that edge.
    assert "harness.runs" in graph()["harness.search.durable.audit"]


# Who else imports a wing, and why it cannot be handed in by a command instead.
WING_IMPORTERS = {
    "harness.fast": {
        # A Python caller's Objective, or load_model without a client, has no command to hand the
        # fast paths in: this one module takes them where the wing is installed, else None.
        "harness.accelerated": "the fast paths for Objective and runs.load_model/predict",
    },
    "harness.search.durable": {
        # A trial is owned by its worker from the write that creates it, and a study's workers
        # share one lock: the loop, the trial's way and the recorder name, retry and release
        # trials through workers.py, and ask under storages.study_lock.
        "harness.search.loop": "the study's lock, a trial's owner, Optuna's private heartbeat and retry hooks",
        "harness.search.trials": "a trial's owner and why it was cut short; a journal write that failed",
        "harness.search.recorder": "a retried trial's earlier attempts and a dead worker's runs",
        # Opening a study is opening its storage: the harness's storages and the journal's repair.
        "harness.search.study": "the harness's Optuna storages and the journal's repair",
        # A search starts by recovering what dead workers left, under the study's lock.
        "harness.search.session": "recovery of dead workers' trials under the study's lock",
        "harness.search.parent": "the study's lock around finding or making its parent run",
        "harness.search.status": "the running trials, read from the storage without replaying it (private API)",
    },
}


def test_wings_are_imported_only_from_above():
    # A command hands a wing's fast path in; the core and the search session run without it.
    wrong = [f"{module} imports {b}" for module, targets in graph().items() for b in sorted(targets)
             for wing, importers in WING_IMPORTERS.items()
             if in_wing(b, wing) and not in_wing(module, wing) and module not in importers
             and module not in TOP and not in_wing(module, "harness.commands")]
    assert not wrong, "a wing imported by the core or the search session:\n" + "\n".join(wrong)


def test_every_listed_wing_importer_still_imports_it():
    # A listed exception that no longer holds would let the next one in unnoticed.
    edges = graph()
    stale = [f"{module} ({wing})" for wing, importers in WING_IMPORTERS.items() for module in importers
             if not any(in_wing(b, wing) for b in edges.get(module, ()))]
    assert not stale, f"listed as importing a wing, and no longer does: {stale}"
