"""Helpers for users' tests: capture_events, the fixture, MemoryTransport, FakeCollector."""

from __future__ import annotations

import http.client
import logging
import socket
import zlib
from typing import Any

import pytest

import selfreport
from selfreport import LoggingHandler
from selfreport._core.dsn import parse_dsn
from selfreport._delivery.envelope import serialize_envelope
from selfreport._delivery.transport import HttpTransport
from selfreport._state import current_client
from selfreport.testing import (
    CapturedEvents,
    FakeCollector,
    MemoryTransport,
    ReceivedRequest,
    capture_events,
)

from .conftest import FAST_OPTIONS

log = logging.getLogger("test_testing")


def envelope(message: str = "m") -> bytes:
    return serialize_envelope({"event_id": "e" * 32, "message": message}, None, "now")


def post(
    collector: FakeCollector, body: bytes, headers: dict[str, str]
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
    try:
        conn.request("POST", "/api/1/envelope/", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


# --- capture_events --------------------------------------------------------------------------


def test_capture_events_collects_logs_and_captures() -> None:
    root_handlers = list(logging.getLogger().handlers)
    with capture_events() as events:
        assert isinstance(events, CapturedEvents)
        log.error("first %s", "error")
        log.warning("not at the default level")
        selfreport.capture_message("a message")
        assert events.messages() == ["first error", "a message"]
        assert events.flush() is events
    assert current_client() is None
    assert logging.getLogger().handlers == root_handlers
    assert events.client._closed.is_set()


def test_capture_events_options() -> None:
    def tag(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        event["tags"] = {"tagged": "yes"}
        return event

    with capture_events(logging_level="WARNING", before_send=tag, environment="test") as events:
        log.warning("a warning")
        events.flush()
    assert events[0]["tags"] == {"tagged": "yes"}
    assert events[0]["environment"] == "test"
    assert events[0]["level"] == "warning"


def test_capture_events_without_a_handler() -> None:
    with capture_events(logging_level=None) as events:
        log.error("not captured: no handler")
        selfreport.capture_message("captured")
    assert events.messages() == ["captured"]


def test_capture_events_under_init_gives_one_event_per_record(collector: FakeCollector) -> None:
    app_client = selfreport.init(collector.dsn, **FAST_OPTIONS)
    with capture_events() as events:
        log.error("logged once")  # reaches both the init() handler and capture_events' handler
        assert events.messages() == ["logged once"]
    assert current_client() is app_client
    assert collector.requests == []


def test_selfreport_events_fixture(selfreport_events: CapturedEvents) -> None:
    log.error("through the fixture")
    assert selfreport_events.messages() == ["through the fixture"]


@pytest.mark.slow
def test_fixture_is_available_through_the_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import logging

        def test_reports(selfreport_events):
            logging.getLogger("user").error("user error %d", 7)
            assert selfreport_events.messages() == ["user error 7"]
            assert selfreport_events[0]["logger"] == "user"
        """
    )
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=1)


# --- MemoryTransport -------------------------------------------------------------------------


def test_memory_transport_parses_envelopes() -> None:
    sink: list[dict[str, Any]] = []
    transport = MemoryTransport(sink)
    assert transport.send(envelope("kept"), timeout=1).status == 200
    transport.close()
    assert sink == [{"event_id": "e" * 32, "message": "kept"}]
    assert len(transport.envelopes) == 1
    assert MemoryTransport().events == []


# --- FakeCollector ---------------------------------------------------------------------------


def test_fake_collector_records_requests(collector: FakeCollector) -> None:
    assert collector.dsn == f"http://public@127.0.0.1:{collector.port}/1"
    assert not collector.wait_for(1, timeout=0.01)
    seen: list[ReceivedRequest] = []
    collector.on_envelope = seen.append
    response = post(collector, envelope("hi"), {"X-Custom": "1"})
    assert response.status == 200
    assert collector.wait_for(1, timeout=1)
    (request,) = collector.requests
    assert seen == [request]
    assert request.path == "/api/1/envelope/"
    assert request.headers["X-Custom"] == "1"
    assert request.client_address[0] == "127.0.0.1"
    assert collector.events == [{"event_id": "e" * 32, "message": "hi"}]


def test_fake_collector_project_and_key() -> None:
    with FakeCollector(project_id="42", public_key="k") as fake:
        assert parse_dsn(fake.dsn).project_id == "42"
        assert parse_dsn(fake.dsn).public_key == "k"


def test_port_before_start_is_an_error() -> None:
    with pytest.raises(AssertionError, match="start"):
        _ = FakeCollector().port


def test_fake_collector_status_and_headers(collector: FakeCollector) -> None:
    collector.status = 429
    collector.response_headers = {"Retry-After": "7"}
    response = post(collector, envelope(), {})
    assert response.status == 429
    assert response.getheader("Retry-After") == "7"


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (b"not an envelope", None),
        (b'{}\n{"type":"event"}\nnot json', None),
        (b"not gzip", "gzip"),
    ],
)
def test_fake_collector_rejects_malformed_bodies(
    collector: FakeCollector, body: bytes, encoding: str | None
) -> None:
    headers = {"Content-Encoding": encoding} if encoding else {}
    assert post(collector, body, headers).status == 400
    (request,) = collector.requests
    assert request.envelope is None
    assert request.error is not None
    assert collector.events == []


def test_fake_collector_decodes_deflate(collector: FakeCollector) -> None:
    assert (
        post(collector, zlib.compress(envelope("d")), {"Content-Encoding": "deflate"}).status == 200
    )
    assert collector.events[0]["message"] == "d"


def test_fake_collector_delay_and_blackhole(collector: FakeCollector) -> None:
    sender = HttpTransport(parse_dsn(collector.dsn))
    try:
        collector.delay = 5.0
        with pytest.raises(socket.timeout):  # TimeoutError from 3.10 on
            sender.send(envelope(), timeout=0.1)
        collector.delay = 0.0
        collector.blackhole = True
        with pytest.raises(socket.timeout):  # TimeoutError from 3.10 on
            sender.send(envelope(), timeout=0.1)
        # Recorded, just never answered; the server thread may read the second one only after
        # the client gave up on it (found on a loaded machine under 3.9).
        assert collector.wait_for(2)
        assert len(collector.requests) == 2
    finally:
        sender.close()


def test_fake_collector_with_a_real_client(collector: FakeCollector) -> None:
    selfreport.init(collector.dsn, **FAST_OPTIONS)
    logging.getLogger("test_testing.app").error("to the fake collector")
    assert selfreport.flush(5)
    assert collector.wait_for(1)
    assert collector.events[0]["logentry"]["message"] == "to the fake collector"
    assert isinstance(logging.getLogger().handlers[-1], LoggingHandler)
