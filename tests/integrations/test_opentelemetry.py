"""OpenTelemetry: selfreport's own sends are not traced, the app's are; events carry trace ids."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.urllib import URLLibInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from selfreport import Client, LoggingHandler
from selfreport._core.dsn import Dsn, parse_dsn
from selfreport._delivery.transport import ORIGIN_HEADER, USER_AGENT, HttpTransport, Response
from selfreport.integrations import opentelemetry as otel_integration
from selfreport.testing import FakeCollector

ClientFactory = Callable[..., Client]


def is_instrumentation_enabled() -> bool:
    return not otel_context.get_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY)


def is_http_instrumentation_enabled() -> bool:
    # The API module holds this key from opentelemetry-api 1.2x on (1.20 has it too).
    key = otel_context._SUPPRESS_HTTP_INSTRUMENTATION_KEY
    return is_instrumentation_enabled() and not otel_context.get_value(key)


@pytest.fixture
def tracing() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    """An SDK tracer with an in-memory exporter, and urllib instrumented to trace into it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = URLLibInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield provider.get_tracer("tests"), exporter
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


class UrllibTransport:
    """A selfreport transport sending through urllib.request, which OpenTelemetry instruments."""

    def __init__(self, dsn: Dsn) -> None:
        self.dsn = dsn

    def send(self, body: bytes, timeout: float) -> Response:
        request = urllib.request.Request(
            self.dsn.envelope_url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/x-sentry-envelope",
                "X-Sentry-Auth": self.dsn.auth_header(USER_AGENT),
                ORIGIN_HEADER: f"{self.dsn.project_id}:{self.dsn.public_key}",
            },
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()
            return Response(reply.status, {k.lower(): v for k, v in reply.headers.items()})

    def close(self) -> None:
        pass


def http_client_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.CLIENT]


def span_urls(exporter: InMemorySpanExporter) -> list[str]:
    urls = []
    for span in http_client_spans(exporter):
        attributes = span.attributes or {}
        urls.append(str(attributes.get("url.full") or attributes.get("http.url")))
    return urls


def app_request(collector: FakeCollector) -> int:
    """The application's own outgoing request (an empty envelope, which the collector takes)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{collector.port}/app/orders", data=b"{}", method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


# --- suppression -----------------------------------------------------------------------------


def test_own_sends_are_not_traced_while_the_apps_requests_are(
    collector: FakeCollector,
    make_client: ClientFactory,
    tracing: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = tracing
    transport = UrllibTransport(parse_dsn(collector.dsn))
    client = make_client(collector.dsn, transport=transport)

    with tracer.start_as_current_span("handle checkout"):
        assert app_request(collector) == 200
        client.capture_message("checkout failed")
    assert client.flush(5.0)
    assert collector.wait_for(1)

    assert client.stats()["sent"] == 1
    urls = span_urls(exporter)
    assert urls == [f"http://127.0.0.1:{collector.port}/app/orders"]

    # The same send outside selfreport's worker is traced: the check above can fail.
    assert transport.send(b"{}\n{}\n", 5.0).status == 200
    assert span_urls(exporter)[-1].endswith("/api/1/envelope/")


def test_default_transport_sends_with_instrumentation_suppressed(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    seen: list[tuple[bool, bool]] = []

    class RecordingTransport(HttpTransport):
        def send(self, body: bytes, timeout: float) -> Response:
            seen.append((is_instrumentation_enabled(), is_http_instrumentation_enabled()))
            return super().send(body, timeout)

    client = make_client(collector.dsn, transport=RecordingTransport(parse_dsn(collector.dsn)))
    client.capture_message("sent quietly")
    assert client.flush(5.0)
    assert collector.wait_for(1)
    assert seen == [(False, False)]
    assert (is_instrumentation_enabled(), is_http_instrumentation_enabled()) == (True, True)


def test_suppression_keys_cover_the_api_and_the_plain_key() -> None:
    keys = otel_integration.suppression_keys()
    assert otel_context._SUPPRESS_INSTRUMENTATION_KEY in keys
    assert otel_context._SUPPRESS_HTTP_INSTRUMENTATION_KEY in keys
    assert "suppress_instrumentation" in keys
    assert len(keys) == len(set(keys))
    with otel_integration.suppress_instrumentation():
        assert all(otel_context.get_value(key) is True for key in keys)
    assert not any(otel_context.get_value(key) for key in keys)


def test_the_integration_switches_itself_on_once_the_app_imports_opentelemetry(
    collector: FakeCollector,
) -> None:
    """The core imports no integration: it is imported for it, on the first event or send after
    the application imported OpenTelemetry (a broken one: tests/core/test_processors.py)."""
    script = textwrap.dedent(
        f"""
        import sys
        import selfreport
        client = selfreport.init({collector.dsn!r})
        client.capture_message("before")
        client.flush(5.0)
        before = "selfreport.integrations.opentelemetry" in sys.modules
        import opentelemetry.context
        client.capture_message("after")
        selfreport.close(5.0)
        print(before, "selfreport.integrations.opentelemetry" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "True"]
    assert collector.wait_for(2)


