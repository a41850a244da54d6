"""The connection-level limits over real sockets: sizes, timeouts, connections, log throttling."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

import pytest
from tests.conftest import wait_until

from selfreport.collector import limits
from selfreport.collector.limits import (
    HttpLimits,
    LogThrottle,
    ThrottleFilter,
    loop_exception_handler,
)
from selfreport.collector.server import CollectorServer

from .conftest import DEADLINE, connect, detail_of, read_all, send_all, status_of


def rejected(server: CollectorServer) -> dict[str, int]:
    return server.collector.metrics.rejected_by_reason()


def serve(make_server: Callable[..., CollectorServer], **limits: Any) -> CollectorServer:
    return make_server(limits=HttpLimits(**limits))


GET = b"GET /health HTTP/1.1\r\nHost: x\r\n"


def test_headers_larger_than_the_limit_get_a_431(make_server: Callable[..., CollectorServer]):
    server = serve(make_server, max_header_bytes=4096)
    # One header, streamed: httptools would buffer it whole without the limit.
    with connect(server.port) as sock:
        sent = send_all(sock, GET + b"X-Big: " + b"a" * 10**7)
        reply = read_all(sock)
    assert status_of(reply) == 431
    assert detail_of(reply) == "the request headers are larger than 4096 bytes"
    assert sent < 10**7  # closed long before the end
    # Many small headers arriving in one chunk: counted exactly, when they are complete.
    many = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 90) for i in range(60))
    with connect(server.port) as sock:
        sock.sendall(GET + many + b"\r\n")
        assert status_of(read_all(sock)) == 431
    assert rejected(server)["headers_too_large"] == 2
    # Within the limit, all is well.
    with connect(server.port) as sock:
        sock.sendall(GET + b"X-Fine: " + b"c" * 3000 + b"\r\nConnection: close\r\n\r\n")
        assert status_of(read_all(sock)) == 200


def test_too_many_headers_and_too_long_a_request_line(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = serve(make_server, max_headers=10, max_request_line=100)
    with connect(server.port) as sock:
        sock.sendall(GET + b"".join(b"X-%d: 1\r\n" % i for i in range(11)) + b"\r\n")
        reply = read_all(sock)
    assert status_of(reply) == 431
    assert detail_of(reply) == "more than 10 header fields"
    # Unfinished, many tiny ones: refused as they arrive, not kept until the headers end.
    with connect(server.port) as sock:
        sock.sendall(GET + b"".join(b"X-%d: 1\r\n" % i for i in range(50)))
        reply = read_all(sock)
    assert status_of(reply) == 431
    assert detail_of(reply) == "more than 10 header fields"
    with connect(server.port) as sock:
        sock.sendall(b"GET /?" + b"q" * 200 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_all(sock)
    assert status_of(reply) == 414
    assert detail_of(reply) == "the request target is longer than 100 bytes"


def test_a_body_over_the_limit_on_any_route(make_server: Callable[..., CollectorServer]):
    server = serve(make_server, max_body=1000)
    with connect(server.port) as sock:  # declared: refused before the app runs
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        reply = read_all(sock)
    assert status_of(reply) == 413
    assert detail_of(reply) == "the body is larger than the limit of 1000 bytes"
    # Chunked to a route that never reads it: answered, then closed past the limit.
    with connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
        sent = send_all(sock, chunk * 100)
        read_all(sock)
    assert sent < 100 * len(chunk)
    # Trailers after the last chunk (httptools buffers a header whole): bounded too.
    with connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
        sent = send_all(sock, b"X-Trailer: " + b"t" * (50 * 2**20))
        read_all(sock)
    assert sent < 20 * 2**20
    assert wait_until(lambda: rejected(server).get("too_large") == 3)


def test_slow_headers_get_a_408_and_silent_connections_are_closed(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = serve(make_server, header_timeout=0.5)
    started = time.monotonic()
    with connect(server.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        reply = read_all(sock)
    assert status_of(reply) == 408
    assert detail_of(reply) == "the request headers took longer than 0.5 s"
    with connect(server.port) as sock:
        assert read_all(sock) == b""  # connected, sent nothing: closed without a word
    assert time.monotonic() - started < DEADLINE
    assert wait_until(lambda: rejected(server) == {"timeout": 1, "idle": 1})


def test_a_slow_body_gets_a_408(make_server: Callable[..., CollectorServer]) -> None:
    server = serve(make_server, body_timeout=0.5)
    target = (
        f"/api/{server.default_project.id}/store/?sentry_key={server.default_project.public_key}"
    )
    with connect(server.port) as sock:
        sock.sendall(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode())
        sock.sendall(b"{")
        reply = read_all(sock)
    assert status_of(reply) == 408
    assert detail_of(reply) == "the request body took longer than 0.5 s"


def test_idle_keep_alive_connections_are_closed(make_server: Callable[..., CollectorServer]):
    server = serve(make_server, keep_alive_timeout=1)
    with connect(server.port) as sock:
        sock.sendall(GET + b"\r\n")
        reply = read_all(sock)  # the answer, then the close after a second idle
    assert status_of(reply) == 200
    assert reply.count(b"HTTP/1.1") == 1


def test_the_header_timeout_restarts_with_each_request_on_a_connection(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = serve(make_server, header_timeout=1.0, keep_alive_timeout=30)
    with connect(server.port) as sock:
        sock.sendall(GET + b"\r\n")
        first = sock.recv(65536)
        assert status_of(first) == 200
        time.sleep(1.5)  # idle between requests is the keep-alive's business, not this timeout
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request, never finished
        reply = first + read_all(sock)
    assert reply.count(b"HTTP/1.1 200 OK") == 1
    assert b"HTTP/1.1 408 Request Timeout" in reply


def test_an_upgrade_request_is_answered_as_plain_http(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = serve(make_server)
    with connect(server.port) as sock:
        upgrade = b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        sock.sendall(GET + upgrade)
        assert status_of(sock.recv(65536)) == 200


def test_keep_alive_and_pipelined_requests_still_work(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = serve(make_server, header_timeout=5, max_header_bytes=4096)
    with connect(server.port) as sock:
        sock.sendall(GET + b"\r\n" + GET + b"\r\n" + GET + b"Connection: close\r\n\r\n")
        reply = read_all(sock)
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert rejected(server) == {}
    # A second request in the same chunk as the first, its headers over the limit: the count
    # restarts within the chunk, and the headers are still measured.
    many = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 90) for i in range(60))
    with connect(server.port) as sock:
        sock.sendall(GET + b"\r\n" + GET + many + b"\r\n")
        assert b"HTTP/1.1 431 " in read_all(sock)
    assert rejected(server) == {"headers_too_large": 1}


def test_connections_over_the_limit_get_a_fast_503(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = serve(make_server, max_connections=3)
    idle = [connect(server.port) for _ in range(3)]
    try:
        # Connections are accepted in order: wait until the three are in.
        assert wait_until(lambda: len(server._server.server_state.connections) == 3)
        with connect(server.port) as sock:
            sock.sendall(GET + b"\r\n")
            reply = read_all(sock)
        assert status_of(reply) == 503
        assert b"retry-after: 1" in reply
        assert detail_of(reply).startswith("the collector has too many open connections")
    finally:
        for sock in idle:
            sock.close()
    assert wait_until(lambda: len(server._server.server_state.connections) == 0)
    with connect(server.port) as sock:
        sock.sendall(GET + b"Connection: close\r\n\r\n")
        assert status_of(read_all(sock)) == 200
    assert rejected(server)["too_many_connections"] == 1


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_malformed_requests_get_a_400_and_a_throttled_warning(
    make_server: Callable[..., CollectorServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(make_server)
    monkeypatch.setattr(limits, "_malformed", LogThrottle(interval=3600))
    handler = ListHandler()
    uvicorn_log = logging.getLogger("uvicorn.error")  # it does not propagate to the root
    uvicorn_log.addHandler(handler)
    try:
        for _ in range(20):
            with connect(server.port) as sock:
                sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                reply = read_all(sock)
            assert status_of(reply) == 400
            assert detail_of(reply) == "invalid HTTP request"
    finally:
        uvicorn_log.removeHandler(handler)
    # Before: uvicorn warned once per malformed request.
    assert [r.getMessage() for r in handler.records] == [
        "invalid HTTP request: Invalid method encountered"
    ]
    assert rejected(server)["malformed"] == 20


def test_log_throttle_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(interval=1.0, clock=lambda: now[0])
    log = logging.getLogger("selfreport.collector")
    with caplog.at_level(logging.INFO, logger="selfreport.collector"):
        for _ in range(5):
            throttle.log(log, logging.ERROR, "failed: %s", "x")
        now[0] = 1.5
        throttle.log(log, logging.ERROR, "failed: %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "failed: x",
        "failed: y (4 similar lines left out)",
    ]


def test_throttle_filter_passes_info_and_one_warning_a_second() -> None:
    throttle = ThrottleFilter(interval=3600)

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, __file__, 1, "msg", None, None)

    assert all(throttle.filter(record(logging.INFO)) for _ in range(5))
    assert throttle.filter(record(logging.ERROR))
    assert not any(throttle.filter(record(logging.WARNING)) for _ in range(5))
    throttle.throttle._next = 0.0
    passed = record(logging.ERROR)
    assert throttle.filter(passed)
    assert passed.getMessage() == "msg (5 similar lines left out)"


def test_uvicorn_logs_are_throttled_only_while_a_collector_runs(
    make_server: Callable[..., CollectorServer],
) -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")

    def throttled() -> Optional[bool]:
        return any(isinstance(f, ThrottleFilter) for f in uvicorn_log.filters)

    server = make_server()
    assert throttled()
    server.stop()
    assert not throttled()


def test_accept_failures_are_one_line_a_second(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(limits, "_accept_failures", LogThrottle(interval=3600))
    loop = asyncio.new_event_loop()
    try:
        failure = {
            "message": "socket.accept() out of system resource",
            "exception": OSError(24, "Too many open files"),
        }
        with caplog.at_level(logging.ERROR):
            for _ in range(2048):  # what asyncio's accept loop reports each second
                loop_exception_handler(loop, failure)
            loop_exception_handler(loop, {"message": "something else"})
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("cannot accept connections: [Errno 24] Too many open files")
    assert lines[1] == "something else"  # anything else: asyncio's default handler
