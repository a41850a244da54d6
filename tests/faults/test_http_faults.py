"""Hostile clients on loopback: floods, slow clients, idle connections against a low ulimit."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.collector.conftest import (
    DEADLINE,
    connect,
    envelope,
    make_event,
    read_all,
    send_all,
    status_of,
)

from selfreport.collector.limits import HttpLimits
from selfreport.collector.server import CollectorServer

MiB = 2**20


def ingest_path(server: CollectorServer, kind: str = "envelope") -> str:
    project = server.default_project
    return f"/api/{project.id}/{kind}/?sentry_key={project.public_key}"


def request(port: int, method: str, path: str, body: Optional[bytes] = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# --- size floods --------------------------------------------------------------------------


def test_header_flood_is_refused_with_bounded_memory(make_server: Callable[..., CollectorServer]):
    # Before: one 100 MiB header was accepted with a 200; ten took the collector to 1.1 GiB.
    server = make_server()
    flood_request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * (100 * MiB)
    replies: list[bytes] = []
    sent: list[int] = []

    def flood() -> None:
        with connect(server.port) as sock:
            sent.append(send_all(sock, flood_request))
            replies.append(read_all(sock))

    tracemalloc.start()
    try:
        threads = [threading.Thread(target=flood) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE * 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [status_of(r) for r in replies] == [431] * 10
    assert max(sent) < 20 * MiB  # the server stopped reading at the limit (plus socket buffers)
    assert peak < 20 * MiB  # the test's own 100 MiB header is allocated before tracing starts
    assert request(server.port, "GET", "/health") == 200


def test_body_flood_is_refused_on_ingestion_and_elsewhere(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = make_server(max_body=MiB)
    chunk = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
    for path in (ingest_path(server), "/", "/health"):
        with connect(server.port) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            sent = send_all(sock, head.encode() + chunk * 1600)  # 100 MiB, never all read
            reply = read_all(sock)
        assert sent < 20 * MiB
        assert status_of(reply) in (413, 405, 200)  # what the route answered, then closed
    # Declared too large: refused from the headers, the body never read.
    with connect(server.port) as sock:
        head = f"POST {ingest_path(server)} HTTP/1.1\r\nHost: x\r\nContent-Length: {100 * MiB}"
        sock.sendall(head.encode() + b"\r\n\r\n")
        assert status_of(read_all(sock)) == 413
    # A gzip bomb within the wire limit is refused as it inflates.
    bomb = gzip.compress(b"[" + b" " * (50 * MiB) + b"]")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
    conn.request("POST", ingest_path(server, "store"), bomb, {"Content-Encoding": "gzip"})
    assert conn.getresponse().status == 413
    conn.close()
    assert request(server.port, "GET", "/health") == 200


# --- slow and idle clients ----------------------------------------------------------------


def wait_closed(socks: list[socket.socket], timeout: float) -> int:
    """Wait until the server closed every socket (EOF or reset); how many it did."""
    # A selector, not select.select: in a full run this process holds more than FD_SETSIZE
    # (1024) descriptors, which select() refuses.
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        left = len(socks)
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 408"):
                    selector.unregister(sock)
                    left -= 1
    return len(socks) - left


def test_slowloris_connections_are_closed_within_the_header_timeout(
    make_server: Callable[..., CollectorServer],
) -> None:
    # Before: 500 slowloris connections stayed open for the whole minute.
    server = make_server(limits=HttpLimits(header_timeout=2.0))
    socks = [connect(server.port) for _ in range(500)]
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        # Meanwhile, real requests are served.
        assert request(server.port, "GET", "/health") == 200
        for sock in socks[:250]:  # a byte more now and then does not buy time
            sock.sendall(b"X")
        closed = wait_closed(socks, DEADLINE * 2)
        elapsed = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    assert closed == 500
    assert elapsed < 2.0 + 15  # the timeout, plus a loaded machine's slack
    reasons = server.collector.metrics.rejected_by_reason()
    # On a loaded machine a connection's bytes may still be unread when its deadline passes:
    # the server saw nothing, so it counts it idle. Either way each is closed and counted once.
    assert reasons["timeout"] + reasons.get("idle", 0) == 500


def test_slow_bodies_are_closed_within_the_body_timeout(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = make_server(limits=HttpLimits(body_timeout=2.0))
    socks = [connect(server.port) for _ in range(50)]
    try:
        head = f"POST {ingest_path(server)} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        for sock in socks:
            sock.sendall(head.encode() + b"{}\n")
        for sock in socks:
            sock.sendall(b" ")
        assert wait_closed(socks, DEADLINE * 2) == 50
    finally:
        for sock in socks:
            sock.close()
    assert request(server.port, "GET", "/health") == 200


# A collector in its own process, with a file limit and its log on stderr.
RUNNER = """
import json, logging, resource, sys
logging.basicConfig(level=logging.INFO)
from selfreport.collector.limits import HttpLimits
from selfreport.collector.server import CollectorServer

