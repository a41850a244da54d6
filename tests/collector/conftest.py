"""Fixtures for the collector's tests: a real database, a real server on 127.0.0.1, HTTP calls."""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import pytest

from selfreport.collector.server import CollectorServer
from selfreport.collector.storage import Storage


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def call(
    port: int,
    method: str,
    path: str,
    body: Optional[bytes] = None,
    headers: Optional[dict[str, str]] = None,
) -> Reply:
    """One real HTTP request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def make_event(**fields: Any) -> dict[str, Any]:
    """A small Sentry event with an exception and one in-app frame."""
    event: dict[str, Any] = {
        "event_id": uuid.uuid4().hex,
        "timestamp": "2026-01-02T03:04:05.000000Z",
        "platform": "python",
        "level": "error",
        "exception": {
            "values": [
                {
                    "type": "ValueError",
                    "value": "bad input",
                    "stacktrace": {
                        "frames": [
                            {
                                "filename": "app/views.py",
                                "function": "handle",
                                "module": "app.views",
                                "lineno": 12,
                                "in_app": True,
                                "pre_context": ["def handle(x):"],
                                "context_line": "    raise ValueError('bad input')",
                                "post_context": [""],
                            }
                        ]
                    },
                }
            ]
        },
    }
    event.update(fields)
    return event


def envelope(*events: dict[str, Any], extra_items: tuple[bytes, ...] = ()) -> bytes:
    """A Sentry envelope carrying ``events`` (and raw extra item lines)."""
    header = {"event_id": events[0]["event_id"]} if events else {}
    lines = [json.dumps(header).encode()]
    for event in events:
        payload = json.dumps(event).encode()
        lines.append(json.dumps({"type": "event", "length": len(payload)}).encode())
        lines.append(payload)
    lines.extend(extra_items)
    return b"\n".join(lines) + b"\n"


class Target:
    """Where to send: a running server and one of its projects."""

    def __init__(self, server: CollectorServer) -> None:
        self.server = server
        self.port = server.port
        self.project = server.default_project

    def auth(self, key: Optional[str] = None) -> dict[str, str]:
        key = key or self.project.public_key
        return {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={key}, sentry_client=t/1"}

    def send(
        self,
        body: bytes,
        *,
        kind: str = "envelope",
        headers: Optional[dict[str, str]] = None,
        project_id: Optional[object] = None,
        query: str = "",
    ) -> Reply:
        pid = self.project.id if project_id is None else project_id
        all_headers = {**self.auth(), **(headers or {})}
        return call(self.port, "POST", f"/api/{pid}/{kind}/{query}", body, all_headers)

    def get(self, path: str) -> Reply:
        return call(self.port, "GET", path)


def api_token(server: CollectorServer, name: str = "tests") -> dict[str, str]:
    """Headers with a new API token of ``server``: they read the pages, the JSON API and
    /metrics once users exist (a collector on 127.0.0.1 with no user is open anyway)."""
    from selfreport.collector.accounts import hash_secret, new_token

    token = new_token()
    server.storage.add_token(name, hash_secret(token))
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    store = Storage(tmp_path / "db" / "selfreport.db")
    store.ensure_defaults()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., CollectorServer]]:
    """Start collectors (no self-reporting unless asked); all are stopped afterwards."""
    servers: list[CollectorServer] = []

    def factory(**options: Any) -> CollectorServer:
        options.setdefault("self_report", False)
        data = tmp_path / f"data{len(servers)}"
        server = CollectorServer(data, **options).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def target(make_server: Callable[..., CollectorServer]) -> Target:
    return Target(make_server())


@pytest.fixture(name="make_event")
def make_event_fixture() -> Callable[..., dict[str, Any]]:
    return make_event


@pytest.fixture(name="envelope_of")
def envelope_fixture() -> Callable[..., bytes]:
    return envelope


@pytest.fixture(name="call")
def call_fixture() -> Callable[..., Reply]:
    """``call(port, method, path, body=None, headers=None) -> Reply`` over real HTTP."""
    return call


@pytest.fixture(name="api_token")
def api_token_fixture() -> Callable[..., dict[str, str]]:
    """``api_token(server, name="tests") -> headers`` with a new API token of ``server``."""
    return api_token


# --- raw sockets, for what http.client would not send -------------------------------------

# Generous on a loaded machine: a test waits for the server, never sleeps a fixed time.
DEADLINE = 20.0


def answers_health(url: str) -> bool:
    """Whether a collector answers ``/health`` at ``url``'s host and port (any status)."""
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=5)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def detail_of(reply: bytes) -> str:
    detail: str = json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]
    return detail


def send_all(sock: socket.socket, data: bytes) -> int:
    """Send ``data`` until the server closes; how many bytes it took."""
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent : sent + 65536])
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent
