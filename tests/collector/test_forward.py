"""Forwarding stored events upstream: scrubbed, only new ones, all or only the collector's own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest

from selfreport import ConfigError, Destination
from selfreport.collector.forward import Forwarder
from selfreport.collector.server import CollectorServer
from selfreport.testing import FakeCollector


@pytest.fixture
def upstream() -> Any:
    with FakeCollector(project_id="42", public_key="vendor") as fake:
        yield fake


def _attach(server: CollectorServer, forwarder: Forwarder) -> Forwarder:
    server.collector.on_stored.append(forwarder)
    return forwarder


def test_forwards_new_events_scrubbed(
    make_server: Callable[..., CollectorServer],
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    call: Any,
) -> None:
    server = make_server()
    forwarder = _attach(server, Forwarder(upstream.dsn, scrub=True))
    try:
        event = make_event(extra={"password": "hunter2", "note": "mail bob@example.com"})
        auth = {
            "X-Sentry-Auth": f"Sentry sentry_key={server.default_project.public_key}",
        }
        path = f"/api/{server.default_project.id}/envelope/"
        assert call(server.port, "POST", path, envelope_of(event), auth).status == 200
        # The same event again (a retry): stored once, forwarded once.
        assert call(server.port, "POST", path, envelope_of(event), auth).status == 200
        assert upstream.wait_for(1)
        time.sleep(0.3)
        assert len(upstream.events) == 1
        sent = upstream.events[0]
        assert sent["event_id"] == event["event_id"]
        assert sent["extra"]["password"] == "[Filtered]"
        assert "bob@example.com" not in str(sent)
        assert forwarder.stats()["sent"] == 1
    finally:
        forwarder.close()


def test_own_mode_forwards_only_the_collectors_self_reports(
    make_server: Callable[..., CollectorServer],
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    call: Any,
) -> None:
    server = make_server()
    forwarder = _attach(server, Forwarder(upstream.dsn, mode="own"))
    try:
        for project in (server.default_project, server.internal_project):
            auth = {"X-Sentry-Auth": f"Sentry sentry_key={project.public_key}"}
            body = envelope_of(make_event(message=f"from project {project.name}"))
            reply = call(server.port, "POST", f"/api/{project.id}/envelope/", body, auth)
            assert reply.status == 200
        assert upstream.wait_for(1)
        time.sleep(0.3)
        assert [e["message"] for e in upstream.events] == [
            f"from project {server.internal_project.name}"
        ]
    finally:
        forwarder.close()


def test_a_down_upstream_spools_and_never_blocks_ingestion(
    make_server: Callable[..., CollectorServer],
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    call: Any,
    tmp_path: Path,
) -> None:
    server = make_server()
    dead = "http://key@127.0.0.1:9/1"  # the discard port: nothing listens there
    forwarder = _attach(server, Forwarder(dead, spool_dir=str(tmp_path / "spool")))
    try:
        auth = {"X-Sentry-Auth": f"Sentry sentry_key={server.default_project.public_key}"}
        path = f"/api/{server.default_project.id}/envelope/"
        started = time.monotonic()
        for _ in range(5):
            assert call(server.port, "POST", path, envelope_of(make_event()), auth).status == 200
        assert time.monotonic() - started < 5.0
        deadline = time.monotonic() + 5
        while forwarder.stats()["spooled"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert forwarder.stats()["spooled"] == 5
    finally:
        forwarder.close(timeout=0.5)


def test_forward_mode_is_validated(upstream: FakeCollector) -> None:
    with pytest.raises(ConfigError, match="forward"):
        Forwarder(upstream.dsn, mode="some")


def test_an_existing_destination_can_be_used(upstream: FakeCollector) -> None:
    destination = Destination(upstream.dsn)
    forwarder = Forwarder(destination)
    try:
        assert forwarder.destination is destination
    finally:
        forwarder.close()


def test_server_forwards_with_its_options_and_checks_the_upstream(
    make_server: Callable[..., CollectorServer],
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    call: Any,
) -> None:
    server = make_server(upstream=upstream.dsn, scrub=True)
    assert server.forwarder is not None
    auth = {"X-Sentry-Auth": f"Sentry sentry_key={server.default_project.public_key}"}
    event = make_event(tags={"api_key": "sk_live_abcdef"})
    path = f"/api/{server.default_project.id}/envelope/"
    assert call(server.port, "POST", path, envelope_of(event), auth).status == 200
    assert upstream.wait_for(1)
    assert upstream.events[0]["tags"]["api_key"] == "[Filtered]"
    health = call(server.port, "GET", "/health").json()
    assert "upstream_reachable" in str(health)


def test_serve_refuses_bad_forwarding_options(tmp_path: Path, capsys: Any) -> None:
    from selfreport.cli import main

    assert main(["serve", "--data", str(tmp_path), "--port", "0", "--scrub"]) == 2
    assert "--scrub, --spool and --forward need --upstream DSN" in capsys.readouterr().err
    code = main(["serve", "--data", str(tmp_path), "--port", "0", "--upstream", "not a dsn"])
    assert code == 2
    assert "dsn:" in capsys.readouterr().err
