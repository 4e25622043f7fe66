"""The package's import graph has no circle (lazy, in-function imports included) and nothing imports the CLI."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "diffalign"


def import_graph() -> dict[str, set[str]]:
    """Module name → the package modules it imports anywhere in its source."""
    modules = {("diffalign." + ".".join(f.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): f
               for f in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("diffalign"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_circle_and_nothing_imports_the_cli():
    graph = import_graph()
    assert "diffalign.cli" in graph and "diffalign.training.trainer" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle)
    importers = sorted(m for m, deps in graph.items() if "diffalign.cli" in deps)
    assert importers == [], f"the CLI is the top layer; these import it: {importers}"


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
