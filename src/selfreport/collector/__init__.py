"""The collector: a Sentry-compatible server that reports its own errors into itself."""

# Needs the [collector] extra (pip install 'selfreport[collector]'). Run it with
# `selfreport serve`; embed it with CollectorServer or create_app. Storage alone needs only the
# standard library, so project commands work without the web stack.

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Collector, create_app
    from .server import CollectorServer, serve
    from .storage import SqliteStorage, Storage
    from .store import Store

__all__ = [
    "Collector",
    "CollectorServer",
    "SqliteStorage",
    "Storage",
    "Store",
    "create_app",
    "require_extra",
    "serve",
]

_LAZY = {
    "Collector": "app",
    "create_app": "app",
    "CollectorServer": "server",
    "serve": "server",
    "SqliteStorage": "storage",
    "Storage": "storage",
    "Store": "store",
}


def require_extra() -> None:
    """Raise ImportError naming the extra to install when a collector dependency is missing."""
    for module in ("starlette", "uvicorn", "prometheus_client", "jinja2"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(
                f"the selfreport collector needs {module}: pip install 'selfreport[collector]'",
                name=module,
            ) from exc


def __getattr__(name: str) -> Any:
    # Storage needs only the standard library; the rest needs the [collector] extra.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module not in ("storage", "store"):
        require_extra()
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)
