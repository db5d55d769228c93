"""The walls between flywheel's packages, checked on the source (ast), not by importing it.

- no import cycle among flywheel's modules, counting imports inside functions (a lazy import hides a
  cycle from Python, not from the reader) and leaving out `if TYPE_CHECKING:` blocks;
- only flywheel/store/ imports flywheel.store.schema: the tables are the store's;
- nothing in flywheel/tools/ or flywheel/agent/ imports the CLI (flywheel.commands, flywheel.cli);
- no module is over MAX_LINES lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flywheel"
MAX_LINES = 500

Graph = dict[str, dict[str, int]]  # module -> {flywheel module it imports: line of the first such import}


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py file under `package` (a package's name is its __init__'s)."""
    out: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST, type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, at any depth; `if TYPE_CHECKING:` bodies only when asked."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test) and not type_checking:
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), type_checking)
        else:
            yield from _imports(child, type_checking)


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The flywheel module an imported dotted name lives in (the longest known prefix), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: Path, *, type_checking: bool = False) -> Graph:
    modules = module_names(package)
    graph: Graph = {name: {} for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for stmt in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), type_checking):
            if isinstance(stmt, ast.Import):
                wanted = [alias.name for alias in stmt.names]
            else:
                base = stmt.module or ""
                if stmt.level:
                    base = ".".join(here[: len(here) - stmt.level + 1] + ([stmt.module] if stmt.module else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                wanted = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in stmt.names]
            for dotted in wanted:
                target = _target(dotted, modules)
                if target is not None and target != name:
                    graph[name].setdefault(target, stmt.lineno)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
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
                        found.append(sorted(component))
    return found


def _describe(component: list[str], graph: Graph) -> str:
    edges = [f"  {a}:{graph[a][b]} imports {b}" for a in component for b in sorted(graph[a]) if b in component]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


def _importers(graph: Graph, target: str, outside: tuple[str, ...] = (), inside: tuple[str, ...] = ()) -> list[str]:
    """`module:line` for each module (optionally only those under `inside`, and not under `outside`)
    that imports `target` or a module under it."""

    def under(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return [
        f"{module}:{line} imports {imported}"
        for module, imports in sorted(graph.items())
        if not under(module, outside) and (not inside or under(module, inside))
        for imported, line in sorted(imports.items())
        if under(imported, (target,))
    ]


def test_no_import_cycles() -> None:
    graph = import_graph(PACKAGE)
    found = cycles(graph)
    assert not found, "import cycles (a function-level import counts too):\n" + "\n".join(_describe(c, graph) for c in found)


def test_only_the_store_imports_its_schema() -> None:
    offenders = _importers(import_graph(PACKAGE, type_checking=True), "flywheel.store.schema", outside=("flywheel.store",))
    assert not offenders, "the tables are flywheel.store's; use a store module's functions instead:\n" + "\n".join(offenders)


def test_tools_and_agent_do_not_import_the_cli() -> None:
    graph = import_graph(PACKAGE, type_checking=True)
    offenders = [
        line
        for cli in ("flywheel.commands", "flywheel.cli")
        for line in _importers(graph, cli, inside=("flywheel.tools", "flywheel.agent"))
    ]
    assert not offenders, "the CLI is built on the tools and the agent, not the other way round:\n" + "\n".join(offenders)


def test_no_module_over_the_line_limit() -> None:
    sizes = {
        path.relative_to(PACKAGE.parent): len(path.read_text(encoding="utf-8").splitlines()) for path in module_names(PACKAGE).values()
    }
    offenders = sorted(f"{path}: {n} lines" for path, n in sizes.items() if n > MAX_LINES)
    assert not offenders, f"modules over {MAX_LINES} lines; split them along a seam:\n" + "\n".join(offenders)


# --- the checks themselves can fail ----------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_the_graph_sees_function_level_cycles_and_skips_type_checking(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def f():\n    from pkg import b\n",
            "pkg/b.py": "from . import c\n",
            "pkg/c.py": "import pkg.a as a\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import X\nelse:\n    X = None\n",
            "pkg/e.py": "from pkg.d import X\n",
            "pkg/sub/__init__.py": "from .leaf import Y\n",
            "pkg/sub/leaf.py": "from ..schema import T\n",
            "pkg/schema.py": "",
        },
    )
    graph = import_graph(package)
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert graph["pkg.a"] == {"pkg.b": 2}
    assert graph["pkg.sub"] == {"pkg.sub.leaf": 1} and graph["pkg.sub.leaf"] == {"pkg.schema": 1}
    assert "pkg.e" in import_graph(package, type_checking=True)["pkg.d"]
    assert _importers(graph, "pkg.schema", outside=("pkg.sub",)) == []
    assert _importers(graph, "pkg.schema", inside=("pkg.sub",)) == ["pkg.sub.leaf:1 imports pkg.schema"]
