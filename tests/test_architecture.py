"""The package's import graph: the core is acyclic and never imports the paper's experiments.

Every ``import`` statement counts, also those inside functions (a lazy import is still a dependency).
The CLI package (``llmeraser.cli`` and its modules) is the shell over both packages and may import the experiments
for their subcommands.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CORE = "llmeraser"
EXPERIMENTS = "llmeraser_bench"
SHELL = "llmeraser.cli"  # the package and its modules


def in_shell(module: str) -> bool:
    return module in (SHELL, "llmeraser.__main__") or module.startswith(SHELL + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = [p for package in (CORE, EXPERIMENTS) for p in (SRC / package).rglob("*.py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_has_no_import_cycle() -> None:
    graph = import_graph()
    # ``llmeraser`` itself is left out: its lazy re-exports are not a dependency of the modules inside it
    core = {m: {d for d in deps if d.split(".")[0] == CORE and d != CORE}
            for m, deps in graph.items() if m.split(".")[0] == CORE and m != CORE}
    assert find_cycle(core) is None, f"import cycle: {' -> '.join(find_cycle(core) or [])}"


def test_the_core_never_imports_the_experiments() -> None:
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.split(".")[0] == EXPERIMENTS)
                 for m, deps in graph.items() if m.split(".")[0] == CORE and not in_shell(m)}
    offenders = {m: deps for m, deps in offenders.items() if deps}
    assert not offenders, f"core modules importing {EXPERIMENTS}: {offenders}"
