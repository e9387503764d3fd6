"""The package layout of ../shared/DESIGN.md, checked on the source: which package may
import which (so there are no import cycles between packages), no cycles between modules,
and no function outside tests longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rewards", "learner", "tasks", "evaluation", "actors", "orchestrator")
# DESIGN.md, "Packages": what each package may import of ours.
MAY_IMPORT = {
    "rewards": set(),
    "learner": set(),
    "tasks": {"rewards"},
    "evaluation": {"rewards", "tasks"},
    "actors": {"rewards", "learner"},
    "orchestrator": {"rewards", "learner", "tasks", "evaluation", "actors"},
}
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours this file imports, at top level or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def test_packages_import_only_what_design_allows():
    wrong = []
    for path in _sources():
        own = path.relative_to(ROOT).parts[0]
        for mod in _imports(path):
            other = mod.split(".")[0]
            if other != own and other not in MAY_IMPORT[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not wrong, "imports across packages that DESIGN.md forbids:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules():
    modules = {_module_name(p): p for p in _sources()}
    graph = {}
    for name, path in modules.items():
        # `from pkg import mod` names a module; `from pkg.mod import fn` names pkg.mod.
        graph[name] = {m if m in modules else m.rsplit(".", 1)[0] for m in _imports(path)}
        graph[name] = {m for m in graph[name] if m in modules and m != name}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_over_80_lines():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_checks_see_a_forbidden_import(tmp_path):
    """The walker itself: a learner module importing the orchestrator is caught."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from orchestrator.config import load_config\n")
    assert _imports(bad) == {"orchestrator.config", "orchestrator.config.load_config"}
