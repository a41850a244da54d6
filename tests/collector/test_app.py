"""The app as a whole, served by uvicorn: health, metrics, routing, errors, lifespan."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import uvicorn
from tests.conftest import wait_until

from selfreport import Client
from selfreport.collector.app import _answer_500_on_error, create_app
from selfreport.collector.limits import LogThrottle
from selfreport.collector.storage import Storage

Event = dict[str, Any]


def test_health_is_200_with_every_check(target: Any) -> None:
    reply = target.get("/health")
    assert reply.status == 200
    assert reply.headers["cache-control"] == "no-store"
    body = reply.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {
        "storage_writable",
        "writer_alive",
        "queue_below_threshold",
        "disk_space",
    }
    assert all(check["ok"] for check in body["checks"].values())
    assert body["checks"]["queue_below_threshold"]["detail"] == "0 writes waiting (threshold 8000)"


def test_health_is_503_when_storage_fails(target: Any) -> None:
    target.server.storage.close()
    reply = target.get("/health")
    assert reply.status == 503
    checks = reply.json()["checks"]
    assert reply.json()["status"] == "fail"
    assert checks["writer_alive"] == {
        "ok": False,
        "detail": "the storage writer thread is not running",
        "duration_ms": checks["writer_alive"]["duration_ms"],
    }
    assert "storage is closed" in checks["storage_writable"]["detail"]
    assert checks["disk_space"]["ok"]


def test_health_checks_the_upstream_when_forwarding(storage: Storage, tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    app = create_app(storage, upstream=f"http://key@127.0.0.1:{port}/1")
    assert "upstream_reachable" in app.collector.health.names
    ok, checks = asyncio.run(app.collector.health.run())
    assert not ok
    assert checks["upstream_reachable"]["detail"].startswith(f"cannot connect to 127.0.0.1:{port}")


def test_metrics_expose_ingestion_and_the_reporter(
    target: Any, make_event: Callable[..., Event]
) -> None:
    body = json.dumps(make_event()).encode()
    assert target.send(body, kind="store").status == 200
    assert target.send(body, kind="store").status == 200  # a duplicate
    assert target.send(b"{", kind="store").status == 400
    reply = target.get("/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.text
    assert "selfreport_collector_events_received_total 3.0" in text  # the bad one too
    assert "selfreport_collector_events_stored_total 1.0" in text
    assert "selfreport_collector_events_duplicate_total 1.0" in text
    assert 'selfreport_collector_rejected_total{reason="malformed"} 1.0' in text
    assert "selfreport_collector_processing_seconds_count 2.0" in text
    assert "selfreport_collector_writer_up 1.0" in text
    assert "selfreport_collector_write_queue 0.0" in text
    assert 'selfreport_reporter_events_total{outcome="sent"} 0.0' in text
    assert "selfreport_reporter_queue_size 0.0" in text


def test_errors_in_pages_are_500_in_the_right_format(target: Any) -> None:
    target.server.storage.close()  # every read now raises
    page = target.get("/")
    assert page.status == 500
    assert page.headers["content-type"].startswith("text/html")
    assert "Internal error" in page.text
    api = target.get("/api/0/issues/")
    assert api.status == 500
    assert api.json()["detail"].startswith("internal error")


def test_an_explicit_reporter_is_consulted(storage: Storage) -> None:
    reporter = Client(None)
    try:
        app = create_app(storage, reporter=reporter)
        assert app.collector.reporter_stats() == reporter.stats()
    finally:
        reporter.close()


def test_the_lifespan_closes_the_storage_when_asked(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "l.db")
    storage.ensure_defaults()
    app = create_app(storage, close_storage=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    assert wait_until(lambda: server.started)
    assert storage.writer_alive
    server.should_exit = True
    thread.join(10)
    sock.close()
    assert not storage.writer_alive
    with pytest.raises(Exception, match="closed"):
        storage.issues()


@pytest.mark.asyncio
async def test_failures_are_answered_and_logged_once_a_second_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: each failure was re-raised, and uvicorn logged a 2 KB traceback per request.
    sent: list[dict[str, Any]] = []
    errors = LogThrottle(interval=3600)

    async def send(message: Any) -> None:
        sent.append(message)

    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("after the start")

    async def early(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("before the start " + "x" * 5000)

    scope = {"method": "POST", "path": "/api/1/store/"}
    with caplog.at_level(logging.ERROR, logger="selfreport.collector"):
        await _answer_500_on_error(early, scope, None, send, errors)  # type: ignore[arg-type]
        assert sent[0]["status"] == 500
        assert json.loads(sent[1]["body"])["detail"].startswith("internal error")
        sent.clear()
        for _ in range(50):
            await _answer_500_on_error(half, scope, None, send, errors)  # type: ignore[arg-type]
    assert [m.get("status") for m in sent] == [200] * 50  # no 500 after a started answer
    lines = [r for r in caplog.records if r.name == "selfreport.collector"]
    assert len(lines) == 1
    assert lines[0].exc_info is None
    message = lines[0].getMessage()
    assert message.startswith("POST /api/1/store/ failed: RuntimeError: before the start")
    assert len(message) < 400
