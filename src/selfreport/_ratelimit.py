"""Token buckets and per-fingerprint dedupe, with an injectable clock."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Callable, Optional

__all__ = ["Deduper", "TokenBucket"]

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


# Characters of each text in a fingerprint that dedupe keeps, to describe it in summaries.
LABEL_CHARS = 200


def _digest(fingerprint: object) -> int:
    """A fixed-size key for ``fingerprint``: dedupe remembers 10,000 of them, so never the
    texts themselves, which may be huge. Python's hash of the tuple: keyed SipHash for texts
    (unpredictable to whoever writes the messages), computed once per string and cached."""
    return hash(fingerprint)


def _label(fingerprint: object) -> object:
    """``fingerprint`` with every text cut to ``LABEL_CHARS``: enough to describe it."""
    if isinstance(fingerprint, str):
        return fingerprint[:LABEL_CHARS]
    if isinstance(fingerprint, tuple):
        return tuple(p[:LABEL_CHARS] if isinstance(p, str) else p for p in fingerprint)
    return fingerprint


class _Seen:
    __slots__ = ("first", "label", "repeats")

    def __init__(self, first: float, label: object) -> None:
        self.first = first
        self.label = label
        self.repeats = 0


class Deduper:
    """Sends the first event of a fingerprint, folds repeats within ``window`` seconds.

    :meth:`admit` returns ``None`` for a repeat (to be dropped) or the number of earlier repeats
    that the admitted event should carry. ``window <= 0`` disables dedupe. Memory is bounded in
    bytes, not only in keys: per fingerprint, a 64-bit digest and its texts cut to
    ``LABEL_CHARS`` characters (for the repeat summaries), however long the message was.
    """

    def __init__(self, window: float, max_keys: int = 10_000, clock: Clock = time.monotonic):
        self.window = float(window)
        self.max_keys = max_keys
        self._clock = clock
        self._seen: OrderedDict[int, _Seen] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, fingerprint: object) -> Optional[int]:
        if self.window <= 0:
            return 0
        key = _digest(fingerprint)
        with self._lock:
            now = self._clock()
            entry = self._seen.get(key)
            if entry is not None and now - entry.first < self.window:
                entry.repeats += 1
                return None
            carried = entry.repeats if entry is not None else 0
            self._seen[key] = _Seen(now, _label(fingerprint))
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return carried

    def forget(self, fingerprint: object, carried: int) -> None:
        """Undo :meth:`admit` for an event dropped after all (rate limit, full queue): the next
        occurrence is admitted as a first one and carries ``carried`` plus any repeats since."""
        if self.window <= 0:
            return
        key = _digest(fingerprint)
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                return
            entry.first = -math.inf
            entry.repeats += carried

    def pending(self) -> dict[object, int]:
        """Fingerprints (texts cut to ``LABEL_CHARS``) with repeats not yet carried by any
        event, and how many; clears them."""
        out: dict[object, int] = {}
        with self._lock:
            for seen in self._seen.values():
                if seen.repeats:
                    out[seen.label] = out.get(seen.label, 0) + seen.repeats
                    seen.repeats = 0
        return out

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
