"""Reversible wrapt patches of methods on classes we do not own."""

from __future__ import annotations

import threading
from typing import Any, Callable, Union

import wrapt  # its stubs cover Python 3.10+ only: mypy --python-version 3.9 sees no names

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
        """Apply every patch not in place (idempotent; re-applies one that someone removed)."""
        with self._lock:
            for owner, name, wrapper in self._patches:
                key = (owner, name)
                current = owner.__dict__[name]
                applied = self._applied.get(key)
                if applied is not None and _reaches(current, applied[1]):
                    continue  # still in place (possibly under someone else's patch)
                stuck = self._stuck.pop(key, None)
                if stuck is not None and _reaches(current, stuck[1]):
                    self._applied[key] = stuck  # still in their chain: reuse, never wrap twice
                    continue
                if isinstance(wrapper, Replace):
                    ours = wrapper.factory(current)
                else:
                    ours = wrapt.FunctionWrapper(current, wrapper)  # type: ignore[attr-defined,unused-ignore]
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


def _reaches(func: Any, target: Any, limit: int = 32) -> bool:
    """Whether ``target`` is ``func`` or in the chain of ``__wrapped__`` under it (wrapt and
    ``functools.wraps`` both keep it), i.e. our patch still runs when ``func`` is called."""
    for _ in range(limit):
        if func is target:
            return True
        func = getattr(func, "__wrapped__", None)
        if func is None:
            return False
    return False
