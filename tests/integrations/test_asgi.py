"""The ASGI middleware under a real uvicorn, reporting to a real HTTP endpoint."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, Router
from tests.conftest import wait_until

import selfreport
from selfreport import Client
from selfreport._delivery.transport import ORIGIN_HEADER, origin_value
from selfreport.integrations import filter_headers, filter_url, report_request_exception
from selfreport.integrations.asgi import SelfreportMiddleware, request_info
from selfreport.testing import FakeCollector

FAST = {"retry_backoff": 0.0, "rate_limit": 0, "dedupe_window": 0, "http_timeout": 2.0}


class Served:
    """An ASGI app under uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True
        )
        self.thread.start()
        wait_until(lambda: self.server.started, 10)

    def get(self, path: str, headers: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


seen_reporting: list[bool] = []


async def boom(request: Request) -> Response:
    seen_reporting.append(selfreport.is_reporting())
    raise ZeroDivisionError("boom in a view")


async def fine(request: Request) -> Response:
    seen_reporting.append(selfreport.is_reporting())
    return JSONResponse({"reporting": selfreport.is_reporting()})


def make_app(client: Optional[Client]) -> Starlette:
    return Starlette(
        routes=[Route("/items/{item_id}", boom), Route("/fine", fine)],
        middleware=[Middleware(SelfreportMiddleware, client=client)],
    )


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
def served(client: Client) -> Iterator[Served]:
    seen_reporting.clear()
    app = Served(make_app(client))
    yield app
    app.stop()


def test_an_unhandled_exception_is_reported_once_with_the_request(
    served: Served, client: Client, fake: FakeCollector
) -> None:
    status, _ = served.get(
        "/items/42?token=s3cret&page=2",
        {"Authorization": "Bearer abc", "Cookie": "session=xyz", "User-Agent": "tests"},
    )
    assert status == 500
    assert client.flush(5)
    time.sleep(0.2)
    assert len(fake.events) == 1
    event = fake.events[0]
    exception = event["exception"]["values"][-1]
    assert (exception["type"], exception["value"]) == ("ZeroDivisionError", "boom in a view")
    assert exception["mechanism"] == {"type": "asgi", "handled": False}
    request = event["request"]
    assert request["method"] == "GET"
    assert request["url"] == f"http://127.0.0.1:{served.port}/items/42?token=[Filtered]&page=2"
    assert event["transaction"] == event["tags"]["route"] == "/items/{item_id}"
    assert event["tags"]["endpoint"].endswith("test_asgi.boom")
    assert request["headers"]["authorization"] == "[Filtered]"
    assert request["headers"]["cookie"] == "[Filtered]"
    assert request["headers"]["user-agent"] == "tests"
    assert seen_reporting == [False]
    assert client.stats()["sent"] == 1


def test_own_reports_are_processed_in_the_reporting_path(
    served: Served, client: Client, fake: FakeCollector
) -> None:
    assert client.dsn is not None
    own = {ORIGIN_HEADER: origin_value(client.dsn)}
    status, body = served.get("/fine", own)
    assert (status, body) == (200, b'{"reporting":true}')
    status, _ = served.get("/items/1", own)
    assert status == 500
    client.flush(2)
    assert fake.events == []
    assert client.stats()["dropped_reentrant"] >= 1
    assert seen_reporting == [True, True]
    # A report for another project is not ours: processed normally.
    status, body = served.get("/fine", {ORIGIN_HEADER: "999:someone-else"})
    assert body == b'{"reporting":false}'


def test_the_global_client_is_used_by_default(fake: FakeCollector) -> None:
    selfreport.init(fake.dsn, install_hooks=False, logging_level=None, **FAST)
    served = Served(make_app(None))
    try:
        assert served.get("/items/7")[0] == 500
        own = {ORIGIN_HEADER: f"{fake.project_id}:{fake.public_key}"}
        assert served.get("/fine", own)[1] == b'{"reporting":true}'
        assert selfreport.flush(5)
        assert len(fake.events) == 1
    finally:
        served.stop()


@pytest.mark.asyncio
async def test_other_scopes_pass_through_untouched() -> None:
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["type"])

    middleware = SelfreportMiddleware(app)
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert calls == ["lifespan"]


