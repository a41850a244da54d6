"""One reading of the upstream's answers and one retry policy, for every sender of envelopes."""

from __future__ import annotations

import enum
import math
import random
import time
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Mapping, Optional

from selfreport._core.options import check_number

__all__ = [
    "MAX_BACKOFF",
    "MAX_REPLAY_BACKOFF",
    "MAX_REPLAY_FIRST_BACKOFF",
    "MAX_RETRIES",
    "REPLAY_ATTEMPTS",
    "RETRY_AFTER_MAX",
    "Outcome",
    "Retry",
    "UpstreamLimits",
    "classify",
    "parse_rate_limits",
    "parse_retry_after",
]

Clock = Callable[[], float]

# Bounds of the options (documented in docs/configuration.md).
MAX_RETRIES = 10  # max_retries
MAX_BACKOFF = 30.0  # retry_backoff, and the longest a delivery ever waits before retrying
MAX_REPLAY_FIRST_BACKOFF = 60.0  # replay_backoff
MAX_REPLAY_BACKOFF = 3600.0  # replay_max_backoff
REPLAY_ATTEMPTS = 5  # 5xx answers to one spooled envelope before it is quarantined

# The longest an upstream can make us hold back (Retry-After, X-Sentry-Rate-Limits), and what a
# 429 that does not say how long means (as sentry-python does).
RETRY_AFTER_MAX = 3600.0
DEFAULT_RETRY_AFTER = 60.0
# Statuses whose Retry-After means "unavailable until then" (RFC 9110 15.6.4, RFC 6585 4).
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# Categories remembered at most: an upstream's headers cannot grow the table without bound.
_MAX_CATEGORIES = 64
_MAX_CATEGORY_CHARS = 64


class Outcome(enum.Enum):
    """What became of one try to send an envelope (see :func:`classify`)."""

    SENT = "sent"  # 2xx: taken
    RATE_LIMITED = "rate_limited"  # 429: the upstream wants us to wait, not this envelope's fault
    REFUSED = "refused"  # any other status below 500: refused for good, never retried
    FAILED = "failed"  # 5xx: failed this time; retried a bounded number of times
    UNREACHABLE = "unreachable"  # no answer: connection refused or reset, timeout, bad HTTP


_RETRIED = frozenset({Outcome.FAILED, Outcome.UNREACHABLE})


def classify(status: Optional[int]) -> Outcome:
    """The outcome of an answer with HTTP ``status`` (None: there was no answer).

    Senders read answers through :meth:`UpstreamLimits.answer`, which also records what the
    headers say about waiting, whatever the status.
    """
    if status is None:
        return Outcome.UNREACHABLE
    if 200 <= status < 300:
        return Outcome.SENT
    if status == 429:
        return Outcome.RATE_LIMITED
    if status >= 500:
        return Outcome.FAILED
    return Outcome.REFUSED  # 1xx and 3xx too: the envelope endpoint never redirects


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None.

    Never negative, never more than ``RETRY_AFTER_MAX``; None for anything unreadable.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError, OSError):
            return None
        seconds = when - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX)


def parse_rate_limits(value: Optional[str]) -> list[tuple[float, tuple[str, ...]]]:
    """``X-Sentry-Rate-Limits`` as (seconds, categories) pairs; no categories: all of them.

    Each comma-separated limit is ``seconds:categories:scope:reason_code:namespaces`` with
    categories separated by ``;``. The scope (organization, project, key) and the reason only
    say why: every limit applies to this sender. Limits that cannot be read are skipped.
    """
    limits: list[tuple[float, tuple[str, ...]]] = []
    for limit in (value or "").split(","):
        fields = limit.strip().split(":")
        try:
            seconds = float(fields[0])
        except ValueError:
            continue
        if math.isnan(seconds):
            continue
        names = fields[1].split(";") if len(fields) > 1 else []
        categories = tuple(name.strip() for name in names if name.strip())
        limits.append((min(max(0.0, seconds), RETRY_AFTER_MAX), categories))
    return limits


