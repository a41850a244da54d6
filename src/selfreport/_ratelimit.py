"""Token buckets and upstream (429) limits, with an injectable clock."""

from __future__ import annotations

import threading
import time
from email.utils import parsedate_to_datetime
from typing import Callable, Mapping, Optional

__all__ = ["Clock", "TokenBucket", "UpstreamLimits", "parse_retry_after"]

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
            now = self._clock()
            elapsed = now - self._stamp
            self._stamp = now
            if elapsed > 0:
                self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class UpstreamLimits:
    """Categories the upstream told us to hold back (429, ``X-Sentry-Rate-Limits``), until when."""

    DEFAULT_BACKOFF = 60.0
    MAX_BACKOFF = 3600.0

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}  # "" means every category

    def update(self, status: int, headers: Mapping[str, str]) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        now = self._clock()
        header = lowered.get("x-sentry-rate-limits")
        if header:
            for limit in header.split(","):
                fields = limit.strip().split(":")
                try:
                    seconds = min(float(fields[0]), self.MAX_BACKOFF)
                except ValueError:
                    continue
                categories = fields[1].split(";") if len(fields) > 1 and fields[1] else [""]
                for category in categories:
                    self._extend(category.strip(), now + seconds)
        elif status == 429:
            retry = parse_retry_after(lowered.get("retry-after"))
            seconds = self.DEFAULT_BACKOFF if retry is None else min(retry, self.MAX_BACKOFF)
            self._extend("", now + seconds)

    def _extend(self, category: str, until: float) -> None:
        if until > self._until.get(category, 0.0):
            self._until[category] = until

    def is_limited(self, category: str = "error") -> bool:
        if not self._until:
            return False
        now = self._clock()
        return self._until.get(category, 0.0) > now or self._until.get("", 0.0) > now

    def seconds_left(self, category: str = "error") -> float:
        now = self._clock()
        until = max(self._until.get(category, 0.0), self._until.get("", 0.0))
        return max(0.0, until - now)
