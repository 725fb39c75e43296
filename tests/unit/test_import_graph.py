"""No import circle in the project's code: pipeline/, stages/, launchers/ and kernels/.

The graph is built statically (ast, nothing is imported): an edge A -> B for every `import B`,
`from B import name` or `from B import submodule` (then the edge goes to B.submodule) in module A.
Imports inside functions count as well: a lazy import that closes a circle only hides it until
some caller imports in another order. Imports under `if TYPE_CHECKING:` never run and do not count.
An import that closes a circle on purpose is marked on its line with `# import-cycle: deliberate`
and leaves the graph; nothing is marked today.

Run `python tests/unit/test_import_graph.py` to print the circles.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "launchers", "kernels")
DELIBERATE = "# import-cycle: deliberate"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _executed_imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run: at module level, in functions and classes,
    in try/except and if blocks, but not in the body of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name `from .x import y` refers to, seen from `module`."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of the project's modules (None: an outside import)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports (see the module docstring for what counts)."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        is_package = path.name == "__init__.py"
        for node in _executed_imports(ast.parse(source, filename=str(path))):
            if DELIBERATE in lines[node.lineno - 1]:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _absolute(module, is_package, node)
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                known = _known(target, modules)
                if known is not None and known != module:
                    graph[module].add(known)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles, each as a closed path [a, b, ..., a]: within every strongly connected component
    of more than one module, a shortest circle through each import edge not on an earlier circle,
    so that every import that has to go is named."""
    cycles = []
    for component in _components(graph):
        covered = set()
        for source in sorted(component):
            for target in sorted(graph[source] & component):
                if (source, target) in covered:
                    continue
                cycle = [source, *_shortest_path(graph, target, source, component)]
                covered.update(zip(cycle, cycle[1:]))
                cycles.append(cycle)
    return cycles


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(graph[root])))]
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while node not in component:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                    if len(component) > 1:
                        components.append(component)
    return components


def _shortest_path(graph: dict[str, set[str]], start: str, goal: str, within: set[str]) -> list[str]:
    """[start, ..., goal] by breadth-first search inside `within` (both ends are in one component)."""
    parents = {start: None}
    frontier = [start]
    while goal not in parents:
        if not frontier:
            raise AssertionError(f"{goal} is not reachable from {start}")
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & within):
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    path = [goal]
    while parents[path[-1]] is not None:
        path.append(parents[path[-1]])
    return path[::-1]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_graph_sees_every_kind_of_import(tmp_path):
    """The checker itself: relative, absolute, submodule-from-package and function-level imports
    make edges; TYPE_CHECKING and marked imports do not; a circle is reported as a closed path."""
    files = {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "from . import b\n",
        "pipeline/b.py": "def f():\n    from pipeline.c import g\n",
        "pipeline/c.py": "import pipeline.a\n",
        "stages/__init__.py": "",
        "stages/x.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stages.y import T\n"
                        "from .z import h  " + DELIBERATE + "\n"),
        "stages/y.py": "from stages import x\n",
        "stages/z.py": "from .x import k\n",
        "launchers/__init__.py": "",
        "kernels/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["pipeline.a"] == {"pipeline.b"}
    assert graph["pipeline.b"] == {"pipeline.c"}
    assert graph["pipeline.c"] == {"pipeline.a"}
    assert graph["stages.x"] == set()
    assert graph["stages.y"] == {"stages.x"}
    assert graph["stages.z"] == {"stages.x"}
    assert find_cycles(graph) == [["pipeline.a", "pipeline.b", "pipeline.c", "pipeline.a"]]


if __name__ == "__main__":
    found = find_cycles(import_graph())
    for cycle in found:
        print(" -> ".join(cycle))
    sys.exit(1 if found else 0)
