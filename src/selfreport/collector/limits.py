"""Limits on what any client can send, enforced on the connection itself, before the app runs."""

from __future__ import annotations

import asyncio
import http
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from selfreport._core.guard import reporting_path

__all__ = [
    "DEFAULT_MAX_BODY",
    "HttpLimits",
    "LogThrottle",
    "ThrottleFilter",
    "loop_exception_handler",
    "protocol_class",
]

logger = logging.getLogger("selfreport.collector")

DEFAULT_MAX_BODY = 20 * 1024 * 1024

# Why a reply was refused, as the ``reason`` label of the collector's rejection counter.
OnReject = Callable[[str], None]


@dataclass(frozen=True)
class HttpLimits:
    """Everything a client, with or without a key, may send, and how slowly.

    Attributes:
        max_request_line: longest request target (path and query), in bytes; else 414.
        max_header_bytes: request line and headers together, in bytes; else 431.
        max_headers: most header fields in one request; else 431.
        max_body: largest request body on any route, chunked or not, in bytes; else 413
            (ingestion also holds the decompressed body to it).
        header_timeout: seconds from connecting (or from a request's first byte on a
            keep-alive connection) to the end of its headers; else 408 and closed.
        body_timeout: seconds for a request's whole body to arrive; else 408 and closed.
        keep_alive_timeout: seconds an idle keep-alive connection stays open.
        max_connections: open connections served at once; the ones beyond get a 503.
    """

    max_request_line: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body: int = DEFAULT_MAX_BODY
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: int = 5
    max_connections: int = 1000


class LogThrottle:
    """At most one log line per ``interval`` seconds; the next one says how many were left out.

    For lines any stranger can cause (one per bad request would let a flood fill the disk).
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def admit(self) -> Optional[int]:
        """None: leave this line out; else how many were left out before it."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self.interval
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed

    def log(self, logger: logging.Logger, level: int, message: str, *args: object) -> None:
        """``logger.log(level, message, *args)`` unless throttled, inside the reporting path
        (what a request's failure logs was reported already, or is not worth a report)."""
        suppressed = self.admit()
        if suppressed is None:
            return
        if suppressed:
            message += " (%d similar lines left out)"
            args += (suppressed,)
        with reporting_path():
            logger.log(level, message, *args)


