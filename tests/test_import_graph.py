"""The package's import graph has no circles and no module imports another module's private names (issue 15).

Every ``import`` / ``from ... import`` in ``medxray/`` counts, at module level or inside a function (a
lazy import that closes a circle is still a circle: it only moves the failure to run time). Importing
``medxray.a.b`` also runs ``medxray/a/__init__.py``; that implicit parent edge is not counted, or every
package whose ``__init__`` re-exports a submodule would be a "circle".
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "medxray"


def module_files() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


@lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(edges {module: {imported medxray modules}}, [(module, imported module, private name)])."""
    mods = module_files()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: list[tuple[str, str, str]] = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in mods else base)
                    if a.name.startswith("_") and not a.name.startswith("__") and base.startswith("medxray"):
                        private.append((mod, base, a.name))
            for t in targets:
                if t.startswith("medxray"):
                    r = _resolve(t, mods)
                    if r and r != mod:
                        edges[mod].add(r)
    return edges, private


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def depth(edges: dict[str, set[str]]) -> int:
    """Longest chain of imports (number of edges) in an acyclic graph."""
    memo: dict[str, int] = {}

    def d(v: str) -> int:
        if v not in memo:
            memo[v] = 0
            memo[v] = max((1 + d(w) for w in edges.get(v, ())), default=0)
        return memo[v]

    return max(d(v) for v in edges)


def test_cycle_finder_finds_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_medxray():
    edges, _ = import_graph()
    assert len(edges) > 20
    cycles = find_cycles(edges)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert not private, "private names imported across modules: " + ", ".join(
        f"{m} imports {b}.{n}" for m, b, n in private)


if __name__ == "__main__":  # python tests/test_import_graph.py: print the graph's depth and any circles
    e, p = import_graph()
    print("modules", len(e), "cycles", find_cycles(e), "private", p)
    if not find_cycles(e):
        print("depth", depth(e))
