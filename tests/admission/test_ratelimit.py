"""Token bucket, driven by an injected clock."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import FakeClock

from selfreport._admission.ratelimit import TokenBucket


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


@given(st.lists(st.tuples(st.floats(min_value=0, max_value=2), st.booleans()), max_size=60))
def test_empty_says_whether_take_would_fail_and_takes_nothing(
    steps: list[tuple[float, bool]],
) -> None:
    clock, twin_clock = FakeClock(), FakeClock()
    bucket = TokenBucket(rate=1.5, burst=3, clock=clock)
    twin = TokenBucket(rate=1.5, burst=3, clock=twin_clock)  # never asked empty()
    for step, ask in steps:
        clock.advance(step)
        twin_clock.advance(step)
        if ask:
            empty = bucket.empty()
            assert bucket.empty() is empty  # asking twice changes nothing
            assert bucket.take() is (not empty)
        else:
            assert bucket.take() is twin.take()
            continue
        assert twin.take() is (not empty)


def test_empty_is_never_true_without_a_limit(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=0, burst=1, clock=clock)
    assert not any(bucket.empty() or not bucket.take() for _ in range(1000))
