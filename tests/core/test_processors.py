"""Event processors and send wrappers: registered by integrations, run by the core."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import pytest

from selfreport import Client
from selfreport._core import processors
from selfreport.testing import MemoryTransport


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processors, "_processors", [])
    monkeypatch.setattr(processors, "_send_wrappers", [])
    monkeypatch.setattr(processors, "_pending", [])


@pytest.mark.usefixtures("registry")
def test_processors_change_events_and_a_raising_one_is_skipped(
    make_client: Callable[..., Client],
) -> None:
    def tag(event: dict[str, Any]) -> None:
        event.setdefault("tags", {})["processed"] = "yes"

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("a broken integration")

    processors.add_event_processor(broken)
    processors.add_event_processor(tag)
    processors.add_event_processor(tag)  # once only
    transport = MemoryTransport()
    client = make_client(transport=transport)
    client.capture_message("processed")
    assert client.flush(5)
    assert transport.events[0]["tags"]["processed"] == "yes"
    processors.remove_event_processor(tag)
    processors.remove_event_processor(tag)
    client.capture_message("not processed")
    assert client.flush(5)
    assert "processed" not in transport.events[1].get("tags", {})


@pytest.mark.usefixtures("registry")
def test_send_wrappers_surround_every_send(make_client: Callable[..., Client]) -> None:
    inside: list[bool] = []
    state = {"wrapped": False}

    @contextmanager
    def wrapper() -> Iterator[None]:
        state["wrapped"] = True
        try:
            yield
        finally:
            state["wrapped"] = False

    class Watching(MemoryTransport):
        def send(self, body: bytes, timeout: float) -> Any:
            inside.append(state["wrapped"])
            return super().send(body, timeout)

    processors.add_send_wrapper(wrapper)
    processors.add_send_wrapper(wrapper)
    client = make_client(transport=Watching())
    client.capture_message("wrapped")
    assert client.flush(5)
    processors.remove_send_wrapper(wrapper)
    processors.remove_send_wrapper(wrapper)
    client.capture_message("bare")
    assert client.flush(5)
    assert inside == [True, False]


@pytest.mark.usefixtures("registry")
def test_an_integration_is_imported_once_its_library_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    imported: list[str] = []
    integration = types.ModuleType("fake_integration")
    monkeypatch.setitem(sys.modules, "fake_integration", integration)
    monkeypatch.setattr(processors.importlib, "import_module", imported.append)
    processors.activate_on_import("fake_library", "fake_integration")
    processors.activate_on_import("fake_library", "fake_integration")
    processors.process_event({})
    assert imported == []  # the application has not imported the library: nothing happens
    monkeypatch.setitem(sys.modules, "fake_library", types.ModuleType("fake_library"))
    processors.process_event({})
    with processors.unobserved():
        pass
    assert imported == ["fake_integration"]  # once


@pytest.mark.usefixtures("registry")
def test_a_broken_integration_is_given_up_and_reporting_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "fake_library", types.ModuleType("fake_library"))
    monkeypatch.setitem(sys.modules, "broken_integration", None)  # importing it raises
    processors.activate_on_import("fake_library", "broken_integration")
    with processors.unobserved():
        pass
    assert processors._pending == []
