"""Fingerprints, dedupe and admission (dedupe, then the bucket), driven by an injected clock."""

from __future__ import annotations

import sys
import tracemalloc
from typing import Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import FakeClock

from selfreport._admission.admission import LABEL_CHARS, Admission, Deduper, Fingerprint
from selfreport._admission.ratelimit import TokenBucket
from selfreport._core.counters import Counters
from selfreport._core.diag import Diagnostics


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


# --- Fingerprint -----------------------------------------------------------------------------


def test_fingerprint_is_logger_template_type_and_location() -> None:
    def fail(n: int) -> BaseException:
        return raised(ValueError(n))  # the same line for every value

    first, second = fail(1), fail(2)
    of = Fingerprint.of
    assert of("app", "t %s", first) == of("app", "t %s", second)
    assert of("app", "t %s", first) != of("other", "t %s", first)
    assert of("app", "t %s", first) != of("app", "t %s", raised(KeyError()))
    assert of("app", "a", None) == Fingerprint("app", "a")
    assert of(None, None, ValueError())[2:5] == (ValueError, "", 0)  # never raised
    assert type(of("app", "a", first)) is Fingerprint
    assert of("app", "a", first).filename == __file__


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is a builtin from 3.11")
def test_a_group_has_the_fingerprint_of_its_first_leaf() -> None:
    def key_error() -> BaseException:
        return raised(KeyError("k"))

    def type_error() -> BaseException:
        return raised(TypeError("t"))

    def group(*members: BaseException) -> BaseException:
        return raised(ExceptionGroup("g", list(members)))  # type: ignore[name-defined]  # noqa: F821

    of = Fingerprint.of
    # Every group is raised at this one line, as every TaskGroup's is in asyncio: two groups
    # of different failures are two errors, and a group of one failure is that failure.
    assert of(None, None, group(key_error())) != of(None, None, group(type_error()))
    assert of(None, None, group(key_error())) == of(None, None, key_error())
    assert of(None, None, group(group(type_error()), key_error())) == of(None, None, type_error())


def test_fingerprint_grouping_is_stable_and_bounded() -> None:
    exc = raised(ValueError("x"))
    fingerprint = Fingerprint.of("app.jobs", "job %s failed " + "x" * 10_000, exc)
    grouping = fingerprint.grouping()
    assert grouping[:2] == ["selfreport", "app.jobs"]
    assert grouping[2] == ("job %s failed " + "x" * 10_000)[:LABEL_CHARS]
    assert grouping[3] == "ValueError"
    # Module and function, not path and line: the same on every host, and across edits.
    assert grouping[4:] == [__name__, "raised"]
    assert all(isinstance(part, str) and len(part) <= LABEL_CHARS for part in grouping)
    # The label of a fingerprint groups like the fingerprint: what a summary carries.
    assert fingerprint.label().grouping() == grouping
    assert Fingerprint(None, "boom", level="warning").grouping() == [
        "selfreport",
        "",
        "boom",
        "warning",
    ]


def test_two_places_in_one_function_are_deduped_apart_and_grouped_together() -> None:
    def two_places(first: bool) -> None:
        if first:
            raise ValueError("a")
        raise ValueError("b")

    fingerprints = []
    for first in (True, False):
        try:
            two_places(first)
        except ValueError as error:
            fingerprints.append(Fingerprint.of(None, None, error))
    one, other = fingerprints
    assert one != other  # two lines: two fingerprints for dedupe
    assert one.grouping() == other.grouping()


def test_fingerprint_describe() -> None:
    exc = raised(ValueError("x"))
    line = exc.__traceback__.tb_lineno  # type: ignore[union-attr]
    fingerprint = Fingerprint.of("app", "boom %s", exc)
    assert fingerprint.describe() == f"ValueError at test_admission.py:{line} logged as 'boom %s'"
    assert Fingerprint.of(None, None, ValueError()).describe() == "ValueError"
    assert Fingerprint(None, "text", level="error").describe() == "'text'"
    assert Fingerprint(None, None).describe() == "an event"
    assert Fingerprint(None, "text").summary_text(3) == (
        "selfreport: 3 more occurrence(s) of 'text' were folded by dedupe and not sent"
    )


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
            fingerprint = Fingerprint(
                "app.jobs", f"{n:05d} {body}", ValueError, "app/jobs.py", 12, None, "app", "run"
            )
            dedupe.admit(fingerprint)
            dedupe.admit(fingerprint)  # a repeat, for the summary
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 10,000 distinct 100 KiB messages: about 1 GB when the texts were kept; now a 200-character
    # label, a digest and the bookkeeping per fingerprint.
    assert held < 6 * 1024 * 1024
    pending = dedupe.pending()
    assert len(pending) == 10_000
    label = next(iter(pending))
    assert isinstance(label, Fingerprint)
    assert label.template == f"00000 {body}"[:LABEL_CHARS]
    assert label.exc_type is ValueError


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