def test_request_info_without_host_header_and_websockets() -> None:
    scope = {
        "type": "websocket",
        "scheme": "ws",
        "server": ("10.0.0.1", 8080),
        "root_path": "/base",
        "path": "/socket",
        "query_string": b"",
        "endpoint": boom,
    }
    info = request_info(scope, {})
    assert info["method"] == "WEBSOCKET"
    assert info["url"] == "ws://10.0.0.1:8080/base/socket"
    assert "route" not in info
    assert request_info({"type": "http"}, {})["url"] == "http://localhost"


def test_the_route_is_found_by_matching_when_starlette_does_not_record_it() -> None:
    # Starlette before 1.0 (all there is for Python 3.9) leaves scope["route"] unset.
    router = Router(
        routes=[Route("/fine", fine), Mount("/api", routes=[Route("/items/{item_id}", boom)])]
    )
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/api/items/3"}
    scope["router"] = router
    assert request_info(scope, {})["route"] == "/items/{item_id}"
    assert request_info({**scope, "path": "/fine"}, {})["route"] == "/fine"
    assert "route" not in request_info({**scope, "path": "/nowhere"}, {})

    class Foreign:
        routes = [object()]  # no matches(): the event goes out without a route

    assert "route" not in request_info({**scope, "router": Foreign()}, {})


def test_filters() -> None:
    headers = filter_headers(
        [("X-Api-Key", "k"), ("X-CSRF-Token", "t"), ("Accept", "*/*"), ("Proxy-Authorization", "p")]
    )
    assert headers == {
        "X-Api-Key": "[Filtered]",
        "X-CSRF-Token": "[Filtered]",
        "Accept": "*/*",
        "Proxy-Authorization": "[Filtered]",
    }
    assert filter_url("https://bob:pw@example.com/a?password=x&q=1") == (
        "https://bob:[Filtered]@example.com/a?password=[Filtered]&q=1"
    )
    assert filter_url("https://bob@example.com/a") == "https://bob@example.com/a"
    assert filter_url("http://[::1/") == "[Filtered]"


def test_reporting_never_raises_and_needs_a_client() -> None:
    assert report_request_exception(ValueError("x"), {}, mechanism="asgi") is None  # no client
    reporter = Client(None)
    assert (
        report_request_exception(KeyboardInterrupt(), {}, mechanism="asgi", client=reporter) is None
    )
    reporter.close()


async def scoped(request: Request) -> Response:
    n = request.path_params["n"]
    selfreport.set_tag("request", n)
    selfreport.set_user({"id": n})
    selfreport.add_breadcrumb(f"handling {n}")
    await asyncio.sleep(0.01)  # concurrent requests interleave here
    raise KeyError(f"request {n}")


def test_concurrent_requests_each_carry_only_their_own_scope(
    client: Client, fake: FakeCollector
) -> None:
    app = Served(
        Starlette(
            routes=[Route("/scoped/{n}", scoped)],
            middleware=[Middleware(SelfreportMiddleware, client=client)],
        )
    )
    try:
        threads = [threading.Thread(target=app.get, args=(f"/scoped/{n}",)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        app.stop()
    assert client.flush(10)
    assert fake.wait_for(20)
    for event in fake.events:
        n = event["tags"]["request"]
        assert event["exception"]["values"][-1]["value"] == f"'request {n}'"
        assert event["user"] == {"id": n}
        assert [c["message"] for c in event["breadcrumbs"]["values"]] == [f"handling {n}"]


@pytest.mark.asyncio
async def test_requests_run_in_one_task_do_not_share_a_scope(
    client: Client, fake: FakeCollector
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/first":
            selfreport.set_tag("first", "yes")
            selfreport.add_breadcrumb("first")
        raise RuntimeError(scope["path"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    middleware = SelfreportMiddleware(app, client=client)
    for path in ("/first", "/second"):
        request = {"type": "http", "method": "GET", "path": path, "headers": []}
        with pytest.raises(RuntimeError):
            await middleware(request, receive, send)
    assert client.flush(10)
    assert fake.wait_for(2)
    by_path = {e["exception"]["values"][-1]["value"]: e for e in fake.events}
    assert by_path["/first"]["tags"]["first"] == "yes"
    assert "first" not in by_path["/second"].get("tags", {})
    assert "breadcrumbs" not in by_path["/second"]
