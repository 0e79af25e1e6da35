"""The package's shape: each module imports only what stands below it (no import circles, counting imports inside
functions too, which is how circles hide), and no module imports another module's private names. The few that
remain are listed here by name: a new one fails, and so does a listed one that is gone (the list stays true)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "cl_service"

#: Import circles still to break (each a set of modules that import each other; these two only for type annotations).
KNOWN_CIRCLES: list[set[str]] = [
    {"cl_service.models.generate", "cl_service.models.mllm", "cl_service.models.prompting"},
    {"cl_service.engine.engine", "cl_service.engine.labels"},
]
#: Private names still imported across modules.
KNOWN_PRIVATE: set[str] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], set[str]]:
    """Each module's imports of other modules of the package, and the private names imported across modules."""

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: set[str] = set()
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names if a.name.startswith("cl_service")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cl_service"):
                targets = []
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    targets.append(full if full in mods else owner(node.module))
                    if a.name.startswith("_") and not a.name.startswith("__") and full not in mods and node.module != m:
                        private.add(full)
            else:
                continue
            graph[m].update(t for t in targets if t and t != m)
    return graph, private


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_no_import_circles_but_the_listed_ones():
    graph, _ = _imports(_modules())
    circles = _circles(graph)
    new = [sorted(c) for c in circles if c not in KNOWN_CIRCLES]
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in circles]
    assert not new, f"modules that import each other: {new}"
    assert not gone, f"no longer circles (take them off KNOWN_CIRCLES): {gone}"


def test_no_private_names_imported_across_modules_but_the_listed_ones():
    _, private = _imports(_modules())
    assert not private - KNOWN_PRIVATE, f"private names imported from another module: {sorted(private - KNOWN_PRIVATE)}"
    assert not KNOWN_PRIVATE - private, f"no longer imported (take them off KNOWN_PRIVATE): {sorted(KNOWN_PRIVATE - private)}"


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