options = json.loads(sys.argv[2])
nofile = options.pop("nofile", None)
if nofile:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

def boom(event, project):
    if event.get("boom"):
        raise RuntimeError("boom " + "x" * 2000)
    return event

server = CollectorServer(
    sys.argv[1], self_report=False, log_level="info", limits=HttpLimits(**options),
    processors=[boom],
)
print(json.dumps({"port": server.port, "key": server.default_project.public_key}), flush=True)
server.run()
"""


class Subprocess:
    def __init__(self, process: subprocess.Popen[bytes], port: int, key: str, log: Path) -> None:
        self.process = process
        self.port = port
        self.key = key
        self.log = log

    def path(self, kind: str = "envelope") -> str:
        return f"/api/1/{kind}/?sentry_key={self.key}"


@pytest.fixture
def subprocess_server(tmp_path: Path) -> Iterator[Callable[..., Subprocess]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(**options: Any) -> Subprocess:
        log = tmp_path / f"collector{len(started)}.log"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(tmp_path / "data"), json.dumps(options)],
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, log.read_text()
        info = json.loads(line)
        return Subprocess(process, info["port"], info["key"], log)

    yield start
    for process in started:
        if process.stdout is not None:
            process.stdout.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - only when the test failed
            process.kill()
            process.wait()


def test_idle_connections_beyond_the_file_limit_are_reaped(
    subprocess_server: Callable[..., Subprocess],
) -> None:
    # Before: with the file limit reached by idle half-requests, every real request timed out.
    server = subprocess_server(nofile=256, header_timeout=2.0)
    socks = []
    try:
        for _ in range(400):  # more than the collector can hold open
            sock = connect(server.port)
            sock.sendall(b"GET / HTTP/1.1\r\n")
            socks.append(sock)
        started = time.monotonic()
        # Accepted once the idle ones ahead of it in the backlog have been reaped.
        assert request(server.port, "GET", "/health") == 200
        assert time.monotonic() - started < DEADLINE
        assert wait_closed(socks, DEADLINE * 2) == 400
    finally:
        for sock in socks:
            sock.close()
    assert request(server.port, "GET", "/health") == 200
    assert server.process.poll() is None
    # accept() failing with EMFILE: asyncio retries after a second, and reported it once per
    # pending connection, with a traceback (8,000 of them in 10 s); now a line a second.
    log = server.log.read_bytes()
    assert log.count(b"cannot accept connections: [Errno 24] Too many open files") >= 1
    assert log.count(b"\n") < 3 * (time.monotonic() - started) + 20
    assert b"Traceback" not in log


BAD_ENVELOPES = [
    b"[" * 5000 + b"]" * 5000 + b"\n",  # nested past the limit: was a RecursionError, a 500
    b'{"event_id": "\\ud800"}\n',  # a lone surrogate in the header
    b'{"dsn": "http://k\\udfff@h/1"}\n',
    b"{}\n" + b"{" * 3000 + b"\n",  # an item header nested too deep
    b"{}\n" + b'{"type":"event","length":99999}\n{}',
    b'{}\n{"type":"event"}\n' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"\n",
    b"not json at all",
    b"\xff\xfe\n",
]


def test_a_flood_of_bad_envelopes_grows_the_log_by_a_bounded_amount(
    subprocess_server: Callable[..., Subprocess],
) -> None:
    # Before: each bad envelope could be a 500 with a 2.3 KB traceback: 24 MiB in 10 s.
    server = subprocess_server()
    statuses: list[int] = []
    lock = threading.Lock()

    def flood() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
        try:
            for _ in range(25):
                for body in BAD_ENVELOPES:
                    conn.request("POST", "/api/1/envelope/", body)  # no key at all
                    response = conn.getresponse()
                    response.read()
                    with lock:
                        statuses.append(response.status)
                # Authenticated events that fail inside the collector: 500s, logged throttled.
                conn.request("POST", server.path("store"), b'{"boom": true}')
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses.append(response.status)
        finally:
            conn.close()

    before = server.log.stat().st_size
    started = time.monotonic()
    threads = [threading.Thread(target=flood) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE * 6)
    elapsed = time.monotonic() - started
    assert len(statuses) == 8 * 25 * (len(BAD_ENVELOPES) + 1)
    assert statuses.count(500) == 8 * 25  # the boom events, and nothing else
    assert all(400 <= status < 500 for status in statuses if status != 500)
    grown = server.log.stat().st_size - before
    # One line a second at most (plus the count of those left out), each short.
    assert grown < (elapsed + 2) * 600
    assert b"Traceback" not in server.log.read_bytes()


# --- garbage ------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _line(value: Any) -> bytes:
    return json.dumps(value).encode()


_envelopes = st.one_of(
    st.binary(max_size=2000),
    st.builds(
        lambda header, items: b"\n".join([_line(header), *items]),
        _json_values,
        st.lists(
            st.one_of(
                st.builds(_line, _json_values),
                st.builds(
                    lambda kind, payload, length: b"\n".join(
                        [_line({"type": kind, "length": length}), payload]
                    ),
                    st.sampled_from(["event", "attachment", "session", "transaction", "x"]),
                    st.binary(max_size=200) | st.builds(_line, _json_values),
                    st.none() | st.integers(min_value=-1, max_value=300),
                ),
                st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
            ),
            max_size=4,
        ),
    ),
    st.builds(
        lambda depth, kind: kind[0] * depth + kind[1] * depth,
        st.integers(min_value=100, max_value=3000),
        st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b"[{}, [", b"]]")]),
    ),
)


def test_garbage_envelopes_never_get_a_5xx(make_server: Callable[..., CollectorServer]) -> None:
    server = make_server()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)

    @settings(
        max_examples=int(os.environ.get("SELFREPORT_FAULT_EXAMPLES", "300")),
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        body=_envelopes, authenticated=st.booleans(), kind=st.sampled_from(["envelope", "store"])
    )
    def post(body: bytes, authenticated: bool, kind: str) -> None:
        path = ingest_path(server, kind) if authenticated else f"/api/1/{kind}/"
        conn.request("POST", path, body)
        response = conn.getresponse()
        response.read()
        assert response.status < 500, (body[:200], response.status)
        if response.getheader("connection") == "close":
            conn.close()

    try:
        post()
        # Whatever got stored renders, in the pages and the API.
        for issue in server.storage.issues(limit=100):
            assert request(server.port, "GET", f"/issues/{issue.id}") == 200
            assert request(server.port, "GET", f"/api/0/issues/{issue.id}/") == 200
    finally:
        conn.close()


def test_lone_surrogates_are_stored_replaced_and_render(
    make_server: Callable[..., CollectorServer],
) -> None:
    # Before: a 500 when the SQLite insert (or the JSON reply) met the surrogate.
    server = make_server()
    event = make_event(exception=None, message="cut \ud83d", environment="\udc00prod")
    for body, kind in ((json.dumps(event).encode(), "store"), (envelope(event), "envelope")):
        assert request(server.port, "POST", ingest_path(server, kind), body) == 200
    issue = server.storage.issues()[0]
    assert issue.title == "cut \ufffd"
    assert request(server.port, "GET", f"/issues/{issue.id}") == 200
    assert request(server.port, "GET", f"/api/0/issues/{issue.id}/") == 200
