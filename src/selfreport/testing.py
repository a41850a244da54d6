"""Test helpers for users' own tests: in-memory capture and a real fake collector."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from ._client import Client
from ._delivery.envelope import Envelope, parse_envelope
from ._delivery.transport import Response, Transport

__all__ = [
    "CapturedEvents",
    "FakeCollector",
    "MemoryTransport",
    "ReceivedRequest",
    "capture_events",
    "selfreport_events",
]

Event = dict[str, Any]


class CapturedEvents(list):  # type: ignore[type-arg]
    """The events a :func:`capture_events` block sent, oldest first."""

    client: Client

    def flush(self, timeout: float = 5.0) -> CapturedEvents:
        """Wait until every event captured so far is in this list."""
        self.client.flush(timeout)
        return self

    def messages(self) -> list[Optional[str]]:
        """The formatted message of each event (after a flush); None for events without one."""
        self.flush()
        out = []
        for event in self:
            entry = event.get("logentry") or {}
            out.append(entry.get("formatted") or entry.get("message"))
        return out


class MemoryTransport(Transport):
    """A transport that parses each envelope and keeps the events in memory."""

    def __init__(self, sink: Optional[list[Event]] = None) -> None:
        self.events: list[Event] = [] if sink is None else sink
        self.envelopes: list[Envelope] = []

    def send(self, body: bytes, timeout: float) -> Response:
        """Parse ``body`` and keep its envelope and events; answers 200."""
        envelope = parse_envelope(body)
        self.envelopes.append(envelope)
        self.events.extend(envelope.events())
        return Response(200)

    def close(self) -> None:
        """Nothing to release."""


@contextmanager
def capture_events(**options: Any) -> Iterator[CapturedEvents]:
    """Report into a list for the duration of the block::

        with capture_events() as events:
            logging.getLogger("app").error("boom")
        assert events.messages() == ["boom"]

    The global client and a root-logger handler are swapped in for the block and restored
    after it. Rate limit and dedupe are off unless given in ``options``.
    """
    import logging

    from ._state import set_client
    from .logging import LoggingHandler

    events = CapturedEvents()
    level = options.pop("logging_level", logging.ERROR)  # the handler's, not a Client option
    options.setdefault("rate_limit", 0)
    options.setdefault("dedupe_window", 0)
    client = Client(transport=MemoryTransport(events), **options)
    events.client = client
    handler = None
    if level is not None:  # as init() makes it: breadcrumbs from the client's breadcrumbs_level
        handler = LoggingHandler(level, client=client, breadcrumbs_level=client.breadcrumbs_level)
    root = logging.getLogger()
    previous = set_client(client)
    if handler is not None:
        root.addHandler(handler)
    try:
        yield events
    finally:
        if handler is not None:
            root.removeHandler(handler)
        set_client(previous)
        client.close(timeout=5.0)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional for users
    pass
else:

    @pytest.fixture
    def selfreport_events() -> Iterator[CapturedEvents]:
        """Pytest fixture: the events reported during the test (see :func:`capture_events`)."""
        with capture_events() as events:
            yield events


# --- FakeCollector ---------------------------------------------------------------------------


class ReceivedRequest:
    """One request the fake collector received."""

    def __init__(
        self,
        path: str,
        headers: dict[str, str],
        body: bytes,
        client_address: tuple[str, int] = ("", 0),
    ) -> None:
        self.path = path
        self.headers = headers
        self.body = body
        self.client_address = client_address  # the same for requests on one kept-alive connection
        self.envelope: Optional[Envelope] = None
        self.error: Optional[str] = None


class FakeCollector:
    """A real HTTP server on 127.0.0.1 that records Sentry envelopes::

        with FakeCollector() as collector:
            selfreport.init(collector.dsn)
            ...
            assert collector.wait_for(1)
            assert collector.events[0]["level"] == "error"

    ``status`` / ``response_headers`` set what it answers (500, 429 with ``Retry-After``, ...),
    ``delay`` how long it waits before answering, ``blackhole = True`` makes it accept requests
    and never answer. ``on_envelope(request)`` runs inside each request's handling.
    """

    def __init__(self, project_id: str = "1", public_key: str = "public", port: int = 0) -> None:
        self.project_id = project_id
        self.public_key = public_key
        self._port = port
        self.status = 200
        self.response_headers: dict[str, str] = {}
        self.delay = 0.0
        self.blackhole = False
        self.on_envelope: Optional[Callable[[ReceivedRequest], None]] = None
        self.requests: list[ReceivedRequest] = []
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle ---

    def start(self) -> FakeCollector:
        """Listen on 127.0.0.1 (on ``port``, default a free one) and serve on a daemon thread;
        returns self."""
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The reply goes out in two writes; with Nagle and delayed ACKs that costs 40 ms.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

            def do_POST(self) -> None:
                try:
                    collector._handle(self)
                except ConnectionError:  # the client gave up (timeout, close): its business
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits for one poll
            name="selfreport-fake-collector",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release blackholed and delayed requests, stop serving and close the socket."""
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port it listens on (after :meth:`start`)."""
        assert self._server is not None, "start() the collector first"
        return int(self._server.server_address[1])

    @property
    def dsn(self) -> str:
        """A DSN pointing at this collector."""
        return f"http://{self.public_key}@127.0.0.1:{self.port}/{self.project_id}"

    # --- what arrived ---

    @property
    def envelopes(self) -> list[Envelope]:
        """Every valid envelope received so far, oldest first."""
        with self._cond:
            return [r.envelope for r in self.requests if r.envelope is not None]

    @property
    def events(self) -> list[Event]:
        """Every event received so far, oldest first."""
        return [event for envelope in self.envelopes for event in envelope.events()]

    @property
    def checkins(self) -> list[Event]:
        """Every cron check-in received so far (``check_in`` items), oldest first."""
        return [
            item.json()
            for envelope in self.envelopes
            for item in envelope.items
            if item.type == "check_in"
        ]

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` events arrived; False on timeout.

        To show that no more arrive, flush the client instead of waiting: each request is
        recorded before it is answered, so after a successful ``flush()`` all it sent is here.
        """
        with self._cond:
            return self._cond.wait_for(lambda: len(self.events) >= count, timeout)

    # --- request handling ---

    def _handle(self, http: BaseHTTPRequestHandler) -> None:
        length = int(http.headers.get("Content-Length") or 0)
        body = http.rfile.read(length)
        headers = dict(http.headers.items())
        request = ReceivedRequest(http.path, headers, body, http.client_address[:2])
        try:
            encoding = headers.get("Content-Encoding", "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding == "br":  # sentry-sdk's choice when the brotli module is installed
                import brotli

                body = brotli.decompress(body)
            envelope = parse_envelope(body)
            envelope.events()  # event payloads must be JSON too, or .events would raise later
            request.envelope = envelope
        except Exception as exc:
            request.error = repr(exc)
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()
        if self.blackhole:
            self._stopped.wait()
            return
        if self.on_envelope is not None:
            self.on_envelope(request)
        if self.delay:
            self._stopped.wait(self.delay)
        status = 400 if request.error else self.status
        reply = b'{"id":null}' if status < 300 else b'{"detail":"fake collector"}'
        http.send_response(status)
        for key, value in self.response_headers.items():
            http.send_header(key, value)
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(reply)))
        http.end_headers()
        http.wfile.write(reply)
