"""Named counters: exact under concurrency, reentrant, and fresh after a reset."""

from __future__ import annotations

import threading

import pytest

from selfreport._core.counters import Counters


def test_counts_exactly_from_many_threads() -> None:
    counters = Counters(("sent", "dropped"))

    def bump() -> None:
        for _ in range(10_000):
            counters.add("sent")
        counters.add("dropped", 5)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters.snapshot() == {"sent": 40_000, "dropped": 20}


def test_snapshot_is_a_copy_and_unknown_keys_are_refused() -> None:
    counters = Counters(("sent",))
    snapshot = counters.snapshot()
    snapshot["sent"] = 99
    assert counters.snapshot() == {"sent": 0}
    with pytest.raises(KeyError):
        counters.add("typo")


def test_reset_zeroes_and_replaces_a_held_lock() -> None:
    counters = Counters(("sent",))
    counters.add("sent", 3)
    counters._lock.acquire()  # as a lock caught held by another thread at fork time would be
    counters.reset()
    counters.add("sent")  # would block for ever on the old lock
    assert counters.snapshot() == {"sent": 1}


def test_counting_is_reentrant_on_one_thread() -> None:
    counters = Counters(("sent",))
    with counters._lock:  # a signal handler interrupting a thread that is counting
        counters.add("sent")
    assert counters.snapshot() == {"sent": 1}
