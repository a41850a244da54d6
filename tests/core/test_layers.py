"""_core is the bottom stage: its modules import no other stage (not even lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

import selfreport._core

ALLOWED = ("selfreport._core", "selfreport.exceptions", "selfreport._version")


def test_core_imports_no_higher_stage() -> None:
    found = []
    for path in sorted(Path(selfreport._core.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith(".") and not name.startswith(".."):
                    continue  # a sibling in _core
                if name.startswith(("selfreport", "..")) and not name.startswith(ALLOWED):
                    found.append(f"{path.name}: {name}")
    assert found == []
