"""Named integer counters behind ``stats()``, safe from any thread and across forks."""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["Counters"]


class Counters:
    """A fixed set of named counters; :meth:`snapshot` copies them consistently."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(keys)
        self.reset()

    def reset(self) -> None:
        """Zero everything, with a fresh lock (after a fork the old one may be held)."""
        # Reentrant: a signal handler or finalizer may count on a thread that is counting.
        self._lock = threading.RLock()
        self._values = dict.fromkeys(self._keys, 0)

    def add(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._values[key] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
