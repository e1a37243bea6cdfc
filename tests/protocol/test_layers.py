"""The layers stay layers: no package of src/imapveil imports another in a circle, and the
protocol core imports nothing that does I/O (it is sans-IO: bytes and the time in, actions out).

Imports are read from the source (ast), so an import inside a function counts too; only those
under `if TYPE_CHECKING:` (types, never run) do not.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import imapveil

SRC = Path(imapveil.__file__).resolve().parent

# Owed: policy/load.py forwards `resolve_policy` lazily to imapveil.policy_files for service.py
# and cli.py, which still import it from there. Drop this once they import policy_files.
OWED = {("policy", "policy_files")}

# What a sans-IO module may not import (the relay has them).
IO_MODULES = {"trio", "socket", "ssl", "logging", "time", "asyncio", "os", "pathlib", "select"}


def _unit(module: str) -> str | None:
    """The package (or top-level module) of `imapveil.x.y`: `x`."""
    parts = module.split(".")
    if parts[0] != "imapveil" or len(parts) < 2:
        return None
    return parts[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[str]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (name for child in node.orelse for name in _imports_of(child))
            continue
        yield from _imports_of(node)


def _imports_of(node: ast.AST) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        yield node.module
        yield from (f"{node.module}.{alias.name}" for alias in node.names)
    else:
        yield from _imports(node)


def _modules() -> dict[str, set[str]]:
    """Each module of the package (dotted name) and what it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(("imapveil", *path.relative_to(SRC).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = set(_imports(ast.parse(path.read_text())))
    return found


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    modules = _modules()
    units = {_unit(module) for module in modules} - {None}
    for module, imports in modules.items():
        unit = _unit(module) or "imapveil"
        for imported in imports:
            target = _unit(imported)
            if target in units and target != unit and (unit, target) not in OWED:
                assert target is not None
                graph.setdefault(unit, set()).add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return None


def test_no_package_imports_another_in_a_circle() -> None:
    assert _cycle(_package_graph()) is None


def test_protocol_and_policy_do_not_import_each_other() -> None:
    graph = _package_graph()
    assert "policy" not in graph["protocol"]
    assert "protocol" not in graph["policy"]


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_protocol_and_policy_do_no_io() -> None:
    for module, imports in _modules().items():
        if _unit(module) in ("protocol", "policy"):
            roots = {name.split(".")[0] for name in imports}
            assert not roots & IO_MODULES, (module, roots & IO_MODULES)
