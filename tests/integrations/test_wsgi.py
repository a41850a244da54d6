"""The WSGI middleware under a real wsgiref server, reporting to a real HTTP endpoint."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

import selfreport
from selfreport import Client
from selfreport._delivery.transport import ORIGIN_HEADER, origin_value
from selfreport.integrations.wsgi import SelfreportWSGIMiddleware, request_info
from selfreport.testing import FakeCollector

FAST = {"retry_backoff": 0.0, "rate_limit": 0, "dedupe_window": 0, "http_timeout": 2.0}
StartResponse = Callable[..., Any]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Served:
    def __init__(self, app: Any) -> None:
        self.server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
        self.port = self.server.server_port
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def get(self, path: str, headers: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Body:
    """A response body that records whether it ran in the reporting path, and may fail."""

    def __init__(self, fail: bool, log: list[str]) -> None:
        self.fail = fail
        self.log = log

    def __iter__(self) -> Iterator[bytes]:
        self.log.append(f"iter reporting={selfreport.is_reporting()}")
        yield b"part one;"
        if self.fail:
            raise RuntimeError("failed while streaming")
        yield b"part two"

    def close(self) -> None:
        self.log.append(f"close reporting={selfreport.is_reporting()}")


def make_app(log: list[str]) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        log.append(f"app reporting={selfreport.is_reporting()}")
        if path == "/crash":
            environ["selfreport.route"] = "/crash"
            raise LookupError("no such thing")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body(fail=path == "/stream-crash", log=log)

    return app


@pytest.fixture
def fake() -> Iterator[FakeCollector]:
    with FakeCollector() as collector:
        yield collector


@pytest.fixture
def client(fake: FakeCollector) -> Iterator[Client]:
    reporter = Client(fake.dsn, **FAST)
    yield reporter
    reporter.close(timeout=2.0)


@pytest.fixture
def log() -> list[str]:
    return []


@pytest.fixture
def served(client: Client, log: list[str]) -> Iterator[Served]:
    app = Served(SelfreportWSGIMiddleware(make_app(log), client=client))
    yield app
    app.stop()


def test_a_crashing_request_is_reported_once_with_its_context(
    served: Served, client: Client, fake: FakeCollector
) -> None:
    status, _ = served.get("/crash?api_key=k&x=1", {"Cookie": "a=b", "X-Trace": "t1"})
    assert status == 500
    assert client.flush(5)
    time.sleep(0.2)
    assert len(fake.events) == 1
    event = fake.events[0]
    exception = event["exception"]["values"][-1]
    assert exception["type"] == "LookupError"
    assert exception["mechanism"] == {"type": "wsgi", "handled": False}
    request = event["request"]
    assert request["method"] == "GET"
    assert request["url"] == f"http://127.0.0.1:{served.port}/crash?api_key=[Filtered]&x=1"
    assert event["transaction"] == event["tags"]["route"] == "/crash"
    assert request["headers"]["cookie"] == "[Filtered]"
    assert request["headers"]["x-trace"] == "t1"


def test_an_error_while_streaming_the_body_is_reported(
    served: Served, client: Client, fake: FakeCollector, log: list[str]
) -> None:
    status, body = served.get("/stream-crash")
    assert (status, body) == (200, b"part one;")  # the server cuts the response short
    assert client.flush(5)
    time.sleep(0.2)
    assert [e["exception"]["values"][-1]["value"] for e in fake.events] == [
        "failed while streaming"
    ]
    assert "close reporting=False" in log


def test_a_good_request_streams_and_closes(served: Served, log: list[str]) -> None:
    assert served.get("/ok") == (200, b"part one;part two")
    assert log == ["app reporting=False", "iter reporting=False", "close reporting=False"]


def test_own_reports_run_in_the_reporting_path_body_included(
    served: Served, client: Client, fake: FakeCollector, log: list[str]
) -> None:
    assert client.dsn is not None
    own = {ORIGIN_HEADER: origin_value(client.dsn)}
    assert served.get("/ok", own) == (200, b"part one;part two")
    assert log == ["app reporting=True", "iter reporting=True", "close reporting=True"]
    assert served.get("/crash", own)[0] == 500
    client.flush(2)
    assert fake.events == []
    assert client.stats()["dropped_reentrant"] >= 1


def test_the_global_client_is_used_by_default(fake: FakeCollector, log: list[str]) -> None:
    selfreport.init(fake.dsn, install_hooks=False, logging_level=None, **FAST)
    served = Served(SelfreportWSGIMiddleware(make_app(log)))
    try:
        own = {ORIGIN_HEADER: f"{fake.project_id}:{fake.public_key}"}
        served.get("/ok", own)
        assert log[0] == "app reporting=True"
        assert served.get("/crash")[0] == 500
        assert selfreport.flush(5)
        assert len(fake.events) == 1
    finally:
        served.stop()


def test_bodies_without_close_and_failing_close(client: Client, fake: FakeCollector) -> None:
    class Closing:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"x"])

        def close(self) -> None:
            raise OSError("close failed")

    def plain(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"a", b"b"]

    def closing(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Closing()

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "h", "SERVER_PORT": "80"}
    body = SelfreportWSGIMiddleware(plain, client=client)(environ, lambda *a: None)
    assert list(body) == [b"a", b"b"]
    body.close()  # type: ignore[attr-defined]
    body = SelfreportWSGIMiddleware(closing, client=client)(environ, lambda *a: None)
    assert list(body) == [b"x"]
    with pytest.raises(OSError, match="close failed"):
        body.close()  # type: ignore[attr-defined]
    assert client.flush(5)
    assert [e["exception"]["values"][-1]["type"] for e in fake.events] == ["OSError"]


def test_request_info_from_a_bare_environ() -> None:
    environ = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "/app",
        "PATH_INFO": "/a b",
        "QUERY_STRING": "",
        "SERVER_NAME": "example.org",
        "SERVER_PORT": "8443",
        "wsgi.url_scheme": "https",
        "CONTENT_TYPE": "text/plain",
        "CONTENT_LENGTH": "",
    }
    info = request_info(environ, {"content-type": "text/plain"})
    assert info == {
        "method": "POST",
        "url": "https://example.org:8443/app/a%20b",
        "headers": {"content-type": "text/plain"},
    }


def scoped_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    selfreport.set_tag("request", path)
    selfreport.set_user({"id": path})
    selfreport.add_breadcrumb(f"handling {path}")
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body() -> Iterator[bytes]:
        selfreport.add_breadcrumb(f"streaming {path}")
        yield b"part one;"
        if path.startswith("/crash"):
            raise RuntimeError(f"failed {path}")

    return body()


def test_each_request_has_its_own_scope_body_iteration_included(
    client: Client, fake: FakeCollector
) -> None:
    # wsgiref serves every request on one thread: without a scope per request they would leak.
    app = Served(SelfreportWSGIMiddleware(scoped_app, client=client))
    try:
        for path in ("/crash-a", "/fine", "/crash-b"):
            app.get(path)
    finally:
        app.stop()
    assert client.flush(10)
    assert fake.wait_for(2)
    for event in fake.events:
        path = event["tags"]["request"]
        assert event["exception"]["values"][-1]["value"] == f"failed {path}"
        assert event["user"] == {"id": path}
        messages = [c["message"] for c in event["breadcrumbs"]["values"]]
        assert messages == [f"handling {path}", f"streaming {path}"]
    assert sorted(e["tags"]["request"] for e in fake.events) == ["/crash-a", "/crash-b"]
