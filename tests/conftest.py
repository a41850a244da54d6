"""Shared fixtures: a real fake collector, client factories, and no state leaking between tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import logging
import multiprocessing.process
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, TypeVar

import pytest

import selfreport
from selfreport import Client

if TYPE_CHECKING:
    from selfreport.testing import FakeCollector

# The pytest11 entry point is disabled in addopts (it would import selfreport before coverage
# starts); load the plugin, and so the ``selfreport_events`` fixture, from here instead. Nothing
# in this module may import selfreport.testing at import time: pytest reads ``pytest_plugins``
# only after the module ran, and pytest 8 aborts (under -W error) on a plugin it can no longer
# rewrite because it was already imported.
pytest_plugins = ("selfreport.testing", "pytester")

ClientFactory = Callable[..., Client]
T = TypeVar("T")

# Options that keep unit tests fast and deterministic: no backoff sleeps, no silent limits.
FAST_OPTIONS: dict[str, Any] = {
    "retry_backoff": 0.0,
    "rate_limit": 0,
    "dedupe_window": 0,
    "http_timeout": 2.0,
    "shutdown_timeout": 2.0,
}

RELAY_MISSING = "sentry-relay is not installed (its wheels need Python 3.10+ on x86_64 or aarch64)"


def import_relay() -> Any:
    """``sentry_relay.processing``, or skip the calling test saying why it is missing."""
    return pytest.importorskip("sentry_relay.processing", reason=RELAY_MISSING)


@pytest.fixture(scope="session")
def relay() -> Any:
    """Relay's normalizer and PII stripper: the tests that use it skip one by one without it."""
    return import_relay()


class FakeClock:
    """A monotonic clock that moves only when told: ``clock.advance(seconds)``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(done: Callable[[], T], timeout: float = 30.0) -> T:
    """Poll ``done`` until its answer is true or ``timeout`` seconds passed; its last answer.

    For waiting on something that will happen. Absence is proven with flush() and counters
    (see :func:`settle`), never by waiting a little to see whether something comes.
    """
    deadline = time.monotonic() + timeout
    while True:
        answer = done()
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.02)


def settle(client: Any, collector: FakeCollector, timeout: float = 30.0) -> int:
    """How many events ``collector`` holds once ``client`` (a Client, or the ``selfreport``
    module for the global one) has delivered everything, reports made while delivering too.

    Each flush waits for what was captured before it, and a report captured meanwhile (say a
    before_send that logs an error) makes another round, until a round captures nothing new.
    A flushed event was recorded by the collector before it answered, so the count is final:
    nothing more will come from this client.
    """
    deadline = time.monotonic() + timeout
    captured = -1
    while client.stats()["captured"] != captured:
        captured = client.stats()["captured"]
        assert client.flush(max(0.0, deadline - time.monotonic())), "flush timed out"
    return len(collector.events)


_held_ports: list[socket.socket] = []


def closed_port() -> int:
    """A TCP port on 127.0.0.1 where connections are refused, at once and every time.

    The port is bound and never listened on, and stays so until the session ends: no other
    process can take it meanwhile (unlike a port bound, read and released, or port 9).
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _held_ports.append(sock)
    return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _release_closed_ports() -> Iterator[None]:
    yield
    while _held_ports:
        _held_ports.pop().close()


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    """A started FakeCollector on 127.0.0.1, always stopped afterwards."""
    from selfreport.testing import FakeCollector

    fake = FakeCollector().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """Build clients with fast test options (overridable); every one is closed afterwards."""
    clients: list[Client] = []

    def factory(dsn: Any = None, **options: Any) -> Client:
        client = Client(dsn, **{**FAST_OPTIONS, **options})
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close(timeout=1.0)


def pytest_configure(config: pytest.Config) -> None:
    if sys.version_info < (3, 10):
        # On 3.9, asyncio.get_event_loop() makes a loop when none was ever set. pytest-asyncio
        # 1.2 calls it around every async test and leaves that loop current; the next
        # asyncio.run() drops it unclosed (a ResourceWarning in whichever test the GC runs).
        # Set "no loop" once, as 3.10+ behave anyway: nothing is made implicitly.
        asyncio.set_event_loop(None)


