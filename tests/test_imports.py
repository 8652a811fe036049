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


_MAY = re.compile(r"^May import:\s+(.+?)\.$", re.M | re.S)


def declared_layers(root: Path = FORGE) -> dict[str, set[str] | None]:
    """package -> the forge packages its docstring says it may import (``None``: every one, the CLI)."""
    out = {}
    for init in sorted(root.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        m = _MAY.search(doc)
        assert m, f"{init.relative_to(root.parent)}: its docstring has no 'May import: forge.x, forge.y.' line"
        said = " ".join(m.group(1).split())
        out[init.parent.name] = (None if said == "every forge package" else
                                 set() if said == "nothing of forge" else
                                 {name.strip().removeprefix("forge.") for name in said.split(",")})
    return out


def package_edges(graph: dict[str, set[str]]) -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the 'module -> module' imports that make the edge."""
    pkg = lambda m: m.split(".")[1] if m.count(".") else None   # noqa: E731 (forge itself: no package)
    edges: dict[str, dict[str, set[str]]] = {}
    for mod, targets in graph.items():
        for t in targets:
            a, b = pkg(mod), pkg(t)
            if a and b and a != b:
                edges.setdefault(a, {}).setdefault(b, set()).add(f"{mod} -> {t}")
    return edges


def test_every_package_imports_only_what_its_docstring_says_it_may():
    """The folders are the layers: each package's docstring names the packages it may import, counting every
    import as the cycle check does; a new edge between layers is a decision written down, not an accident."""
    declared, found = declared_layers(), package_edges(import_graph())
    packages = {p.parent.name for p in FORGE.glob("*/__init__.py")}
    assert {p.name for p in FORGE.iterdir() if p.is_dir() and any(p.glob("*.py"))} == packages, \
        "every folder of forge/ is a package with an __init__.py docstring"
    wrong = [f"{a} imports {b} ({', '.join(sorted(via)[:2])}) but its docstring does not allow it"
             for a, targets in sorted(found.items()) if declared.get(a) is not None
             for b, via in sorted(targets.items()) if b not in declared[a]]
    assert wrong == [], "\n".join(wrong)
    stale = [f"{a}: declares {sorted(declared[a] - set(found.get(a, {})))} it does not import"
             for a in sorted(declared) if declared[a] is not None and declared[a] - set(found.get(a, {}))]
    assert stale == [], "\n".join(stale)   # the docstring says what is, not what might be


def test_the_layer_check_reads_the_docstrings_and_names_the_import(tmp_path):
    pkg = tmp_path / "forge"
    for name, doc in (("core", "Ground.\n\nMay import: nothing of forge."), ("model", "Files.\n\nMay import:\nforge.core.")):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text(f'"""{doc}\n"""\n')
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "x.py").write_text("def f():\n    from forge.model import y\n")
    (pkg / "model" / "y.py").write_text("from forge.core import x\n")
    assert declared_layers(pkg) == {"core": set(), "model": {"core"}}
    assert package_edges(import_graph(pkg)) == {"core": {"model": {"forge.core.x -> forge.model.y"}},
                                                 "model": {"core": {"forge.model.y -> forge.core.x"}}}


HEAVY = ("torch", "transformers", "lm_eval", "ray", "llmcompressor", "modelopt", "plotly", "scipy", "numpy",
         "safetensors", "datasets")


def test_below_the_cli_every_forge_import_is_at_the_top_of_its_module():
    """forge's modules import no heavy library at their top (the next test), so a forge import inside a function
    would hide a dependency and save nothing; only the CLI imports a command's implementation when the command
    runs, which keeps `forge --help` to the command line itself."""
    lazy = []
    for path in sorted(FORGE.rglob("*.py")):
        if path.relative_to(FORGE).parts[0] == "cli":
            continue
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{path.relative_to(REPO)}:{node.lineno}" for node in ast.walk(func)
                         if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "forge"
                         or isinstance(node, ast.Import) and any(a.name.split(".")[0] == "forge" for a in node.names)]
    assert lazy == [], "function-level forge imports outside forge/cli:\n" + "\n".join(lazy)


def test_importing_all_of_forge_loads_no_heavy_library_and_help_loads_only_the_cli():
    import subprocess
    import sys

    modules = sorted({_module(p, REPO) for p in FORGE.rglob("*.py") if p.name != "__main__.py"})
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print([h for h in {HEAVY!r} if h in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    code = ("import sys\nsys.argv = ['forge', '--help']\nfrom forge.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(repr(sorted(m for m in sys.modules if m.startswith(('forge.steps', 'forge.registry', "
            f"'forge.orchestrate', 'forge.report', 'forge.deploy')) or m in {HEAVY!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