class ThrottleFilter(logging.Filter):
    """A logging filter passing one warning-or-worse record per interval (uvicorn's own lines
    about requests: a traceback per failing request, a warning per malformed one)."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.throttle = LogThrottle(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        suppressed = self.throttle.admit()
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar lines left out)"
        return suppressed is not None


def _reply(status: int, detail: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"detail": detail}).encode()
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


# A streamed body is the app's to refuse (ingestion answers 413 with Sentry's headers); the
# protocol steps in only well past the limit, for routes that never read their body. What the
# app has not read yet stays below uvicorn's 64 KiB high-water mark plus one 256 KiB read.
_BODY_SLACK = 2**20


class _Rejected(Exception):
    """Stops the parser once a reply was sent (httptools re-raises it wrapped)."""


def protocol_class(limits: HttpLimits, on_reject: OnReject) -> Optional[type[asyncio.Protocol]]:
    """uvicorn's httptools protocol, enforcing ``limits``; None without httptools (PyPy),
    where uvicorn's h11 protocol bounds the headers (``h11_max_incomplete_event_size``)."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is installed on CPython
        return None

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        """Counts header bytes per chunk received (httptools buffers a header whole, without
        limit, before calling back) and per header; times headers and bodies with one timer."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._timer: Optional[asyncio.TimerHandle] = None
            self._reading_headers = True
            self._received = 0  # bytes of the headers, then of the body, so far (whole chunks)
            self._header_bytes = 0  # exact, from the parser's callbacks
            self._header_count = 0
            self._body_bytes = 0
            self._over_limit = False
            self._rejected = False

        # --- connection -------------------------------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._over_limit = len(self.connections) > limits.max_connections
            self._arm(limits.header_timeout, self._headers_timed_out)

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._cancel_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # (Never called once rejected: closing the transport stops reading at once.)
            self._unset_keepalive_if_required()
            self._received += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                pass  # no WebSocket here: the request was answered as plain HTTP
            except httptools.HttpParserError as exc:
                if not self._rejected:
                    _malformed.log(
                        self.logger, logging.WARNING, "invalid HTTP request: %s", str(exc)[:200]
                    )
                    self._reject(400, "malformed", "invalid HTTP request")
                return
            if self._reading_headers:
                if self._received > limits.max_header_bytes:
                    self._reject(431, "headers_too_large", self._too_large_headers())
                elif self._timer is None and self._received:
                    self._arm(limits.header_timeout, self._headers_timed_out)
            elif self._received > limits.max_body + _BODY_SLACK + limits.max_header_bytes:
                # The body with its chunk framing and trailers (which httptools buffers whole).
                self._reject(413, "too_large", self._too_large_body())
            elif self._timer is None:
                self._arm(limits.body_timeout, self._body_timed_out)

        # --- parser callbacks -------------------------------------------------------------

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            self._header_count = 0
            self._body_bytes = 0

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > limits.max_request_line:
                detail = f"the request target is longer than {limits.max_request_line} bytes"
                self._stop(414, "request_line_too_long", detail)
            self._header_bytes += len(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            self._header_count += 1
            self._header_bytes += len(name) + len(value) + 4
            if self._header_count > limits.max_headers:
                detail = f"more than {limits.max_headers} header fields"
                self._stop(431, "headers_too_large", detail)

        def on_headers_complete(self) -> None:
            self._received = 0
            self._cancel_timer()
            if self._header_bytes > limits.max_header_bytes:
                self._stop(431, "headers_too_large", self._too_large_headers())
            if self._over_limit:
                detail = "the collector has too many open connections; retry shortly"
                self._stop(503, "too_many_connections", detail, b"retry-after: 1\r\n")
            length = self._content_length()
            if length is not None and length > limits.max_body:
                self._stop(413, "too_large", self._too_large_body())
            self._reading_headers = False
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._body_bytes += len(body)
            if self._body_bytes > limits.max_body + _BODY_SLACK:
                self._stop(413, "too_large", self._too_large_body())
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._cancel_timer()
            self._reading_headers = True
            self._received = 0
            super().on_message_complete()

        # --- refusing -----------------------------------------------------------------------

        def _content_length(self) -> Optional[int]:
            for name, value in self.headers:
                if name == b"content-length":
                    return int(value) if value.isdigit() else None
            return None

        def _too_large_headers(self) -> str:
            return f"the request headers are larger than {limits.max_header_bytes} bytes"

        def _too_large_body(self) -> str:
            return f"the body is larger than the limit of {limits.max_body} bytes"

        def _stop(self, status: int, reason: str, detail: str, extra: bytes = b"") -> None:
            self._reject(status, reason, detail, extra)
            raise _Rejected(detail)

        def _reject(self, status: int, reason: str, detail: str, extra: bytes = b"") -> None:
            """Answer ``status`` (unless the app already started answering) and close."""
            self._rejected = True
            self._cancel_timer()
            cycle = self.cycle  # while reading headers: the previous request's
            answered = False
            if cycle is not None:
                answered = not self._reading_headers and cycle.response_started
                if not cycle.response_complete:  # the app is running
                    cycle.disconnected = True  # what it still sends goes nowhere
                    cycle.message_event.set()
            if not answered and not self.transport.is_closing():
                self.transport.write(_reply(status, detail, extra))
            self.transport.close()
            on_reject(reason)

        # --- timeouts -----------------------------------------------------------------------

        def _arm(self, delay: float, callback: Callable[[], None]) -> None:
            self._cancel_timer()
            self._timer = self.loop.call_later(delay, callback)

        def _cancel_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _headers_timed_out(self) -> None:
            self._timer = None
            if self.transport.is_closing():  # pragma: no cover - closed, not yet lost
                return
            if not self._received:  # connected, sent nothing: no one to answer
                self._rejected = True
                self.transport.close()
                on_reject("idle")
                return
            detail = f"the request headers took longer than {limits.header_timeout:g} s"
            self._reject(408, "timeout", detail)

        def _body_timed_out(self) -> None:
            self._timer = None
            if self.transport.is_closing():  # pragma: no cover - closed, not yet lost
                return
            cycle = self.cycle
            if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                # Waiting for the app (it reads slowly, or has not asked for the body yet).
                self._arm(limits.body_timeout, self._body_timed_out)
                return
            detail = f"the request body took longer than {limits.body_timeout:g} s"
            self._reject(408, "timeout", detail)

    return LimitedHttpToolsProtocol


_malformed = LogThrottle()
_accept_failures = LogThrottle()


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The serving loop's exception handler: out of file descriptors, asyncio's accept loop
    reports the failure once per pending connection (up to the backlog, each second, each
    with a traceback); here that is one line a second. Anything else goes to the default."""
    if context.get("message") == "socket.accept() out of system resource":
        _accept_failures.log(
            logger,
            logging.ERROR,
            "cannot accept connections: %s (retrying every second; raise the file limit, "
            "ulimit -n, or lower max_connections; slow and idle clients are closed after "
            "the header timeout)",
            context.get("exception"),
        )
        return
    loop.default_exception_handler(context)