def _patch_points() -> tuple[object, ...]:
    return (
        threading.Thread.__dict__["start"],
        concurrent.futures.ThreadPoolExecutor.__dict__["submit"],
        asyncio.BaseEventLoop.__dict__["call_exception_handler"],
        asyncio.BaseEventLoop.__dict__["create_task"],
        logging.Logger.__dict__["handle"],
        concurrent.futures.ProcessPoolExecutor.__dict__["submit"],
        concurrent.futures.Future.__dict__["add_done_callback"],
        asyncio.BaseEventLoop.__dict__["call_soon_threadsafe"],
        subprocess.Popen.__dict__["__init__"],
        multiprocessing.process.BaseProcess.__dict__["start"],
    )


# Not using monkeypatch: this fixture must tear down after a test's own monkeypatch is undone.
@pytest.fixture(autouse=True)
def _isolate_selfreport() -> Iterator[None]:
    """Close the global client after each test and check nothing leaked into the process."""
    saved_dsn = os.environ.pop("SELFREPORT_DSN", None)
    root = logging.getLogger()
    own = logging.getLogger("selfreport")
    saved = (root.level, list(root.handlers), own.level, list(own.handlers), own.propagate)
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    patched = _patch_points()
    # Tags, user and breadcrumbs a test sets in the main thread's context end with the test.
    from selfreport._capture import scope

    test_scope = selfreport.new_scope()
    with test_scope:
        yield
    selfreport.close(timeout=1.0)
    scope.configure(scope.DEFAULT_MAX_BREADCRUMBS)
    os.environ.pop("SELFREPORT_DSN", None)
    if saved_dsn is not None:
        os.environ["SELFREPORT_DSN"] = saved_dsn
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    own.setLevel(saved[2])
    own.handlers[:] = saved[3]
    own.propagate = saved[4]
    leaked_hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook) != hooks
    sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
    leaked_patches = _patch_points() != patched
    assert not leaked_hooks, "a test left exception hooks installed"
    assert not leaked_patches, "a test left patches installed"


_HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


@contextlib.contextmanager
def _write_lock_held(path: Path) -> Iterator[None]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()


@pytest.fixture
def write_lock_held() -> Callable[[Path], ContextManager[None]]:
    """``with write_lock_held(path):`` another process holds that SQLite database's write
    lock (``BEGIN IMMEDIATE``) until the block ends."""
    return _write_lock_held


class StoreLoad:
    """Threads storing small events at a collector (``/store/``) as fast as it answers, each
    acknowledged event_id in ``acked``, until :meth:`stop` or the server is gone."""

    def __init__(self, dsn: str, threads: int) -> None:
        from selfreport._core.dsn import parse_dsn

        self.dsn = parse_dsn(dsn)
        self.acked: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        conn = http.client.HTTPConnection(self.dsn.host, self.dsn.port, timeout=5)
        auth = {"X-Sentry-Auth": f"Sentry sentry_key={self.dsn.public_key}"}
        try:
            while not self._stop.is_set():
                event_id = uuid.uuid4().hex
                body = json.dumps({"event_id": event_id, "message": "load", "extra": {"n": 1}})
                try:
                    conn.request("POST", f"/api/{self.dsn.project_id}/store/", body, auth)
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    return  # the server is gone
                if response.status == 200:
                    with self._lock:
                        self.acked.append(event_id)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


@pytest.fixture
def store_load() -> Iterator[Callable[[str, int], StoreLoad]]:
    """``store_load(dsn, threads)`` starts a :class:`StoreLoad`; all are stopped afterwards."""
    loads: list[StoreLoad] = []

    def start(dsn: str, threads: int) -> StoreLoad:
        loads.append(StoreLoad(dsn, threads))
        return loads[-1]

    yield start
    for load in loads:
        load.stop()
