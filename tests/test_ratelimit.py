"""Token bucket and upstream limits, driven by an injected clock."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfreport._ratelimit import (
    TokenBucket,
    UpstreamLimits,
    parse_retry_after,
)

from .conftest import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- TokenBucket -----------------------------------------------------------------------------


def test_bucket_allows_burst_then_refills_at_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.25)  # half a token
    assert not bucket.take()
    clock.advance(0.25)
    assert bucket.take()
    assert not bucket.take()


def test_bucket_never_holds_more_than_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=100.0, burst=2, clock=clock)
    clock.advance(3600)
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_bucket_rate_zero_disables_the_limit(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=0, burst=1, clock=clock)
    assert all(bucket.take() for _ in range(1000))


def test_bucket_burst_is_at_least_one(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1.0, burst=0, clock=clock)
    assert bucket.burst == 1
    assert bucket.take()
    assert not bucket.take()


def test_bucket_ignores_a_clock_going_backwards(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.take()
    clock.advance(-10)
    assert not bucket.take()
    clock.advance(1.0)
    assert bucket.take()


def test_bucket_is_thread_safe(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1.0, burst=500, clock=clock)
    taken: list[bool] = []
    lock = threading.Lock()

    def take_many() -> None:
        mine = [bucket.take() for _ in range(200)]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=take_many) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(taken) == 500


@given(st.lists(st.floats(min_value=0, max_value=5), max_size=50))
def test_bucket_never_exceeds_burst_plus_refill(steps: list[float]) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=3.0, burst=4, clock=clock)
    granted = 0
    for step in steps:
        clock.advance(step)
        granted += bucket.take()
    assert granted <= 4 + 3.0 * sum(steps) + 1e-6


def test_bucket_reset_after_fork_gives_a_fresh_lock(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    bucket._lock.acquire()  # as if another thread held it at fork time
    bucket.reset_after_fork()
    assert bucket.take()


# --- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("Mon, 99 Foo 2024 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    when = datetime(2030, 1, 1, 0, 1, 0, tzinfo=timezone.utc)
    now = datetime(2030, 1, 1, 0, 0, 0, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after(format_datetime(when, usegmt=True), now=now) == 60.0
    assert parse_retry_after(format_datetime(when, usegmt=True), now=now + 3600) == 0.0


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, now=0.0)
    assert result is None or result >= 0.0


# --- UpstreamLimits --------------------------------------------------------------------------


def test_no_limits_by_default(clock: FakeClock) -> None:
    limits = UpstreamLimits(clock)
    assert not limits.is_limited()
    assert limits.seconds_left() == 0.0


def test_429_with_retry_after(clock: FakeClock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(429, {"Retry-After": "30"})
    assert limits.is_limited("error")
    assert limits.is_limited("transaction")  # no categories: everything waits
    assert limits.seconds_left() == 30.0
    clock.advance(30)
    assert not limits.is_limited()


def test_429_without_retry_after_backs_off_a_default(clock: FakeClock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(429, {})
    assert limits.seconds_left() == UpstreamLimits.DEFAULT_BACKOFF


def test_retry_after_is_capped(clock: FakeClock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(429, {"retry-after": "999999"})
    assert limits.seconds_left() == UpstreamLimits.MAX_BACKOFF


def test_sentry_rate_limits_header_by_category(clock: FakeClock) -> None:
    limits = UpstreamLimits(clock)
    header = "60:transaction;session:organization, 10:error:project:quota_exceeded, junk:error"
    limits.update(429, {"X-Sentry-Rate-Limits": header, "Retry-After": "999"})
    assert limits.seconds_left("error") == 10.0  # the specific header wins over Retry-After
    assert limits.seconds_left("transaction") == 60.0
    assert not limits.is_limited("attachment")
    clock.advance(10)
    assert not limits.is_limited("error")
    assert limits.is_limited("transaction")


def test_sentry_rate_limits_without_categories_limit_everything(clock: FakeClock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(200, {"x-sentry-rate-limits": "5::organization"})
    assert limits.is_limited("error")
    assert limits.seconds_left("anything") == 5.0


def test_shorter_limit_never_shortens_a_longer_one(clock: FakeClock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(429, {"Retry-After": "60"})
    limits.update(429, {"Retry-After": "1"})
    assert limits.seconds_left() == 60.0


def test_other_statuses_without_header_change_nothing(clock: FakeClock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(500, {"Retry-After": "60"})
    limits.update(200, {})
    assert not limits.is_limited()


@given(st.text(max_size=60))
def test_rate_limits_header_never_raises(header: str) -> None:
    limits = UpstreamLimits(FakeClock())
    limits.update(429, {"X-Sentry-Rate-Limits": header})
    assert 0.0 <= limits.seconds_left() <= UpstreamLimits.MAX_BACKOFF
