"""The package's picture (docs/design.md): entry points above, stages in the middle, the shared core below, and
no arrow back up and no circle (issue 28 item 4). Read from the source with Python's ast, every import counted,
also those inside functions; the one exception is the notebook entry point's lazy import in pipeline/__init__.py
(`from pipeline import open_run`), which is what lets the package import without the notebook API."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pipeline

ROOT = os.path.dirname(os.path.abspath(pipeline.__file__))
TOP = {"cli", "cluster", "bench", "api", "query", "demo", "__main__"}  # entry points and the jobs wing
STAGES = {"scan", "render", "explain", "dissect", "compare", "site", "optvis", "score"}
LAZY_ENTRY = ("pipeline", "pipeline.api")  # pipeline/__init__.py's __getattr__


def _modules() -> dict[str, str]:
    found = {}
    for directory, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = "pipeline." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from pipeline.x import y` names pipeline.x.y if a module)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        with open(path) as handle:
            tree = ast.parse(handle.read())
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative imports resolved against the package
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[module] = {t for t in targets if t in modules and t != module and (module, t) != LAZY_ENTRY}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself: __version__ (its one import is the exempt lazy one)
    return 2 if parts[1] in TOP else 1 if parts[1] in STAGES else 0


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_circle_and_no_arrow_back_up():
    graph = _imports(_modules())
    assert len(graph) > 80 and "pipeline.scan.runner" in graph["pipeline.cli.scan"]  # the walk sees the package
    assert _cycles(graph) == []
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))
    assert upward == []


def test_the_checks_would_see_a_circle_and_an_arrow_up():
    """The checker itself, on a hand-made graph: a circle and a core -> stage arrow are found."""
    graph = {
        "pipeline.data": {"pipeline.scan.runner"},
        "pipeline.scan.runner": {"pipeline.data", "pipeline.cluster.config"},
        "pipeline.cluster.config": set(),
    }
    assert _cycles(graph) == [["pipeline.data", "pipeline.scan.runner"]]
    assert _layer("pipeline.data") < _layer("pipeline.scan.runner") < _layer("pipeline.cluster.config")


def test_render_plan_imports_without_torch():
    """`pipeline.render.plan` says what a render draws: the CLI's plan and estimate need no torch (4 s)."""
    code = "import sys, pipeline.render.plan; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
