"""The package's import graph has no circle, and its layers import downwards only: read from the source with ast
(every ``import`` statement, function-local ones included), so a circle fails here before anyone draws it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spectral_cli"

#: the layers, lowest first; a module may import its own layer's and lower ones' only
LAYERS = [
    {"errors"},
    {"transform"},
    {"parametrization", "statedict"},
    {"files", "spectral"},
    {"render", "plot", "console", "cli", "__init__", "__main__"},
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (relative and absolute), by their dotted names."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                stem = node.module or ""
            if stem.split(".")[0] != "spectral_cli":
                continue
            for alias in node.names:  # `from . import x` imports the module x when there is one
                candidate = f"{stem}.{alias.name}"
                found.add(candidate if candidate in MODULES else stem)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "spectral_cli"}
    return {m for m in found if m in MODULES and m != _module(path)}


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import circle of the package (its modules in order), or None. A package's ``__init__`` that only
    hands names on lazily is no edge: importing a submodule runs its package's ``__init__`` first, but
    ``spectral_cli/__init__.py`` imports nothing at import time (its table is read on first use)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node] - {"spectral_cli"}):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for start in sorted(GRAPH):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_is_read() -> None:
    assert "spectral_cli.files.registry" in GRAPH["spectral_cli.files.convert"]
    assert "spectral_cli.files.checkpoint" in GRAPH["spectral_cli.files.torch_file"]
    assert len(MODULES) > 30


def test_no_import_circle() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_the_cycle_finder_finds_one() -> None:
    GRAPH["spectral_cli.files.checkpoint"].add("spectral_cli.files.registry")
    try:
        assert _cycle() is not None
    finally:
        GRAPH["spectral_cli.files.checkpoint"].discard("spectral_cli.files.registry")


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_layers_import_downwards() -> None:
    upward = [(a, b) for a, targets in GRAPH.items() for b in targets if b != "spectral_cli" and _layer(b) > _layer(a)]
    assert not upward, upward