# --- trace context -----------------------------------------------------------------------------


def test_events_carry_the_active_trace_and_span(
    collector: FakeCollector,
    make_client: ClientFactory,
    tracing: tuple[trace.Tracer, InMemorySpanExporter],
    relay: Any,
) -> None:
    tracer, _ = tracing
    seen_by_before_send: list[Any] = []

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        seen_by_before_send.append(event["contexts"].get("trace"))
        return event

    client = make_client(collector.dsn, before_send=before_send)
    logger = logging.getLogger("app.traced")
    handler = LoggingHandler(client=client)
    logger.addHandler(handler)
    try:
        with tracer.start_as_current_span("handle checkout") as span:
            logger.error("payment declined")
            ids = span.get_span_context()
        client.capture_message("outside any span")
    finally:
        logger.removeHandler(handler)
    assert client.flush(5.0)
    assert collector.wait_for(2)

    by_message = {event["logentry"]["message"]: event for event in collector.events}
    traced = by_message["payment declined"]["contexts"]["trace"]
    assert traced == {
        "trace_id": format(ids.trace_id, "032x"),
        "span_id": format(ids.span_id, "016x"),
        "type": "trace",
    }
    assert "trace" not in by_message["outside any span"]["contexts"]
    assert traced in seen_by_before_send

    normalized = relay.StoreNormalizer(project_id=1).normalize_event(by_message["payment declined"])
    assert normalized.get("errors") is None
    assert normalized["contexts"]["trace"]["trace_id"] == traced["trace_id"]
    assert normalized["contexts"]["trace"]["span_id"] == traced["span_id"]


def test_add_trace_context_keeps_an_existing_trace_and_makes_contexts(
    tracing: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, _ = tracing
    own = {"trace_id": "a" * 32, "span_id": "b" * 16}
    with tracer.start_as_current_span("work"):
        kept: dict[str, Any] = {"contexts": {"trace": dict(own)}}
        otel_integration.add_trace_context(kept)
        made: dict[str, Any] = {"contexts": None}
        otel_integration.add_trace_context(made)
    empty: dict[str, Any] = {}
    otel_integration.add_trace_context(empty)
    assert kept["contexts"]["trace"] == own
    assert set(made["contexts"]["trace"]) == {"trace_id", "span_id", "type"}
    assert empty == {}
    assert otel_integration.trace_context() is None


# --- optional -------------------------------------------------------------------------------


def test_selfreport_never_imports_optional_libraries(collector: FakeCollector) -> None:
    script = textwrap.dedent(
        f"""
        import logging, sys
        import selfreport
        selfreport.init({collector.dsn!r})
        logging.getLogger("app").error("reported without any optional library")
        selfreport.close(5.0)
        loaded = sorted(
            name for name in sys.modules
            if name.split(".")[0] in ("opentelemetry", "sentry_sdk", "loguru", "structlog")
        )
        print(loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
    assert collector.wait_for(1)
    assert "trace" not in collector.events[0]["contexts"]


def test_import_without_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "selfreport.integrations.opentelemetry")
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"pip install 'selfreport\[otel\]'"):
        importlib.import_module("selfreport.integrations.opentelemetry")
