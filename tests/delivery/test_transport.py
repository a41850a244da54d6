"""The HTTP transport against real sockets: headers, gzip, keep-alive, timeouts, serialization."""

from __future__ import annotations

import gzip
import http.client
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import Callable

import pytest
from tests.conftest import closed_port, wait_until

from selfreport import __version__
from selfreport._core.dsn import parse_dsn
from selfreport._delivery.envelope import parse_envelope, serialize_envelope
from selfreport._delivery.transport import (
    ORIGIN_HEADER,
    HttpTransport,
    _extra_origins,
    is_marked_origin,
    origin_value,
    register_origin,
)
from selfreport.testing import FakeCollector

SENT_AT = "2024-01-01T00:00:00.000000Z"


def envelope(message: str = "hello", size: int = 0) -> bytes:
    event = {"event_id": "e" * 32, "message": message, "padding": "p" * size}
    return serialize_envelope(event, None, SENT_AT)


@pytest.fixture
def transport(collector: FakeCollector) -> Iterator[HttpTransport]:
    sender = HttpTransport(parse_dsn(collector.dsn), clock=lambda: 1700000000.0)
    yield sender
    sender.close()


# --- the origin mark -----------------------------------------------------------------------


def test_origin_value_names_project_and_key() -> None:
    assert origin_value(parse_dsn("http://pub@h/42")) == "42:pub"


@pytest.mark.parametrize("key", [ORIGIN_HEADER, ORIGIN_HEADER.lower(), ORIGIN_HEADER.upper()])
def test_marked_origin_is_case_insensitive(key: str) -> None:
    assert is_marked_origin({key: " 1:pub "}, "1:pub")
    assert not is_marked_origin({key: "2:pub"}, "1:pub")
    assert not is_marked_origin({key: "1:pub"}, None)


def test_unmarked_or_broken_headers_are_not_own() -> None:
    class Exploding(dict):  # type: ignore[type-arg]
        def items(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("broken mapping")

    assert not is_marked_origin({}, "1:pub")
    assert not is_marked_origin({"Content-Type": "x"}, "1:pub")
    assert not is_marked_origin(Exploding(), "1:pub")


def test_registered_origins_count_as_own() -> None:
    value = register_origin(parse_dsn("http://other@h/99"))
    try:
        assert value == "99:other"
        assert is_marked_origin({ORIGIN_HEADER: "99:other"}, "1:pub")
        assert is_marked_origin({ORIGIN_HEADER: "99:other"}, None)
    finally:
        _extra_origins.discard(value)


# --- sending to a real collector -----------------------------------------------------------


def test_request_headers_path_and_body(collector: FakeCollector, transport: HttpTransport) -> None:
    response = transport.send(envelope(), timeout=5)
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    (request,) = collector.requests
    assert request.path == "/api/1/envelope/"
    assert request.headers["Content-Type"] == "application/x-sentry-envelope"
    assert request.headers["User-Agent"] == f"selfreport/{__version__}"
    assert request.headers["X-Sentry-Auth"] == (
        f"Sentry sentry_version=7, sentry_client=selfreport/{__version__}, "
        "sentry_key=public, sentry_timestamp=1700000000.000"
    )
    assert request.headers[ORIGIN_HEADER] == "1:public"
    assert "Content-Encoding" not in request.headers  # small bodies are not worth gzip
    assert collector.events[0]["message"] == "hello"


def test_large_bodies_are_gzipped(collector: FakeCollector, transport: HttpTransport) -> None:
    body = envelope(size=5000)
    transport.send(body, timeout=5)
    (request,) = collector.requests
    assert request.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(request.body) == body
    assert len(request.body) < len(body)
    assert request.error is None


def test_gzip_can_be_turned_off(collector: FakeCollector) -> None:
    sender = HttpTransport(parse_dsn(collector.dsn), compress=False)
    try:
        sender.send(envelope(size=5000), timeout=5)
    finally:
        sender.close()
    assert "Content-Encoding" not in collector.requests[0].headers


def test_keep_alive_connection_is_reused(
    collector: FakeCollector, transport: HttpTransport
) -> None:
    for n in range(3):
        assert transport.send(envelope(str(n)), timeout=5).status == 200
    addresses = {request.client_address for request in collector.requests}
    assert len(addresses) == 1
    assert [e["message"] for e in collector.events] == ["0", "1", "2"]


def test_error_status_and_headers_are_returned(
    collector: FakeCollector, transport: HttpTransport
) -> None:
    collector.status = 429
    collector.response_headers = {"Retry-After": "30", "X-Sentry-Rate-Limits": "30:error"}
    response = transport.send(envelope(), timeout=5)
    assert response.status == 429
    assert response.headers["retry-after"] == "30"
    assert response.headers["x-sentry-rate-limits"] == "30:error"


def test_timeout_against_a_blackhole(collector: FakeCollector, transport: HttpTransport) -> None:
    collector.blackhole = True
    started = time.monotonic()
    with pytest.raises(socket.timeout):  # TimeoutError from 3.10 on
        transport.send(envelope(), timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert transport._conn is None  # a timed-out connection is never reused


def test_interrupt_unblocks_a_send_in_progress(
    collector: FakeCollector, transport: HttpTransport
) -> None:
    collector.blackhole = True
    errors: list[BaseException] = []

    def send() -> None:
        try:
            transport.send(envelope(), timeout=30)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=send)
    thread.start()
    assert wait_until(lambda: len(collector.requests) == 1)
    transport.interrupt()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], OSError)


def test_interrupt_without_connection_is_harmless(transport: HttpTransport) -> None:
    transport.interrupt()
    transport.close()
    transport.close()


