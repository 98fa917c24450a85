"""The floors of the code, checked rather than hoped for (``docs/architecture.md`` draws them).

Every import of ``pipeline/``, ``transforms/`` and ``benchmarks/`` counts, also those inside
functions and under ``TYPE_CHECKING``: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "transforms", "benchmarks")
#: The library's ground floor: storage, pure image functions, start-up marks, machine sizing.
BASE = ("transforms.storage", "transforms.images", "transforms.startup", "transforms.devices")
#: What the jobs share; every other module of ``pipeline/`` is a job, and jobs never import jobs.
JOB_SHARED = ("pipeline.cli", "pipeline.config", "pipeline.launch", "pipeline.runners")
JOB_SHARED += ("pipeline.logs", "pipeline.console", "pipeline.recipe_flags")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: pathlib.Path, modules) -> set[str]:
    """Our modules that ``path`` imports anywhere in its code (resolved to the module, or to the
    package when a name is imported from a package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        # A module's own package (``from transforms.models import weights`` inside it) is not
        # an edge: Python has already initialised the package when its module runs.
        graph[name] = {m for m in _imports(path, modules) if not name.startswith(m + ".")}
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_point_down_the_floors():
    """deploy -> benchmarks / jobs -> library (models above its ground floor)."""
    wrong = []
    for module, imported in import_graph().items():
        for target in imported:
            if module.startswith("transforms") and not target.startswith("transforms"):
                wrong.append((module, target))  # the library never imports a job or the bench
            if module.startswith("pipeline") and target.startswith("benchmarks"):
                wrong.append((module, target))  # commands never import the bench
            if _within(module, ("transforms.models",)) and not _within(
                target, ("transforms.models", *BASE)
            ):
                wrong.append((module, target))  # the model wing stands on the ground floor only
            if _within(module, BASE) and not _within(target, BASE):
                wrong.append((module, target))
            if (
                module.startswith("pipeline")
                and target.startswith("pipeline")
                and not _within(module, JOB_SHARED)
                and not _within(target, JOB_SHARED)
            ):
                wrong.append((module, target))  # jobs never import jobs
    assert wrong == []


def test_the_registry_and_the_recipe_import_no_keras():
    """Listing backbones, reading a table's recipe and planning stay light."""
    code = (
        "import sys, transforms.models.registry, transforms.models.recipe; "
        "print(sorted(m for m in ('keras', 'tensorflow', 'keras_hub') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_says_what_it_holds(package):
    missing = [
        name
        for name, path in _modules().items()
        if name.startswith(package)
        and ast.get_docstring(ast.parse(path.read_text())) is None
        and path.stat().st_size > 0
    ]
    assert missing == []
