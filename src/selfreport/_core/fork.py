"""The one fork registry: what a forked child must reset, registered by every part needing it."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Callable, Union

__all__ = ["fresh_event", "on_fork_child", "run_fork_callbacks"]

_Ref = Union["weakref.WeakMethod[Callable[[], None]]", Callable[[], Callable[[], None]]]
_callbacks: list[_Ref] = []
_lock = threading.Lock()


def on_fork_child(callback: Callable[[], None]) -> None:
    """Run ``callback`` in every child forked from now on, in registration order.

    A bound method is held weakly (a closed client that is dropped is forgotten, not kept
    alive by the registry); a plain function is held for the life of the process.
    """
    ref: _Ref
    if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
        ref = weakref.WeakMethod(callback)
    else:

        def ref() -> Callable[[], None]:
            return callback

    with _lock:
        _callbacks[:] = [r for r in _callbacks if r() is not None]
        _callbacks.append(ref)


def run_fork_callbacks() -> None:
    """What a forked child runs first (public for tests): every live callback, none raising."""
    global _lock
    _lock = threading.Lock()  # the parent may have held it while forking
    for ref in list(_callbacks):
        callback = ref()
        if callback is None:
            continue
        try:
            callback()
        except Exception:  # pragma: no cover - a reset must not stop the others
            pass


def fresh_event(old: threading.Event) -> threading.Event:
    """A new Event in ``old``'s state: after a fork ``old``'s lock may be held."""
    new = threading.Event()
    if old.is_set():
        new.set()
    return new


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=run_fork_callbacks)
