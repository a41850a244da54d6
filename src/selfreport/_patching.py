"""Reversible wrapt patches of methods on classes we do not own."""

from __future__ import annotations

import threading
from typing import Any, Callable

import wrapt

__all__ = ["Patches"]

Wrapper = Callable[[Callable[..., Any], Any, Any, Any], Any]


class Patches:
    """A set of ``(owner, attribute, wrapper)`` patches applied and removed together."""

    def __init__(self, *patches: tuple[Any, str, Wrapper]) -> None:
        self._patches = patches
        self._originals: dict[tuple[Any, str], Any] = {}
        self._lock = threading.Lock()

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def install(self) -> None:
        """Apply every patch not applied yet (idempotent)."""
        with self._lock:
            for owner, name, wrapper in self._patches:
                if (owner, name) in self._originals:
                    continue
                original = owner.__dict__[name]
                self._originals[(owner, name)] = original
                setattr(owner, name, wrapt.FunctionWrapper(original, wrapper))

    def uninstall(self) -> None:
        """Restore the originals, except where someone else has patched on top of ours since."""
        with self._lock:
            for (owner, name), original in self._originals.items():
                current = owner.__dict__.get(name)
                if isinstance(current, wrapt.FunctionWrapper) and current.__wrapped__ is original:
                    setattr(owner, name, original)
            self._originals.clear()
