"""Whole-process lifecycle: subprocesses, exit, fork, re-init and bounded shutdown."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import selfreport
from selfreport.testing import FakeCollector

log = logging.getLogger("app")

pytestmark = pytest.mark.filterwarnings(
    # Python 3.12+ warns about fork() in a process with threads; forking is the point here.
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def run_python(code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_uncaught_exception_in_subprocess_arrives_once_and_traceback_is_printed(
    collector: FakeCollector,
) -> None:
    result = run_python(
        """
        import sys, selfreport
        selfreport.init(sys.argv[1])
        def main():
            raise RuntimeError("uncaught in a subprocess")
        main()
        """,
        collector.dsn,
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: uncaught in a subprocess" in result.stderr
    # The process has exited: all it sent was answered, so recorded (before the answer).
    assert len(collector.events) == 1
    value = collector.events[0]["exception"]["values"][-1]
    assert value["type"] == "RuntimeError"
    assert value["mechanism"] == {"type": "excepthook", "handled": False}
    assert value["stacktrace"]["frames"][-1]["function"] == "main"


@pytest.mark.slow
def test_subprocess_exit_is_bounded_against_a_blackholed_upstream(
    collector: FakeCollector,
) -> None:
    collector.blackhole = True
    started = time.monotonic()
    result = run_python(
        """
        import sys, selfreport
        selfreport.init(sys.argv[1], shutdown_timeout=1.0, http_timeout=30.0)
        raise RuntimeError("the upstream will never answer this")
        """,
        collector.dsn,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "RuntimeError: the upstream will never answer this" in result.stderr
    assert len(collector.requests) == 1  # it was trying to send, not hanging elsewhere
    assert elapsed < 1.0 + 5.0  # shutdown_timeout plus interpreter start-up, not 30 s


def test_close_is_bounded_against_a_blackholed_upstream(collector: FakeCollector) -> None:
    collector.blackhole = True
    selfreport.init(collector.dsn, http_timeout=30.0, dedupe_window=0)
    for i in range(20):
        log.error("queued %d", i)
    started = time.monotonic()
    selfreport.close(timeout=0.5)
    assert time.monotonic() - started < 2.0
    # Nothing was silently lost: everything not sent is counted.
    assert collector.requests  # the worker was blocked on a real request
    assert selfreport.stats() == dict.fromkeys(selfreport.stats(), 0)  # closed: fresh zeros


def test_close_accounts_for_undelivered_events(collector: FakeCollector) -> None:
    collector.blackhole = True
    client = selfreport.init(collector.dsn, http_timeout=30.0, dedupe_window=0)
    for i in range(20):
        log.error("queued %d", i)
    client.close(timeout=0.5)
    stats = client.stats()
    assert stats["captured"] == 20
    assert stats["sent"] == 0
    assert stats["dropped_closed"] + stats["send_failed"] == 20


def test_second_init_replaces_the_first_without_doubling(collector: FakeCollector) -> None:
    root = logging.getLogger()
    first = selfreport.init(collector.dsn)
    hook = sys.excepthook
    second = selfreport.init(collector.dsn)
    handlers = [h for h in root.handlers if isinstance(h, selfreport.LoggingHandler)]
    assert len(handlers) == 1
    assert sys.excepthook is hook or sys.excepthook == hook
    assert first._closed.is_set()
    log.error("reported once")
    assert selfreport.flush(5.0)  # delivered: all that comes has come
    assert len(collector.events) == 1
    assert second.stats()["sent"] == 1


def test_close_removes_handler_and_restores_hooks(collector: FakeCollector) -> None:
    before = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    selfreport.init(collector.dsn)
    assert sys.excepthook != before[0]
    selfreport.close()
    assert (sys.excepthook, threading.excepthook, sys.unraisablehook) == before
    root = logging.getLogger()
    assert not [h for h in root.handlers if isinstance(h, selfreport.LoggingHandler)]
    assert threading.Thread.start.__class__.__name__ == "function"


# The fork scenarios run in a fresh interpreter: a coverage tracer in this one holds a lock of
# its own that a fork can catch held by another thread, which would hang the child in coverage.
FORK_PRELUDE = """
import logging, os, sys, threading, time
import selfreport