class UpstreamLimits:
    """Categories the upstream told us to hold back, and until when (one per upstream, shared by
    its delivery and its replay): from ``X-Sentry-Rate-Limits`` on any answer, accepted ones
    included, and from ``Retry-After`` on a 429 or 503."""

    DEFAULT_BACKOFF = DEFAULT_RETRY_AFTER
    MAX_BACKOFF = RETRY_AFTER_MAX

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}  # "" means every category

    def answer(self, status: int, headers: Mapping[str, str]) -> Outcome:
        """Record what an answer says about waiting, and classify it: every sender reads the
        upstream's answers through here, so none can skip the headers."""
        self.update(status, headers)
        return classify(status)

    def update(self, status: int, headers: Mapping[str, str]) -> None:
        lowered = {str(k).lower(): v for k, v in headers.items()}
        now = self._clock()
        header = lowered.get("x-sentry-rate-limits")
        if header:  # the specific header wins over Retry-After, as in sentry-python
            for seconds, categories in parse_rate_limits(header):
                for category in categories or ("",):
                    self._extend(category, now + seconds)
        elif status in _RETRY_AFTER_STATUSES:
            asked = parse_retry_after(lowered.get("retry-after"))
            if asked is None and status == 429:
                asked = DEFAULT_RETRY_AFTER
            if asked is not None:
                self._extend("", now + asked)

    def _extend(self, category: str, until: float) -> None:
        if len(category) > _MAX_CATEGORY_CHARS:
            return
        if category not in self._until and len(self._until) >= _MAX_CATEGORIES:
            return
        if until > self._until.get(category, 0.0):
            self._until[category] = until

    def is_limited(self, category: str = "error") -> bool:
        return self.seconds_left(category) > 0.0

    def seconds_left(self, category: str = "error") -> float:
        if not self._until:
            return 0.0
        until = max(self._until.get(category, 0.0), self._until.get("", 0.0))
        return max(0.0, until - self._clock())


@dataclass(frozen=True)
class Retry:
    """How one sender retries, in the manner of urllib3's ``Retry``: a value never changed,
    only replaced by :meth:`increment` as failures add up.

    ``total``: retries after the first try (None: no end).
    ``backoff_factor``: the wait after the first failure, doubled after each further one up to
    ``backoff_max``, and jittered (up to ``jitter`` of it taken off at random) so that many
    senders do not retry in step. An upstream asking for longer (``Retry-After``,
    ``X-Sentry-Rate-Limits``) is waited for, up to ``retry_after_max``: past that,
    :meth:`is_retry` says not to wait at all. ``attempts``: the failures so far.
    """

    total: Optional[int] = 3
    backoff_factor: float = 0.5
    backoff_max: float = MAX_BACKOFF
    retry_after_max: float = MAX_BACKOFF
    jitter: float = 0.5
    attempts: int = 0

    @classmethod
    def for_delivery(cls, max_retries: int, retry_backoff: float) -> Retry:
        """The policy of the ``max_retries`` and ``retry_backoff`` options, which are checked
        (:class:`~selfreport.ConfigError` naming the option)."""
        check_number("max_retries", max_retries, 0, MAX_RETRIES, integer=True)
        check_number("retry_backoff", retry_backoff, 0.0, MAX_BACKOFF)
        return cls(total=max_retries, backoff_factor=float(retry_backoff))

    @classmethod
    def for_replay(
        cls, backoff: float = 1.0, max_backoff: float = 60.0, attempts: int = REPLAY_ATTEMPTS
    ) -> Retry:
        """The policy of a spool's replay, from the ``replay_backoff`` and
        ``replay_max_backoff`` options (checked): rounds back off without end, each envelope
        gets ``attempts`` tries that fail with a 5xx, and a ``Retry-After`` is always obeyed."""
        check_number("replay_backoff", backoff, 0.001, MAX_REPLAY_FIRST_BACKOFF)
        check_number("replay_max_backoff", max_backoff, 0.001, MAX_REPLAY_BACKOFF)
        return cls(
            total=attempts - 1,
            backoff_factor=float(backoff),
            backoff_max=float(max_backoff),
            retry_after_max=RETRY_AFTER_MAX,
        )

    def new(self, **changes: Any) -> Retry:
        """A copy with ``changes`` (``total=0`` for a sender whose spool does the retrying)."""
        return replace(self, **changes)

    def increment(self) -> Retry:
        """The policy after one more failure."""
        return replace(self, attempts=self.attempts + 1)

    def is_exhausted(self) -> bool:
        """Whether every retry was used."""
        return self.total is not None and self.attempts > self.total

    def is_retry(self, outcome: Outcome, retry_after: float = 0.0) -> bool:
        """Whether to try again after ``outcome``: only a failure or no answer, while retries
        are left, and unless the upstream asks us to wait longer than ``retry_after_max``."""
        if outcome not in _RETRIED or retry_after > self.retry_after_max:
            return False
        return self.total is None or self.attempts < self.total

    def get_backoff_time(self) -> float:
        """The backoff after ``attempts`` failures, before jitter: 0 before the first one."""
        if self.attempts <= 0:
            return 0.0
        doublings = min(self.attempts - 1, 64)  # 2**64 times any factor is past any cap
        return min(self.backoff_max, self.backoff_factor * 2.0**doublings)

    def get_sleep_time(
        self, retry_after: float = 0.0, rand: Callable[[], float] = random.random
    ) -> float:
        """Seconds to wait before the next try: the jittered backoff, or what the upstream
        asked for (up to ``retry_after_max``) if that is longer."""
        backoff = self.get_backoff_time() * (1.0 - self.jitter * rand())
        return max(backoff, min(retry_after, self.retry_after_max))
