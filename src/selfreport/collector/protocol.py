"""uvicorn's httptools protocol enforcing HttpLimits, every deadline checked by one timer."""

from __future__ import annotations

import asyncio
import http
import json
import logging
import math
from typing import Any, ClassVar, Optional

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import limits as _limits
from .limits import HttpLimits, OnReject

__all__ = ["LimitedHttpToolsProtocol", "limited_protocol"]

# What a connection's deadline is for.
_NOTHING, _HEADERS, _BODY, _KEEP_ALIVE = range(4)
_NEVER = math.inf

# The sweep's period: a second, or a quarter of the shortest timeout when that is under 4 s
# (a deadline is acted on up to one period late).
_MAX_PERIOD = 1.0
_MIN_PERIOD = 0.01

# A streamed body is the app's to refuse (ingestion answers 413 with Sentry's headers); the
# protocol steps in only well past the limit, for routes that never read their body. What the
# app has not read yet stays below uvicorn's 64 KiB high-water mark plus one 256 KiB read.
_BODY_SLACK = 2**20


class _Rejected(Exception):
    """Stops the parser once a reply was sent (httptools re-raises it wrapped)."""


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


class _Settings:
    """One server's limits, where its connections report rejections, and its sweeper."""

    def __init__(self, limits: HttpLimits, on_reject: OnReject) -> None:
        self.limits = limits
        self.on_reject = on_reject
        shortest = min(limits.header_timeout, limits.body_timeout, limits.keep_alive_timeout)
        self.period = min(_MAX_PERIOD, max(_MIN_PERIOD, shortest / 4))
        # The body streamed past the limit, then with its framing and trailers.
        self.max_body_streamed = limits.max_body + _BODY_SLACK
        self.max_body_received = self.max_body_streamed + limits.max_header_bytes
        self._sweeper: Optional[_Sweeper] = None

    def sweeper(self, loop: asyncio.AbstractEventLoop) -> _Sweeper:
        if self._sweeper is None or self._sweeper.loop is not loop:
            self._sweeper = _Sweeper(loop, self.period)
        return self._sweeper