def test_connection_refused_raises_oserror() -> None:
    sender = HttpTransport(parse_dsn(f"http://k@127.0.0.1:{closed_port()}/1"))
    with pytest.raises(ConnectionRefusedError):
        sender.send(envelope(), timeout=2)


def test_https_to_a_plain_http_server_raises_oserror(collector: FakeCollector) -> None:
    sender = HttpTransport(parse_dsn(f"https://k@127.0.0.1:{collector.port}/1"))
    with pytest.raises(OSError):  # ssl.SSLError is an OSError
        sender.send(envelope(), timeout=2)
    assert sender._connector._ssl_context is not None  # made once, kept for the next send
    sender.close()


def test_reset_after_fork_drops_the_connection_without_closing_it(
    collector: FakeCollector, transport: HttpTransport
) -> None:
    transport.send(envelope(), timeout=5)
    conn = transport._conn
    assert conn is not None
    assert conn.sock is not None
    transport.reset_after_fork()
    assert transport._conn is None
    assert conn.sock is not None  # untouched: the parent still owns that socket
    conn.close()


# --- servers that misbehave ----------------------------------------------------------------


def readable(sock: socket.socket, timeout: float = 30.0) -> bool:
    """Whether ``sock`` has data or end-of-file to read within ``timeout`` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout))


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head


class RawServer:
    """A TCP server on 127.0.0.1 whose ``answer(connection, n)`` scripts each connection."""

    def __init__(self, answer: Callable[[socket.socket, int], None]) -> None:
        self.answer = answer
        self.connections = 0
        self.closed = 0  # connections this side has closed
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def dsn(self) -> str:
        return f"http://k@127.0.0.1:{self._listener.getsockname()[1]}/1"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            self.connections += 1
            with conn:
                try:
                    self.answer(conn, self.connections)
                except OSError:  # the client reset the connection: its business
                    pass
            self.closed += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket, int], None]], RawServer]]:
    servers: list[RawServer] = []

    def start(answer: Callable[[socket.socket, int], None]) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def test_stale_keep_alive_connection_is_retried_at_once(raw_server) -> None:  # type: ignore[no-untyped-def]
    def answer_then_hang_up(conn: socket.socket, n: int) -> None:
        read_request(conn)
        conn.sendall(OK)  # keep-alive by HTTP/1.1 default, yet the server closes right after

    server = raw_server(answer_then_hang_up)
    sender = HttpTransport(parse_dsn(server.dsn))
    try:
        assert sender.send(envelope(), timeout=2).status == 200
        # The pooled connection is idle and the server's close has reached it (its FIN makes
        # the socket readable): the next request goes out on a connection already closed.
        assert wait_until(lambda: server.closed == 1)
        assert sender._conn is not None
        assert readable(sender._conn.sock)
        assert sender.send(envelope(), timeout=2).status == 200
    finally:
        sender.close()
    assert server.connections == 2


def test_fresh_connection_hang_up_is_not_retried(raw_server) -> None:  # type: ignore[no-untyped-def]
    server = raw_server(lambda conn, n: read_request(conn) and None)
    sender = HttpTransport(parse_dsn(server.dsn))
    with pytest.raises(http.client.RemoteDisconnected):
        sender.send(envelope(), timeout=2)
    assert server.connections == 1
    assert sender._conn is None


def test_garbage_response_is_a_connection_error(raw_server) -> None:  # type: ignore[no-untyped-def]
    def garbage(conn: socket.socket, n: int) -> None:
        read_request(conn)
        conn.sendall(b"SPDY/9 what\r\n\r\n")

    server = raw_server(garbage)
    sender = HttpTransport(parse_dsn(server.dsn))
    with pytest.raises(ConnectionError, match="bad HTTP response"):
        sender.send(envelope(), timeout=2)
    assert sender._conn is None


def test_oversized_response_closes_the_connection(raw_server) -> None:  # type: ignore[no-untyped-def]
    big = b"x" * 200_000

    def answer_big(conn: socket.socket, n: int) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        read_request(conn)  # wait until the client hangs up

    server = raw_server(answer_big)
    sender = HttpTransport(parse_dsn(server.dsn))
    try:
        assert sender.send(envelope(), timeout=2).status == 200
        assert sender._conn is None  # not reusable: the rest of the body was never read
        assert sender.send(envelope(), timeout=2).status == 200
    finally:
        sender.close()
    assert server.connections == 2


def test_connection_close_response_is_not_reused(raw_server) -> None:  # type: ignore[no-untyped-def]
    def answer_close(conn: socket.socket, n: int) -> None:
        read_request(conn)
        conn.sendall(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))

    server = raw_server(answer_close)
    sender = HttpTransport(parse_dsn(server.dsn))
    assert sender.send(envelope(), timeout=2).status == 200
    assert sender._conn is None
    assert sender.send(envelope(), timeout=2).status == 200
    assert server.connections == 2


def test_interrupt_racing_a_close_is_harmless(
    collector: FakeCollector, transport: HttpTransport
) -> None:
    transport.send(envelope(), timeout=5)
    assert transport._conn is not None
    assert transport._conn.sock is not None
    transport._conn.sock.close()  # the worker closed it between our look and our shutdown
    transport.interrupt()
    transport.close()


def test_envelope_header_never_carries_the_secret_key() -> None:
    dsn = parse_dsn("https://public:very-secret@example.com/7")
    body = serialize_envelope({"event_id": "a" * 32}, dsn, SENT_AT)
    header = parse_envelope(body).headers
    assert header["dsn"] == "https://public@example.com/7"
    assert b"very-secret" not in body
