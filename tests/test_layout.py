"""The package's shape stays honest: no import cycles, no module-level switches, no measurements cited from code."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_fast"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """lit_fast modules imported at module level (imports inside functions are deliberate: lazy or cycle-free)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks run for type checkers only
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in modules}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _top_level_imports(path, modules) - {name} for name, path in modules.items()}
    for name in graph:  # a package's submodule importing the package's own __init__ is not a cycle of interest
        graph[name] = {dep for dep in graph[name] if not name.startswith(dep + ".")}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep])
                                     if dep in trail else f"import cycle through {dep}")
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_level_switches_or_global_statements():
    switch = re.compile(r"^[A-Z][A-Z0-9_]+ *(: *bool)? *= *(True|False)\b", re.M)
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not switch.search(text), f"{path}: a module-level switch; pass an option instead"
        assert not re.search(r"^\s*global\s", text, re.M), f"{path}: a global statement"


def test_library_code_cites_no_benchmark_results():
    for path in PACKAGE.rglob("*.py"):
        assert "bench/results" not in path.read_text(), f"{path}: numbers belong in docs/, code links there"
