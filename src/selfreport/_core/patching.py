"""Reversible patches of attributes we do not own (methods, sys and threading hooks)."""

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
    """A set of ``(owner, attribute, wrapper)`` patches applied and removed together: the one
    mechanism for installing, removing and re-installing what selfreport hooks into (class
    methods, and the sys / threading exception hooks, via :class:`Replace`)."""

    def __init__(self, *patches: tuple[Any, str, Union[Wrapper, Replace]]) -> None:
        self._patches = patches
        # (owner, name) -> (what we wrapped, our wrapper)
        self._applied: dict[tuple[Any, str], tuple[Any, Any]] = {}
        # Patches we could not remove because someone patched on top of ours since: our wrapper
        # still runs inside their chain, so a re-install reuses it instead of wrapping twice
        # (which, for a hook chaining to what it replaced, would make the two call each other).
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
                if stuck is not None and (_reaches(current, stuck[1]) or current != stuck[0]):
                    # Still in their chain: reuse, never wrap twice. A patch on top that does
                    # not say what it wraps (no __wrapped__) is taken to chain to ours, as
                    # hooks do; only the original back in place means we are out of every chain.
                    self._applied[key] = stuck
                    continue
                if isinstance(wrapper, Replace):
                    ours = wrapper.factory(current)
                else:
                    ours = wrapt.FunctionWrapper(current, wrapper)  # type: ignore[attr-defined,unused-ignore]
                self._applied[key] = (current, ours)
                setattr(owner, name, ours)

    def replaced(self, owner: Any, name: str) -> Any:
        """What our patch of ``owner.name`` replaced (also once stuck in another's chain), or
        None if it is not patched: where a hook chains to."""
        entry = self._applied.get((owner, name)) or self._stuck.get((owner, name))
        return entry[0] if entry is not None else None

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
