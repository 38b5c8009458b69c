"""No import cycles among the modules of ``mbn``.

The graph is read from the source with :mod:`ast`: every ``import mbn.x`` and ``from mbn.x import name`` (relative
ones resolved) is an edge to ``mbn.x``, or to ``mbn.x.name`` when that is a module; a package's ``__init__`` is a
node of its own, and the implicit import of a module's parent package is not an edge. Imports inside functions
count too: a function-level import is how a cycle is usually hidden (``mbn.data`` and ``mbn.streaming`` once
imported each other that way), and it still ties the two modules' layers together. Imports under
``if TYPE_CHECKING:`` do not count: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

MBN = Path(__file__).resolve().parents[1] / "mbn"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(MBN.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(MBN.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> the mbn modules it imports``."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for target in targets:
                while target and target not in known:  # `import mbn.x.y.attr`-style: the longest module prefix
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component)) for component in sorted(components)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle in {sorted(component)}")


def _describe(cycles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_graph_sees_the_data_package() -> None:
    graph = import_graph()
    assert "mbn.data" in graph and "mbn.data.bundle" in graph["mbn.data"]
    assert "mbn.data.loaders" in graph["mbn.data.streamed"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_through_mbn_data() -> None:
    cycles = [cycle for cycle in find_cycles(import_graph()) if any(m.startswith("mbn.data") for m in cycle)]
    assert not cycles, f"import cycles: {_describe(cycles)}"


def test_data_layers_import_no_recipe_level_module() -> None:
    graph = import_graph()
    for lower in ("arrays", "transforms", "files", "loaders", "fingerprints", "streamed", "preloaded"):
        name = f"mbn.data.{lower}"
        assert "mbn.data.bundle" not in graph[name] and "mbn.data" not in graph[name], name


def test_no_import_cycles_in_mbn() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, f"import cycles: {_describe(cycles)}"
