"""The shape of the package, checked: what import-linter's contracts do not cover.

The layers themselves are import-linter's (``[tool.importlinter]`` in
pyproject.toml, run by ``make lint``). This file checks the rest of what
ARCHITECTURE.md promises: no import circle between any two modules (imports
under ``TYPE_CHECKING`` count: they show where a data model has no home), no
module over 600 lines, and no class over 300 lines but the two public pool
facades, which mirror the stdlib's whole API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

import forkref

PACKAGE = Path(forkref.__file__).parent
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
#: The public adapters over the stdlib's APIs: one method per stdlib method.
FACADES = {"Pool", "ProcessPoolExecutor"}


def _import_cycles(graph: grimp.ImportGraph, skip: frozenset[str] = frozenset()) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative).

    ``skip``: modules left out of the graph, with every edge to or from them.
    """

    def imported_by(module: str) -> list[str]:
        return sorted(graph.find_modules_directly_imported_by(module) - skip)

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules - skip):
        if root in index:
            continue
        work = [(root, iter(imported_by(root)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(imported_by(child))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


#: ``forkref/__init__.py`` is the public face: it imports the layers, and the tools
#: import it back for ``forkref.__version__`` and the public names, as any user
#: does. Those edges are the API, not a circle inside the implementation.
PUBLIC_FACE = frozenset({"forkref"})


def test_no_import_circles() -> None:
    graph = grimp.build_graph("forkref", cache_dir=None)
    assert _import_cycles(graph, skip=PUBLIC_FACE) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert _import_cycles(graph) == [["a.x", "a.y", "a.z"]]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines; split it along its jobs"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_class_size(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name not in FACADES:
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            assert lines <= MAX_CLASS_LINES, (
                f"class {node.name} in {path.name} has {lines} lines; give its jobs classes"
            )
