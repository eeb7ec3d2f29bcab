"""Dependencies run one way (core <- search <- commands) and no module imports itself back, also
not through an import hidden in a function."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "harness"
LAYERS = {"core": 0, "search": 1, "commands": 2}


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
    parts = module.split(".")
    return LAYERS.get(parts[1], LAYERS["core"]) if len(parts) > 1 else LAYERS["core"]


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
    # The entry points sit above every layer: the CLI, and the package's front door, which hands
    # out `harness.Objective` on first use.
    top = ("harness", "harness.cli", "harness.__main__")
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in graph().items() for b in targets
             if a not in top and layer(b) > layer(a)]
    assert not wrong, "core <- search <- commands broken:\n" + "\n".join(wrong)


def test_the_checks_see_imports_inside_functions():
    # audit.py imports harness.runs inside a function only: the graph must still hold that edge.
    assert "harness.runs" in graph()["harness.search.audit"]
