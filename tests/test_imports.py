"""No import circles in forge/.

What counts: every ``import``/``from … import`` of a forge module anywhere in a file -- at module level,
inside functions and under ``if TYPE_CHECKING:`` alike (a lazy import hides the cost of a dependency, not
the dependency; a type-only import is still a dependency of the code's meaning) -- and every string that
names a forge module, such as a registry's lazy ``"forge.engines.vllm:ENGINE"`` entry or a step's
``run="forge.steps.gate:run"`` (an import deferred to run time is an import). Not counted: the implicit
import of a package's ``__init__`` when one of its submodules is imported (Python's, not the code's). So
a step module may import its contract from ``forge.steps``, and ``forge.steps`` must then import no step.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

FORGE = REPO / "forge"
_NAMED = re.compile(r"forge(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?")   # "forge.x.y" or "forge.x.y:attr" in a string


def _module(path: Path, top: Path) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = FORGE) -> dict[str, set[str]]:
    """module -> the package modules it imports (see the module docstring for what counts)."""
    mods = {_module(p, root.parent): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _NAMED.fullmatch(node.value):
                targets = [node.value.split(":")[0]]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_in(graph, comp) for comp in sorted(comps, key=min)]


def _path_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A cycle through the component's first module, found by breadth-first search."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_forge_has_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles in forge/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checker_sees_function_level_type_only_and_registry_string_imports(tmp_path):
    pkg = tmp_path / "forge"
    (pkg / "steps").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from forge import b\n")
    (pkg / "b.py").write_text("def f():\n    from forge.steps import c\n")
    (pkg / "steps" / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from forge import a\n")
    (pkg / "steps" / "c.py").write_text("from .. import a\nfrom forge.steps import x\n")
    (pkg / "reg.py").write_text("ENTRIES = {'x': 'forge.steps.c:run'}\n")
    graph = import_graph(pkg)
    assert graph["forge.steps"] == {"forge.a"}                  # a type-only import is an edge
    assert graph["forge.steps.c"] == {"forge.a", "forge.steps"}  # relative import resolved
    assert graph["forge.reg"] == {"forge.steps.c"}              # a registry string names a module
    assert cycles(graph) == [["forge.a", "forge.b", "forge.steps.c", "forge.a"]]