def wait_child(pid, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hung"

# Only selfreport's handler: other handlers' stream locks are a CPython fork hazard of their own.
log = logging.getLogger("isolated")
log.propagate = False
log.addHandler(selfreport.LoggingHandler())
"""


def run_fork_scenario(code: str, dsn: str) -> list[str]:
    result = run_python(FORK_PRELUDE + textwrap.dedent(code), dsn, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_reports_through_its_own_worker(collector: FakeCollector) -> None:
    codes = run_fork_scenario(
        """
        selfreport.init(sys.argv[1])
        log.error("from the parent")
        selfreport.flush(5.0)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log.error("from the child")
                code = 0 if selfreport.flush(5.0) and selfreport.stats()["sent"] == 1 else 3
            finally:
                os._exit(code)
        print(wait_child(pid))
        selfreport.close()
        """,
        collector.dsn,
    )
    assert codes == ["0"]
    assert collector.wait_for(2)
    messages = sorted(e["logentry"]["message"] for e in collector.events)
    assert messages == ["from the child", "from the parent"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_other_threads_hammer_the_queue_never_deadlocks(
    collector: FakeCollector,
) -> None:
    codes = run_fork_scenario(
        """
        selfreport.init(sys.argv[1], rate_limit=0, dedupe_window=0, max_queue=50)
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                log.error("hammering from a thread")

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for thread in threads:
            thread.start()
        for _ in range(10):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    log.error("child after fork")
                    code = 0 if selfreport.flush(5.0) else 4
                finally:
                    os._exit(code)
            print(wait_child(pid))
        stop.set()
        for thread in threads:
            thread.join()
        selfreport.close(timeout=5.0)
        """,
        collector.dsn,
    )
    assert codes == ["0"] * 10
    children = [e for e in collector.events if e["logentry"]["message"] == "child after fork"]
    assert len(children) == 10


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_child_forked_inside_the_reporting_path_stays_in_it(collector: FakeCollector) -> None:
    codes = run_fork_scenario(
        """
        selfreport.init(sys.argv[1])
        with selfreport.reporting_path():
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    log.error("from a child forked inside the reporting path")
                    selfreport.flush(2.0)
                    code = 0 if selfreport.stats()["dropped_reentrant"] == 1 else 5
                finally:
                    os._exit(code)
        print(wait_child(pid))
        selfreport.close()
        """,
        collector.dsn,
    )
    assert codes == ["0"]
    # Both processes have exited: anything they sent was recorded before its answer.
    assert collector.events == []


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_close_in_a_forked_child_wakes_a_delivery_waiting_to_retry() -> None:
    with socket.socket() as sock:  # a port nobody listens on: every send is refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://key@127.0.0.1:{sock.getsockname()[1]}/1"
    codes = run_fork_scenario(
        """
        selfreport.init(sys.argv[1], retry_backoff=5.0, max_retries=3, shutdown_timeout=3.0)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log.error("from the child")
                deadline = time.monotonic() + 10
                while selfreport.stats()["retried"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)  # until the first send failed: then it waits 5 s to retry
                started = time.monotonic()
                selfreport.close()
                quick = time.monotonic() - started < 1.5
                code = 0 if quick and selfreport.stats() is not None else 6
            finally:
                os._exit(code)
        print(wait_child(pid))
        selfreport.close(timeout=0.5)
        """,
        dead,
    )
    assert codes == ["0"]


@pytest.mark.slow
def test_a_signal_handler_that_logs_while_the_caller_is_reporting_never_deadlocks(
    collector: FakeCollector,
) -> None:
    result = run_python(
        """
        import logging, signal, sys, selfreport
        selfreport.init(sys.argv[1], rate_limit=0, dedupe_window=0)
        log = logging.getLogger("app")
        log.propagate = False
        log.addHandler(selfreport.LoggingHandler())
        signal.signal(signal.SIGALRM, lambda *_: log.error("from a signal handler"))
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        for i in range(20000):
            selfreport.capture_message(f"from the main loop {i % 10}")
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        selfreport.close(timeout=1.0)
        print("done")
        """,
        collector.dsn,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
