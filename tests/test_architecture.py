"""The map in docs/architecture.md kept true: layers, no import loops, short functions."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Lowest first. A module may import from its own layer and the layers below it, never above:
# the data flows up this list, and each stage knows only what it hands its work to.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("selfreport._version", "selfreport.exceptions"),
    ("selfreport._core",),
    ("selfreport._capture", "selfreport._admission"),
    ("selfreport._delivery",),
    ("selfreport._onprem",),
    ("selfreport._client",),
    ("selfreport._state",),
    ("selfreport.logging", "selfreport.testing"),
    ("selfreport",),
    ("selfreport.integrations", "selfreport.collector"),
    ("selfreport.demo", "selfreport._demo_app", "selfreport.cli", "selfreport.__main__"),
)

# Imports from a higher layer that are allowed, each done lazily inside a function and said why.
LAZY_UPWARD: dict[tuple[str, str], str] = {}

MAX_FUNCTION_LINES = 60


class Import(NamedTuple):
    source: str
    target: str
    lazy: bool  # inside a function: runs when called, not when imported
    typing_only: bool  # under ``if TYPE_CHECKING``: never runs


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "selfreport").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports() -> list[Import]:
    found: list[Import] = []
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        _walk(name, package, ast.parse(path.read_text(encoding="utf-8")), False, False, found)
    return found


def _walk(
    name: str, package: str, node: ast.AST, lazy: bool, typing_only: bool, found: list[Import]
) -> None:
    for child in ast.iter_child_nodes(node):
        inner_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        inner_typing = typing_only or (
            isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
        )
        for target in _targets(package, child):
            if target != name:
                found.append(Import(name, target, inner_lazy, inner_typing))
        _walk(name, package, child, inner_lazy, inner_typing, found)


def _targets(package: str, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    targets = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        targets.append(full if full in MODULES else base)
    return [target for target in targets if target in MODULES]


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best:
                best, rank = len(prefix), index
    if rank < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return rank


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = {
        (edge.source, edge.target): edge.lazy
        for edge in _imports()
        if not edge.typing_only and layer_of(edge.target) > layer_of(edge.source)
    }
    unexplained = sorted(edge for edge in upward if edge not in LAZY_UPWARD)
    assert unexplained == []
    eager = sorted(edge for edge, lazy in upward.items() if not lazy)
    assert eager == [], "an allowed upward import must be lazy (inside a function)"
    stale = sorted(edge for edge in LAZY_UPWARD if edge not in upward)
    assert stale == [], "LAZY_UPWARD names imports that no longer exist"


def _graph(lazy: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in _imports():
        if (lazy or not edge.lazy) and not edge.typing_only:
            graph[edge.source].add(edge.target)
    return graph


def test_no_import_loops() -> None:
    assert _cycles(_graph(lazy=False)) == []


def test_lazy_imports_loop_only_inside_one_package() -> None:
    # A lazy import that closes a loop is fine between two modules of one package (the
    # scrubber's list and its patterns); between stages it would be a hidden dependency.
    crossing = [
        cycle for cycle in _cycles(_graph(lazy=True)) if len({_package(m) for m in cycle}) > 1
    ]
    assert crossing == []


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_cycle_finder_finds_a_loop() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layer_check_sees_an_upward_import() -> None:
    assert layer_of("selfreport._core.guard") < layer_of("selfreport._delivery.spool")
    assert layer_of("selfreport.collector.app") > layer_of("selfreport._client")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("elsewhere.module")


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert long == []


def test_the_map_names_every_module() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = []
    for path in MODULES.values():
        shown = path.relative_to(SRC / "selfreport").as_posix()
        if f"`{shown}`" not in text:
            missing.append(shown)
    assert missing == [], "docs/architecture.md must say what each module is for"


if __name__ == "__main__":  # the figures: python tests/test_architecture.py
    edges = _imports()
    upward = sorted(
        {(e.source, e.target, e.lazy) for e in edges if not e.typing_only}
        - {(e.source, e.target, e.lazy) for e in edges if layer_of(e.target) <= layer_of(e.source)}
    )
    print("modules:", len(MODULES))
    print("import loops (module level):", _cycles(_graph(lazy=False)))
    print("import loops (with lazy imports):", _cycles(_graph(lazy=True)))
    print("upward imports:", upward)
