"""The package layers of DESIGN.md, checked on the source: ``tasks`` at the bottom, then the
optimizer library (``lopt`` minus its subpackages), then ``estimators``, then the training layer
``lopt.training``, the experiments ``lopt.experiments`` and the command-line programs
``lopt.cli``. Nothing imports upward, and the modules' import graph has no cycle."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tasks", "lopt", "estimators")


def _layer(module: str) -> int:
    if module.startswith("lopt.cli"):  # the command-line programs sit on top
        return 5
    if module.startswith("lopt.experiments"):
        return 4
    if module.startswith("lopt.training"):
        return 3
    return {"tasks": 0, "lopt": 1, "estimators": 2}[module.split(".")[0]]


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for root, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """Our modules that ``path`` imports (at any depth of the file, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        for dep in _imports(path, modules):
            if _layer(dep) > _layer(mod):
                bad.append(f"{mod} imports {dep}")
    assert not bad, bad
    # lopt/__init__ (the optimizer library) must not pull the training layer in.
    assert not any(d.startswith("lopt.training") for d in _imports(modules["lopt"], modules))


def test_the_import_graph_is_a_dag():
    modules = _modules()
    # A submodule importing a name from its own package (``from tasks import catalogue`` in
    # tasks.data) imports nothing the package's import of it has not started: no edge.
    graph = {m: {d for d in _imports(p, modules) if d != m and not m.startswith(d + ".")}
             for m, p in modules.items()}
    # A package's __init__ importing its own submodules (registration) is not a cycle of
    # concern, but a submodule importing back a sibling that imports it is.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if d in stack and not (m == d.rpartition(".")[0] or d == m.rpartition(".")[0]):
                cycle.append(" -> ".join(stack[stack.index(d):] + [d]))
            if state.get(d) is None:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m, [m])
    assert not cycle, cycle
