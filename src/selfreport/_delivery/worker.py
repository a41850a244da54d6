"""A bounded queue that never blocks the caller and one background thread that drains it."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Generic, Optional, TypeVar

from selfreport._core.guard import enter_thread_for_life

__all__ = ["ThreadOwner", "Worker"]


T = TypeVar("T")


class ThreadOwner:
    """One daemon thread running ``_run``, woken through ``_cond`` and told to stop by
    ``_stopping``: what the Worker and the spool's Replayer share."""

    name: str
    _cond: threading.Condition
    _thread: Optional[threading.Thread]
    _stopping: bool

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self) -> None:  # pragma: no cover - every owner defines it
        raise NotImplementedError

    def _start_thread(self) -> None:
        """Start the thread (``_cond`` held); RuntimeError at interpreter shutdown."""
        thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        thread.start()
        self._thread = thread

    def _signal_stop(self) -> Optional[threading.Thread]:
        """Tell the thread to stop; the thread to join, or None when there is none to join
        (never started, or the caller is that thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return None
        return thread


class Worker(ThreadOwner, Generic[T]):
    """Runs ``process(item)`` for each submitted item on one daemon thread, started lazily.

    The thread is part of the reporting path for its whole life. After a fork the child gets a
    fresh queue, fresh locks and no thread (one starts on the child's first submit), so it
    cannot deadlock on a lock some other parent thread held at fork time.
    """

    def __init__(
        self, process: Callable[[T], None], max_queue: int, name: str = "selfreport-worker"
    ) -> None:
        self._process = process
        self.max_queue = max_queue
        self.name = name
        self._reset()

    def _reset(self) -> None:
        self._items: deque[T] = deque()
        self._cond = threading.Condition(threading.Lock())
        # flush() waits for what was submitted before it, not for what keeps arriving after.
        self._submitted = 0  # items ever accepted
        self._finished = 0  # items processed or drained
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def reset_after_fork(self) -> None:
        self._reset()

    def qsize(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.max_queue

    def submit(self, item: T) -> bool:
        """Queue ``item``; False (at once, never blocking) when the queue is full or stopping."""
        with self._cond:
            if self._stopping or len(self._items) >= self.max_queue:
                return False
            if self._thread is None:
                try:
                    self._start_thread()
                except RuntimeError:  # no new threads at interpreter shutdown: drop, not raise
                    return False
            self._items.append(item)
            self._submitted += 1
            self._cond.notify()
        return True

    def _run(self) -> None:
        enter_thread_for_life()
        cond = self._cond
        while True:
            with cond:
                while not self._items and not self._stopping:
                    cond.wait()
                if not self._items:
                    return
                item = self._items.popleft()
            try:
                self._process(item)
            except BaseException:  # pragma: no cover - process() catches its own errors
                pass
            finally:
                with cond:
                    self._finished += 1
                    cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted before this call is processed; False on timeout.

        Called from the worker thread itself (a before_send that flushes) it cannot wait for
        itself, so it answers at once whether the queue was already done.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            target = self._submitted
            if self._finished < target and self._thread is threading.current_thread():
                return False
            return self._cond.wait_for(
                lambda: self._finished >= target, max(0.0, deadline - time.monotonic())
            )

    def stop(self, timeout: float) -> bool:
        """Stop accepting, let the thread finish what is queued within ``timeout``."""
        deadline = time.monotonic() + max(0.0, timeout)
        thread = self._signal_stop()
        if thread is None:
            return True
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    def drain(self) -> list[T]:
        """Remove and return whatever is still queued (after a stop that timed out)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._finished += len(items)
            self._cond.notify_all()
            return items
