"""The import graph of calibrun/ as docs/design.md states it: layers, no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "calibrun"


def _node(module: str) -> str:
    """The layer table's name of a module: ``calibrun.data.cifar`` is ``data``."""
    parts = module.split(".")
    return "calibrun" if parts == ["calibrun"] else parts[1]


def _module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts[:-1]) if relative.name == "__init__" else list(relative.parts)
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """calibrun modules that ``path`` imports anywhere in the file (function-level too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "calibrun"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "calibrun":
            # from calibrun import sweep: the submodule; from calibrun import UserError: the package.
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        source = _node(_module_name(path))
        graph.setdefault(source, set()).update(_node(m) for m in _imports(path, modules))
    for source, targets in graph.items():
        targets.discard(source)  # within a node (data/ importing data/) is the node's own business
    return graph


def _layers() -> dict[str, int]:
    block = re.search(r"```layers\n(.*?)```", (REPO / "docs" / "design.md").read_text(), re.S)
    assert block, "docs/design.md has no ```layers block"
    layers = {}
    for line in block.group(1).strip().splitlines():
        number, names = line.split(":")
        layers.update(dict.fromkeys(names.split(), int(number)))
    return layers


def test_every_import_goes_to_a_lower_layer():
    layers, graph = _layers(), _graph()
    assert sorted(set(graph) - set(layers)) == [], "modules missing from docs/design.md's layer table"
    wrong = sorted(f"{source} (layer {layers[source]}) imports {target} (layer {layers.get(target)})"
                   for source, targets in graph.items() for target in targets
                   if layers.get(target, 99) >= layers[source])
    assert wrong == []


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" → ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "closed"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_checker_sees_a_function_level_import(tmp_path):
    """The import that hid the train ↔ robustness cycle was inside a function."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from calibrun.train import run\n    import calibrun.metrics\n")
    assert _imports(path, {"calibrun.train", "calibrun.metrics"}) == {"calibrun.train", "calibrun.metrics"}
