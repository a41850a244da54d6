"""The bounded queue and its one background thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Callable, Optional

import pytest

from selfreport._core.guard import is_reporting
from selfreport._delivery.worker import Worker


class Recorder:
    """A process() that records items and can be held at a gate."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.threads: set[str] = set()
        self.reporting: list[bool] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, item: int) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.items.append(item)
        self.threads.add(threading.current_thread().name)
        self.reporting.append(is_reporting())


class AnnouncingCondition(threading.Condition):
    """A condition that sets ``waiting`` when ``thread`` starts waiting on it."""

    def __init__(self, thread: threading.Thread) -> None:
        super().__init__(threading.Lock())
        self.thread = thread
        self.waiting = threading.Event()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if threading.current_thread() is self.thread:
            self.waiting.set()  # the lock is still held: whoever acts on this waits for wait()
        return super().wait(timeout)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_worker() -> Iterator[Callable[..., Worker[int]]]:
    workers: list[Worker[int]] = []

    def factory(process: Callable[[int], None], max_queue: int = 100) -> Worker[int]:
        workers.append(Worker(process, max_queue))
        return workers[-1]

    yield factory
    for worker in workers:
        worker.stop(5)


def test_processes_in_order_on_one_reporting_daemon_thread(
    recorder: Recorder, make_worker: Callable[..., Worker[int]]
) -> None:
    worker = make_worker(recorder)
    assert not worker.alive  # started lazily
    for n in range(20):
        assert worker.submit(n)
    assert worker.flush(5)
    assert recorder.items == list(range(20))
    assert recorder.threads == {"selfreport-worker"}
    assert all(recorder.reporting)  # the thread is reporting path for its whole life
    assert worker.alive
    assert worker._thread is not None
    assert worker._thread.daemon
    assert not is_reporting()  # ... and only that thread


def test_full_queue_refuses_at_once(
    recorder: Recorder, make_worker: Callable[..., Worker[int]]
) -> None:
    recorder.gate.clear()
    worker = make_worker(recorder, max_queue=3)
    worker.submit(0)
    assert recorder.entered.wait(5)  # item 0 is being processed, off the queue
    assert [worker.submit(n) for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert worker.full()
    assert worker.qsize() == 3
    recorder.gate.set()
    assert worker.flush(5)
    assert recorder.items == [0, 1, 2, 3]
    assert not worker.full()


def test_flush_times_out_while_the_worker_is_busy(
    recorder: Recorder, make_worker: Callable[..., Worker[int]]
) -> None:
    recorder.gate.clear()
    worker = make_worker(recorder)
    worker.submit(1)
    assert not worker.flush(0.05)
    recorder.gate.set()
    assert worker.flush(5)


def test_flush_with_nothing_submitted_is_immediate(
    recorder: Recorder, make_worker: Callable[..., Worker[int]]
) -> None:
    worker = make_worker(recorder)
    assert worker.flush(0)
    assert not worker.alive


def test_flush_does_not_wait_for_items_submitted_after_it(
    make_worker: Callable[..., Worker[int]],
) -> None:
    gates = {n: threading.Event() for n in range(4)}
    done: list[int] = []

    def process(item: int) -> None:
        gates[item].wait(10)
        done.append(item)

    worker = make_worker(process)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(worker.flush(10)))
    worker._cond = cond = AnnouncingCondition(flusher)  # before the worker thread takes it
    worker.submit(0)
    worker.submit(1)
    flusher.start()
    assert cond.waiting.wait(10)  # flush() took its target under the lock and waits
    worker.submit(2)  # arrives while flush() waits: flush() must not wait for it
    worker.submit(3)
    gates[0].set()
    gates[1].set()
    flusher.join(5)
    assert result == [True]
    assert done == [0, 1]
    gates[2].set()
    gates[3].set()
    assert worker.flush(5)


def test_flush_from_the_worker_thread_does_not_deadlock(
    make_worker: Callable[..., Worker[int]],
) -> None:
    results: list[bool] = []
    worker: Worker[int]

    def process(item: int) -> None:
        results.append(worker.flush(10))

    worker = make_worker(process)
    worker.submit(1)
    assert worker.flush(5)
    assert results == [False]  # it cannot wait for itself, and it says it is not done


def test_a_failing_process_does_not_kill_the_thread(
    make_worker: Callable[..., Worker[int]],
) -> None:
    seen: list[int] = []

    def process(item: int) -> None:
        seen.append(item)
        if item == 0:
            raise RuntimeError("process should never raise, but if it does")

    worker = make_worker(process)
    worker.submit(0)
    worker.submit(1)
    assert worker.flush(5)
    assert seen == [0, 1]


def test_stop_finishes_the_queue_then_refuses(
    recorder: Recorder, make_worker: Callable[..., Worker[int]]
) -> None:
    worker = make_worker(recorder)
    for n in range(5):
        worker.submit(n)
    assert worker.stop(5)
    assert recorder.items == list(range(5))
    assert not worker.alive
    assert not worker.submit(99)
    assert worker.drain() == []


def test_stop_times_out_and_drain_returns_the_rest(
    recorder: Recorder, make_worker: Callable[..., Worker[int]]
) -> None:
    recorder.gate.clear()
    worker = make_worker(recorder)
    for n in range(3):
        worker.submit(n)
    assert recorder.entered.wait(5)
    assert not worker.stop(0.05)
    assert worker.drain() == [1, 2]
    assert worker.qsize() == 0
    recorder.gate.set()
    assert worker.flush(5)  # drained items count as finished
    assert recorder.items == [0]


def test_stop_without_a_thread_and_from_the_worker_itself(
    make_worker: Callable[..., Worker[int]],
) -> None:
    assert make_worker(lambda item: None).stop(0)
    stopped: list[bool] = []
    worker: Worker[int]

    def process(item: int) -> None:
        stopped.append(worker.stop(10))

    worker = make_worker(process)
    worker.submit(1)
    assert worker.flush(5)
    assert stopped == [True]


def test_submit_never_raises_when_no_thread_can_start(
    recorder: Recorder, make_worker: Callable[..., Worker[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_worker(recorder)

    def cannot_start() -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(worker, "_start_thread", cannot_start)
    assert not worker.submit(1)
    assert worker.qsize() == 0
    assert worker.flush(0)  # the refused item is not waited for
    monkeypatch.undo()
    assert worker.submit(2)
    assert worker.flush(5)
    assert recorder.items == [2]


def test_reset_after_fork_gives_a_fresh_queue(
    recorder: Recorder, make_worker: Callable[..., Worker[int]]
) -> None:
    worker = make_worker(recorder)
    worker.submit(1)
    assert worker.stop(5)
    worker.reset_after_fork()
    assert not worker.alive
    assert worker.qsize() == 0
    assert worker.submit(2)  # a new thread, a new queue
    assert worker.flush(5)
    assert recorder.items == [1, 2]
