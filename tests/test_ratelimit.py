"""Token bucket and dedupe, driven by an injected clock."""

from __future__ import annotations

import threading
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfreport._ratelimit import LABEL_CHARS, Deduper, TokenBucket


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


# --- Deduper ---------------------------------------------------------------------------------


def test_dedupe_sends_first_and_counts_repeats_within_window(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, clock=clock)
    assert dedupe.admit("a") == 0
    assert dedupe.admit("a") is None
    assert dedupe.admit("a") is None
    assert dedupe.admit("b") == 0  # another fingerprint is independent
    clock.advance(60)
    assert dedupe.admit("a") == 2  # the next event after the window carries the repeats
    assert dedupe.admit("a") is None


def test_dedupe_window_counts_from_the_first_occurrence(clock: FakeClock) -> None:
    dedupe = Deduper(window=10, clock=clock)
    assert dedupe.admit("a") == 0
    results = []
    for _ in range(5):
        clock.advance(3)
        results.append(dedupe.admit("a"))
    # A constant trickle still gets one event per window through, carrying the repeats.
    assert results == [None, None, None, 3, None]
    assert dedupe.pending() == {"a": 1}


def test_dedupe_disabled_with_window_zero(clock: FakeClock) -> None:
    dedupe = Deduper(window=0, clock=clock)
    assert [dedupe.admit("a") for _ in range(3)] == [0, 0, 0]
    assert dedupe.pending() == {}


def test_dedupe_pending_reports_and_clears(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, clock=clock)
    dedupe.admit("a")
    dedupe.admit("a")
    dedupe.admit("b")
    assert dedupe.pending() == {"a": 1}
    assert dedupe.pending() == {}
    clock.advance(61)
    assert dedupe.admit("a") == 0  # already reported by pending(): not carried twice


def test_dedupe_memory_is_bounded_in_bytes_not_only_in_keys(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, clock=clock)
    body = "x" * (100 * 1024)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(10_000):
            fingerprint = ("app.jobs", f"{n:05d} {body}", ValueError, "app/jobs.py", 12)
            dedupe.admit(fingerprint)
            dedupe.admit(fingerprint)  # a repeat, for the summary
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 10,000 distinct 100 KiB messages: about 1 GB when the texts were kept.
    assert held < 5 * 1024 * 1024
    pending = dedupe.pending()
    assert len(pending) == 10_000
    label = next(iter(pending))
    assert isinstance(label, tuple)
    assert label[1] == f"00000 {body}"[:LABEL_CHARS]
    assert label[2] is ValueError


def test_dedupe_tells_long_fingerprints_apart_by_digest(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, clock=clock)
    common = "y" * 10_000
    assert dedupe.admit(("app", common + "a")) == 0
    assert dedupe.admit(("app", common + "b")) == 0  # same first 200 characters: still another
    assert dedupe.admit(("app", common + "a")) is None
    assert dedupe.admit("a") == 0
    assert dedupe.admit(("a",)) == 0  # a tuple is not its only element
    assert dedupe.pending() == {("app", common[:LABEL_CHARS]): 1}


def test_dedupe_forget_lets_the_next_occurrence_through_with_the_count(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, clock=clock)
    dedupe.admit("a")
    dedupe.admit("a")
    clock.advance(61)
    carried = dedupe.admit("a")
    assert carried == 1
    dedupe.forget("a", carried)  # that event was dropped after all (rate limit)
    assert dedupe.admit("a") == 1  # so the next one is sent, carrying the count
    dedupe.forget("unknown", 5)  # never admitted: nothing to undo
    assert dedupe.admit("unknown") == 0


def test_dedupe_forget_is_a_no_op_when_disabled(clock: FakeClock) -> None:
    dedupe = Deduper(window=0, clock=clock)
    dedupe.forget("a", 3)
    assert dedupe.admit("a") == 0


def test_dedupe_keeps_at_most_max_keys(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, max_keys=3, clock=clock)
    for key in "abcd":
        assert dedupe.admit(key) == 0
    assert len(dedupe._seen) == 3
    assert dedupe.admit("a") == 0  # evicted as the oldest, so admitted again
    assert dedupe.admit("d") is None


def test_dedupe_reset_after_fork(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, clock=clock)
    dedupe._lock.acquire()
    dedupe.reset_after_fork()
    assert dedupe.admit("a") == 0
