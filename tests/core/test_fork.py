"""The fork registry: callbacks run in a real forked child, weakly held, none stopping the rest."""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any, Callable

import pytest

from selfreport import Client
from selfreport._core import fork
from selfreport.testing import MemoryTransport

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def in_child(report: Callable[[], Any]) -> Any:
    """Fork; the child runs ``report()`` and sends back its JSON; the parent returns it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which never returns
        code = 0
        try:
            os.write(write, json.dumps(report()).encode())
        except BaseException as error:
            os.write(write, json.dumps(repr(error)).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0, chunks
    return json.loads(b"".join(chunks))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_a_real_fork_resets_a_client_in_the_child() -> None:
    transport = MemoryTransport()
    client = Client(transport=transport, rate_limit=0, dedupe_window=0)
    try:
        client.capture_message("parent")
        assert client.flush(5)

        def child() -> Any:
            before = client.stats()["sent"]  # reset by the registry before this runs
            client.capture_message("child")
            client.flush(5)
            return [before, client.stats()["sent"], len(transport.events)]

        assert in_child(child) == [0, 1, 2]
        assert client.stats()["sent"] == 1  # the parent's counters are its own
    finally:
        client.close(1.0)


def test_callbacks_run_in_order_and_one_raising_does_not_stop_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fork, "_callbacks", [])
    ran: list[str] = []

    def broken() -> None:
        ran.append("broken")
        raise RuntimeError("a reset failed")

    fork.on_fork_child(lambda: ran.append("first"))
    fork.on_fork_child(broken)
    fork.on_fork_child(lambda: ran.append("last"))
    fork.run_fork_callbacks()
    assert ran == ["first", "broken", "last"]


def test_a_method_is_held_weakly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fork, "_callbacks", [])
    ran: list[str] = []

    class Owner:
        def reset(self) -> None:
            ran.append("reset")

    owner = Owner()
    fork.on_fork_child(owner.reset)
    fork.run_fork_callbacks()
    del owner
    gc.collect()
    fork.run_fork_callbacks()
    assert ran == ["reset"]
    fork.on_fork_child(lambda: None)  # registering prunes what died
    assert len(fork._callbacks) == 1


def test_a_closed_client_is_not_kept_alive_by_the_registry() -> None:
    client = Client(transport=MemoryTransport())
    client.close(1.0)
    before = sys.getrefcount(client)
    fork.on_fork_child(client.after_fork_in_child)
    assert sys.getrefcount(client) == before


def test_fresh_event_keeps_the_state() -> None:
    import threading

    done = threading.Event()
    done.set()
    assert fork.fresh_event(done).is_set()
    assert not fork.fresh_event(threading.Event()).is_set()
