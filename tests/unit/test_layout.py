"""The package's shape: no import cycles (lazy imports included), modules of one size.

The graph counts every import in `workbench/`, those inside functions too (a lazy import that
closes a cycle only hides it), and leaves out those under `if TYPE_CHECKING:`, which never run.
Importing `workbench.a.b` also runs `workbench/a/__init__.py`, so an import of a module in
another subpackage is an edge to that subpackage's `__init__` as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import workbench

PACKAGE = Path(workbench.__file__).parent
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = ("workbench", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, importer: str, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `tree` imports when it runs."""
    found: set[str] = set()
    package = importer if modules[importer].name == "__init__.py" else importer.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from workbench.x import y` imports the submodule y when there is one, else
            # takes y from workbench.x itself.
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own = set(_ancestors(name))
        edges: set[str] = set()
        for target in _imports(ast.parse(path.read_text()), name, modules):
            edges.add(target)
            edges.update(a for a in _ancestors(target) if a not in own and a in modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30, "the walk found too few modules: is the package where it should be?"
    assert find_cycles(graph) == []


def test_cycle_finder_sees_lazy_imports(tmp_path: Path) -> None:
    """The check itself can fail: a cycle closed by a function-level import is found, and one
    that only exists under TYPE_CHECKING is not."""
    src = {
        "a": "from workbench.b import f\n",
        "b": "def f():\n    from workbench.a import g\n",
        "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from workbench.d import h\n",
        "d": "from workbench.c import k\n",
    }
    modules = {f"workbench.{k}": tmp_path / f"{k}.py" for k in src}
    graph = {name: _imports(ast.parse(src[name.split(".")[1]]), name, modules) for name in modules}
    assert find_cycles(graph) == [["workbench.a", "workbench.b"]]


def test_modules_stay_small() -> None:
    sizes = {name: len(p.read_text().splitlines()) for name, p in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_subpackages_follow_the_data_flow() -> None:
    """A reader who lists the folders sees the pipeline (README, "Layout")."""
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == {
        "study",
        "engine",
        "measure",
        "compare",
        "interp",
        "organism",
        "demo",
        "cli",
    }


def test_public_api_names() -> None:
    import workbench as wb

    for name in wb.__all__:
        assert getattr(wb, name) is not None
