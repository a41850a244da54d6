"""Import structure of the SDK: cycles (module-level and lazy), upward imports, long functions."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
# Stages, low to high: a module may import its own stage and lower ones.
STAGES = [
    ("selfreport._version", "selfreport.exceptions", "selfreport._core"),
    ("selfreport._admission", "selfreport._capture"),
    ("selfreport._delivery",),
    ("selfreport._onprem",),
    ("selfreport._client", "selfreport._state"),
    ("selfreport", "selfreport.logging", "selfreport.testing"),
    (
        "selfreport.integrations",
        "selfreport.collector",
        "selfreport.cli",
        "selfreport.demo",
        "selfreport._demo_app",
        "selfreport.__main__",
    ),
]
MAX_LINES = 60


def stage(module: str) -> int:
    best, rank = -1, len(STAGES)
    for index, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "selfreport").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str]]:
    """(imported module, kind) pairs; kind: "top", "lazy" (in a function) or "typing"."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                here = "lazy" if kind == "top" else kind
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                here = "typing"
            if isinstance(child, ast.Import):
                out.extend((alias.name, here) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    out.append((full if full in known else base, here))
            visit(child, here)

    visit(tree, "top")
    return [(target, kind) for target, kind in out if target in known and target != name]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    return found


def long_functions(paths: dict[str, Path]) -> list[str]:
    out = []
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_LINES:
                    out.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    return out


def main() -> int:
    paths = modules()
    edges = {name: imports(name, path, set(paths)) for name, path in paths.items()}
    problems = 0
    for kinds, label in ((("top",), "module-level"), (("top", "lazy"), "with lazy imports")):
        graph = {n: {t for t, k in e if k in kinds} for n, e in edges.items()}
        for component in cycles(graph):
            problems += kinds == ("top",)
            print(f"cycle ({label}): {' <-> '.join(component)}")
    for name, targets in sorted(edges.items()):
        for target, kind in targets:
            if stage(target) > stage(name):
                print(f"upward ({kind}): {name} -> {target}")
    for line in long_functions(paths):
        print(f"long: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
