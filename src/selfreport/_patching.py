"""Reversible wrapt patches of methods on classes we do not own."""

from __future__ import annotations

import threading
from typing import Any, Callable, Union

import wrapt

__all__ = ["Patches", "Replace"]

Wrapper = Callable[[Callable[..., Any], Any, Any, Any], Any]


class Replace:
    """A patch that installs ``factory(original)`` as a plain function instead of a wrapt
    wrapper: for the few hot methods where even wrapt's C wrapper costs too much."""

    def __init__(self, factory: Callable[[Any], Any]) -> None:
        self.factory = factory


class Patches:
    """A set of ``(owner, attribute, wrapper)`` patches applied and removed together."""

    def __init__(self, *patches: tuple[Any, str, Union[Wrapper, Replace]]) -> None:
        self._patches = patches
        # (owner, name) -> (what we wrapped, our wrapper)
        self._applied: dict[tuple[Any, str], tuple[Any, Any]] = {}
        # Patches we could not remove because someone patched on top of ours since: our wrapper
        # still runs inside their chain, so a re-install reuses it instead of wrapping twice.
        self._stuck: dict[tuple[Any, str], tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    @property
    def installed(self) -> bool:
        return bool(self._applied)

    def install(self) -> None:
        """Apply every patch not applied yet (idempotent)."""
        with self._lock:
            for owner, name, wrapper in self._patches:
                key = (owner, name)
                if key in self._applied:
                    continue
                current = owner.__dict__[name]
                stuck = self._stuck.pop(key, None)
                if stuck is not None and current is not stuck[0]:
                    self._applied[key] = stuck
                    continue
                if isinstance(wrapper, Replace):
                    ours = wrapper.factory(current)
                else:
                    ours = wrapt.FunctionWrapper(current, wrapper)
                self._applied[key] = (current, ours)
                setattr(owner, name, ours)

    def uninstall(self) -> None:
        """Restore the originals, except where someone else has patched on top of ours since."""
        with self._lock:
            for (owner, name), (original, ours) in self._applied.items():
                if owner.__dict__.get(name) is ours:
                    setattr(owner, name, original)
                else:
                    self._stuck[(owner, name)] = (original, ours)
            self._applied.clear()