class _Sweeper:
    """Every open connection's deadline, checked by one timer every ``period`` seconds (while
    connections are open): no timer to arm and cancel per request, nor per connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.loop = loop
        self.period = period
        self.connections: set[LimitedHttpToolsProtocol] = set()
        self._handle: Optional[asyncio.TimerHandle] = None

    def add(self, protocol: LimitedHttpToolsProtocol) -> None:
        self.connections.add(protocol)
        if self._handle is None:
            self._handle = self.loop.call_later(self.period, self._sweep)

    def discard(self, protocol: LimitedHttpToolsProtocol) -> None:
        self.connections.discard(protocol)

    def _sweep(self) -> None:
        # Rescheduled first: one connection failing to time out must not stop the others'.
        self._handle = None
        if not self.connections:
            return
        self._handle = self.loop.call_later(self.period, self._sweep)
        now = self.loop.time()
        for protocol in [p for p in self.connections if p.deadline <= now]:
            protocol.deadline_passed()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Counts header bytes and fields per chunk received (httptools buffers a header whole,
    without limit, before calling back), exactly once they are complete; times headers, bodies
    and idle keep-alive connections with a deadline each, which the server's sweeper checks.

    uvicorn's methods are called by name, not through ``super()``: they run for every request.
    """

    settings: ClassVar[_Settings]  # set by limited_protocol, for each server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = self.settings.limits
        self._sweeper: Optional[_Sweeper] = None
        self.deadline = _NEVER
        self._waiting = _NOTHING  # what the deadline is for
        self._reading_headers = True
        self._received = 0  # bytes of the headers, then of the body, so far (whole chunks)
        self._chunk = 0  # bytes of the chunk being parsed
        self._body_bytes = 0
        self._over_limit = False
        self._rejected = False

    # --- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        HttpToolsProtocol.connection_made(self, transport)
        self._over_limit = len(self.connections) > self._limits.max_connections
        self._sweeper = self.settings.sweeper(self.loop)
        self._sweeper.add(self)
        self._wait(_HEADERS, self._limits.header_timeout)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._wait(_NOTHING)
        if self._sweeper is not None:
            self._sweeper.discard(self)
        HttpToolsProtocol.connection_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        # (Never called once rejected: closing the transport stops reading at once.)
        if self._waiting == _KEEP_ALIVE:
            self._waiting, self.deadline = _NOTHING, _NEVER
        self._chunk = len(data)
        self._received += self._chunk
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no WebSocket here: the request was answered as plain HTTP
        except httptools.HttpParserError as exc:
            if not self._rejected:
                _limits._malformed.log(
                    self.logger, logging.WARNING, "invalid HTTP request: %s", str(exc)[:200]
                )
                self._reject(400, "malformed", "invalid HTTP request")
            return
        if self._reading_headers:
            if self._received > self._limits.max_header_bytes:
                self._reject(431, "headers_too_large", self._too_large_headers())
            elif len(self.headers) > self._limits.max_headers:  # many tiny ones in a chunk
                self._reject(431, "headers_too_large", self._too_many_headers())
            elif self._received and self._waiting != _HEADERS:
                self._wait(_HEADERS, self._limits.header_timeout)
        elif self._received > self.settings.max_body_received:
            # The body with its chunk framing and trailers (which httptools buffers whole).
            self._reject(413, "too_large", self._too_large_body())
        elif self._waiting != _BODY:
            self._wait(_BODY, self._limits.body_timeout)

    def on_response_complete(self) -> None:
        if self.pipeline or self.transport.is_closing():
            HttpToolsProtocol.on_response_complete(self)  # starts the next request, if any
            return
        # uvicorn's, but an idle keep-alive connection waits for the sweep, not a timer.
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        if self._waiting == _NOTHING:  # (the next request may have begun arriving)
            self._wait(_KEEP_ALIVE, self.timeout_keep_alive)

    # --- parser callbacks -------------------------------------------------------------

    def on_headers_complete(self) -> None:
        # Bytes received for this request in earlier chunks, plus the chunk the headers ended
        # in (pipelined requests reset the count within a chunk): at least the headers' size.
        received, self._received = self._received + self._chunk, 0
        self._waiting, self.deadline = _NOTHING, _NEVER
        # Checked once the headers are in, not in an on_url/on_header of our own for each
        # (a Python call per header of every request): until then the bytes received bound
        # them (data_received), so many or long ones cannot pile up in the meantime.
        limits = self._limits
        if len(self.url) > limits.max_request_line:
            detail = f"the request target is longer than {limits.max_request_line} bytes"
            self._stop(414, "request_line_too_long", detail)
        headers = self.headers
        if len(headers) > limits.max_headers:
            self._stop(431, "headers_too_large", self._too_many_headers())
        if received > limits.max_header_bytes:  # only then are they worth counting
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in headers)
            if size > limits.max_header_bytes:
                self._stop(431, "headers_too_large", self._too_large_headers())
        if self._over_limit:
            detail = "the collector has too many open connections; retry shortly"
            self._stop(503, "too_many_connections", detail, b"retry-after: 1\r\n")
        length = self._content_length()
        if length is not None and length > self._limits.max_body:
            self._stop(413, "too_large", self._too_large_body())
        self._reading_headers = False
        self._body_bytes = 0
        HttpToolsProtocol.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.settings.max_body_streamed:
            self._stop(413, "too_large", self._too_large_body())
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        self._waiting, self.deadline = _NOTHING, _NEVER
        self._reading_headers = True
        self._received = 0
        HttpToolsProtocol.on_message_complete(self)

    # --- refusing -----------------------------------------------------------------------

    def _content_length(self) -> Optional[int]:
        for name, value in self.headers:
            if name == b"content-length":
                return int(value) if value.isdigit() else None
        return None

    def _too_large_headers(self) -> str:
        return f"the request headers are larger than {self._limits.max_header_bytes} bytes"

    def _too_many_headers(self) -> str:
        return f"more than {self._limits.max_headers} header fields"

    def _too_large_body(self) -> str:
        return f"the body is larger than the limit of {self._limits.max_body} bytes"

    def _stop(self, status: int, reason: str, detail: str, extra: bytes = b"") -> None:
        self._reject(status, reason, detail, extra)
        raise _Rejected(detail)

    def _reject(self, status: int, reason: str, detail: str, extra: bytes = b"") -> None:
        """Answer ``status`` (unless the app already started answering) and close."""
        self._rejected = True
        self._wait(_NOTHING)
        self.headers = []  # a chunk's worth of tiny headers may be many: not kept till closed
        # Counted before the client can see the answer: whoever reads it, then the metrics,
        # finds it there.
        self.settings.on_reject(reason)
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

    # --- deadlines ----------------------------------------------------------------------

    def _wait(self, what: int, seconds: float = _NEVER) -> None:
        """The deadline is now ``seconds`` away, for ``what`` (_NOTHING: there is none)."""
        self._waiting = what
        self.deadline = _NEVER if what == _NOTHING else self.loop.time() + seconds

    def deadline_passed(self) -> None:
        """Called by the sweep once the deadline passed: close, answering 408 if there is a
        request to answer (or wait longer for a body the app is not reading yet)."""
        waiting = self._waiting
        self._wait(_NOTHING)
        if self.transport.is_closing():  # closed, not yet lost
            return
        if waiting == _KEEP_ALIVE:
            self.timeout_keep_alive_handler()
        elif waiting == _HEADERS:
            self._headers_timed_out()
        else:
            self._body_timed_out()

    def _headers_timed_out(self) -> None:
        if not self._received:  # connected, sent nothing: no one to answer
            self._rejected = True
            self.settings.on_reject("idle")
            self.transport.close()
            return
        detail = f"the request headers took longer than {self._limits.header_timeout:g} s"
        self._reject(408, "timeout", detail)

    def _body_timed_out(self) -> None:
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # Waiting for the app (it reads slowly, or has not asked for the body yet).
            self._wait(_BODY, self._limits.body_timeout)
            return
        detail = f"the request body took longer than {self._limits.body_timeout:g} s"
        self._reject(408, "timeout", detail)


def limited_protocol(limits: HttpLimits, on_reject: OnReject) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for one server: ``limits`` enforced, rejections to ``on_reject``."""
    settings = _Settings(limits, on_reject)
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"settings": settings})
