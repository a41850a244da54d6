"""Shared fixtures: a real fake collector, client factories, and no state leaking between tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

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


def _patch_points() -> tuple[object, ...]:
    return (
        threading.Thread.__dict__["start"],
        concurrent.futures.ThreadPoolExecutor.__dict__["submit"],
        asyncio.BaseEventLoop.__dict__["call_exception_handler"],
        asyncio.BaseEventLoop.__dict__["create_task"],
        logging.Logger.__dict__["handle"],
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
    yield
    selfreport.close(timeout=1.0)
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