def test_dedupe_labels_a_fingerprint_as_a_fingerprint(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, clock=clock)
    fingerprint = Fingerprint("app", "m" * 1000)
    dedupe.admit(fingerprint)
    dedupe.admit(fingerprint)
    ((label, repeats),) = dedupe.pending().items()
    assert (label, repeats) == (Fingerprint("app", "m" * LABEL_CHARS), 1)
    assert type(label) is Fingerprint


# --- Admission -------------------------------------------------------------------------------


def make_admission(
    clock: FakeClock, rate: float = 1.0, burst: int = 2
) -> tuple[Admission, Counters]:
    counters = Counters(("dropped_rate_limited", "deduplicated"))
    admission = Admission(
        rate_limit=rate,
        rate_burst=burst,
        dedupe_window=60,
        count=counters.add,
        diagnostics=Diagnostics(),
    )
    admission.bucket = TokenBucket(rate, burst, clock=clock)
    admission.deduper = Deduper(60, clock=clock)
    return admission, counters


def test_admission_dedupes_before_the_bucket_and_counts_each_drop(clock: FakeClock) -> None:
    admission, counters = make_admission(clock)
    a, b, c = Fingerprint("app", "a"), Fingerprint("app", "b"), Fingerprint("app", "c")
    assert admission.admit(a) == 0
    assert admission.admit(a) is None  # a repeat: folded, takes no token
    assert admission.admit(b) == 0
    assert counters.snapshot() == {"dropped_rate_limited": 1, "deduplicated": 1}
    assert admission.admit(c) is None  # the bucket is empty
    assert counters.snapshot() == {"dropped_rate_limited": 2, "deduplicated": 1}
    clock.advance(1)
    assert admission.admit(c) == 0  # refused by the bucket, so not a first occurrence
    assert admission.pending() == {a: 1}


def test_admission_forget_and_fork(clock: FakeClock) -> None:
    admission, _ = make_admission(clock)
    fingerprint = Fingerprint("app", "a")
    assert admission.admit(fingerprint) == 0
    admission.forget(fingerprint, 0)  # dropped after all (the queue was full)
    admission.bucket._lock.acquire()  # as if another thread held them at fork time
    admission.deduper._lock.acquire()
    admission.reset_after_fork()
    assert admission.admit(fingerprint) == 0
    assert admission.dedupes


def storm_admit(admission: Admission, fingerprint: Fingerprint) -> Optional[int]:
    """The client's order (fold, then limited, then dedupe and take) for one event."""
    if admission.fold(fingerprint):
        return None
    if admission.limited():
        admission.drop_limited()
        return None
    return admission.admit(fingerprint)


@given(
    st.lists(
        st.tuples(st.sampled_from("abcd"), st.sampled_from((0.0, 0.3, 1.0, 30.0, 61.0))),
        max_size=80,
    )
)
def test_the_storm_shortcut_decides_and_counts_as_dedupe_then_take(
    events: list[tuple[str, float]],
) -> None:
    # Fails if fold() or drop_limited() decide, count or remember anything differently from
    # admit() (dedupe, then the bucket, then forget): the shortcut is only cheaper.
    slow_clock, fast_clock = FakeClock(), FakeClock()
    slow, slow_counts = make_admission(slow_clock)
    fast, fast_counts = make_admission(fast_clock)
    for name, step in events:
        slow_clock.advance(step)
        fast_clock.advance(step)
        fingerprint = Fingerprint("app", name)
        assert storm_admit(fast, fingerprint) == slow.admit(fingerprint)
        assert fast_counts.snapshot() == slow_counts.snapshot()
    assert fast.pending() == slow.pending()


def test_fold_labels_a_repeat_only_when_there_is_one(clock: FakeClock) -> None:
    dedupe = Deduper(window=60, clock=clock)
    long = "x" * (LABEL_CHARS * 3)
    assert not dedupe.fold(long)  # never seen: nothing remembered
    assert dedupe.pending() == {}
    assert dedupe.admit(long) == 0
    assert dedupe.fold(long)
    assert dedupe.pending() == {long[:LABEL_CHARS]: 1}
    clock.advance(61)
    assert not dedupe.fold(long)  # the window is over: the next one goes
    assert not Deduper(window=0, clock=clock).fold(long)  # dedupe off
