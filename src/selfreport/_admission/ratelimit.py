"""Token buckets, with an injectable clock."""

from __future__ import annotations

import threading
import time
from typing import Callable

__all__ = ["Clock", "TokenBucket"]

Clock = Callable[[], float]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; ``rate <= 0`` disables the limit."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._clock = clock
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take one token; False when the bucket is empty."""
        if self.rate <= 0:
            return True
        with self._lock:
            if self._refill() >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def empty(self) -> bool:
        """Whether :meth:`take` would fail now (taking nothing)."""
        if self.rate <= 0:
            return False
        with self._lock:  # the refill inline: this runs for every error of a storm
            now = self._clock()
            elapsed = now - self._stamp
            self._stamp = now
            if elapsed > 0:
                self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            return self._tokens < 1.0

    def _refill(self) -> float:
        now = self._clock()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        return self._tokens

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
