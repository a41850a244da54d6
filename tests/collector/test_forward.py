"""Forwarding stored events upstream: scrubbed, only new ones, all or only the collector's own."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from tests.conftest import closed_port, wait_until

from selfreport import ConfigError, Destination
from selfreport.collector.events import prepare_event
from selfreport.collector.forward import UPSTREAM_ENV, Forwarder, upstream_dsn
from selfreport.collector.server import CollectorServer
from selfreport.collector.storage import Storage
from selfreport.testing import FakeCollector

from .conftest import Target


@pytest.fixture
def upstream() -> Any:
    with FakeCollector(project_id="42", public_key="vendor") as fake:
        yield fake


def _attach(server: CollectorServer, forwarder: Forwarder) -> Forwarder:
    server.collector.on_stored.append(forwarder)
    return forwarder.start(server.storage, server.internal_project.id)


def _handed_on(server: CollectorServer, forwarder: Forwarder, event_id: str) -> bool:
    """The forwarder's cursor is past the stored event ``event_id`` (of any project)."""
    for project in server.storage.projects():
        stored = server.storage.event(project.id, event_id)
        if stored is not None:
            return forwarder.cursor >= stored.id
    return False


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
        # Everything stored was handed on (sent, spooled or counted): nothing else can come.
        assert wait_until(lambda: _handed_on(server, forwarder, event["event_id"]))
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
        for project in (server.internal_project, server.default_project):
            auth = {"X-Sentry-Auth": f"Sentry sentry_key={project.public_key}"}
            event = make_event(message=f"from project {project.name}")
            reply = call(
                server.port, "POST", f"/api/{project.id}/envelope/", envelope_of(event), auth
            )
            assert reply.status == 200
        assert upstream.wait_for(1)
        # The cursor passed the default project's event (stored last) too: it was skipped.
        assert wait_until(lambda: _handed_on(server, forwarder, event["event_id"]))
        assert [e["message"] for e in upstream.events] == [
            f"from project {server.internal_project.name}"
        ]
        assert forwarder.stats()["sent"] == 1
    finally:
        forwarder.close()


def _forwarding_to_nowhere(
    server: CollectorServer, tmp_path: Path, spool_max_bytes: int
) -> tuple[Target, Forwarder]:
    """``server`` forwarding (as ``serve`` wires it) to an upstream that is down."""
    forwarder = Forwarder(
        f"http://key@127.0.0.1:{closed_port()}/1",
        spool_dir=str(tmp_path / "spool"),
        spool_max_bytes=spool_max_bytes,
    )
    _attach(server, forwarder)
    server.collector.forwarding = forwarder.stats
    return Target(server), forwarder


def test_a_down_upstream_spools_and_never_blocks_ingestion(
    make_server: Callable[..., CollectorServer],
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    call: Any,
    tmp_path: Path,
) -> None:
    server = make_server()
    forwarder = _attach(
        server,
        Forwarder(f"http://key@127.0.0.1:{closed_port()}/1", spool_dir=str(tmp_path / "spool")),
    )
    try:
        auth = {"X-Sentry-Auth": f"Sentry sentry_key={server.default_project.public_key}"}
        path = f"/api/{server.default_project.id}/envelope/"
        started = time.monotonic()
        for _ in range(5):
            assert call(server.port, "POST", path, envelope_of(make_event()), auth).status == 200
        assert time.monotonic() - started < 5.0
        assert wait_until(lambda: forwarder.stats()["spooled"] == 5)
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
    err = capsys.readouterr().err
    assert "dsn:" in err
    assert "--upstream on the command line is visible to other users" in err


def test_the_default_spool_is_private_in_the_data_folder(
    make_server: Callable[..., CollectorServer], upstream: FakeCollector
) -> None:
    server = make_server(upstream=upstream.dsn)
    assert server.data_dir.stat().st_mode & 0o777 == 0o700
    assert (server.data_dir / "spool").stat().st_mode & 0o777 == 0o700


def test_every_accepted_event_reaches_the_upstream(
    make_server: Callable[..., CollectorServer],
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
) -> None:
    # No token bucket on forwarding: a burst of 500 all goes on (the SDK default let 116 by).
    server = make_server(upstream=upstream.dsn)
    forwarder = server.forwarder
    assert forwarder is not None
    sent = set()
    for _ in range(50):
        events = [make_event() for _ in range(10)]
        sent.update(e["event_id"] for e in events)
        assert Target(server).send(envelope_of(*events)).status == 200
    assert upstream.wait_for(500, timeout=60)
    assert {e["event_id"] for e in upstream.events} == sent
    assert wait_until(lambda: forwarder.stats()["waiting"] == 0)
    stats = forwarder.stats()
    assert stats["sent"] == 500
    assert all(value == 0 for key, value in stats.items() if key.startswith("dropped"))


def test_forwarding_resumes_after_the_saved_cursor(
    make_server: Callable[..., CollectorServer],
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
) -> None:
    target = Target(make_server())
    assert target.send(envelope_of(make_event(message="before forwarding"))).status == 200
    forwarder = _attach(target.server, Forwarder(upstream.dsn))
    assert target.send(envelope_of(make_event(message="first"))).status == 200
    assert upstream.wait_for(1)
    forwarder.close()
    target.server.collector.on_stored.remove(forwarder)
    assert target.send(envelope_of(make_event(message="while not forwarding"))).status == 200
    forwarder = _attach(target.server, Forwarder(upstream.dsn))
    try:
        assert upstream.wait_for(2)
        assert [e["message"] for e in upstream.events] == ["first", "while not forwarding"]
    finally:
        forwarder.close()


def test_what_is_dropped_anyway_is_counted_in_metrics_and_status(
    make_server: Callable[..., CollectorServer],
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    # A spool too small for any of these events: each is dropped, and counted as such.
    target, forwarder = _forwarding_to_nowhere(make_server(), tmp_path, spool_max_bytes=1024)
    try:
        for _ in range(3):
            body = envelope_of(make_event(extra={"blob": "x" * 4000}))
            assert target.send(body).status == 200
        assert wait_until(lambda: forwarder.stats()["dropped_spool_full"] == 3)
        assert wait_until(lambda: forwarder.stats()["waiting"] == 0)
        metrics = target.get("/metrics").text
        assert 'selfreport_collector_forward_events_total{outcome="dropped_spool_full"} 3.0' in (
            metrics
        )
        assert "selfreport_collector_forward_waiting 0.0" in metrics
        assert target.get("/api/0/status/").json()["forwarding"]["dropped_spool_full"] == 3
        page = target.get("/status").text
        assert "Forwarding upstream" in page
        assert 'Not delivered: <b class="fail">3</b>' in page
    finally:
        forwarder.close(timeout=0.5)


def test_no_forwarding_section_without_an_upstream(target: Target) -> None:
    assert target.get("/api/0/status/").json()["forwarding"] is None
    assert "selfreport_collector_forward" not in target.get("/metrics").text


def test_the_upstream_dsn_comes_from_an_option_a_file_or_the_environment(tmp_path: Path) -> None:
    dsn = "https://key@vendor.example/42"
    secret = tmp_path / "upstream"
    secret.write_text(dsn + "\n")
    os.chmod(secret, 0o600)
    assert upstream_dsn(dsn, None, {}) == dsn
    assert upstream_dsn(None, str(secret), {}) == dsn
    assert upstream_dsn(None, None, {UPSTREAM_ENV: dsn}) == dsn
    assert upstream_dsn(None, None, {}) is None
    with pytest.raises(ConfigError, match="not both"):
        upstream_dsn(dsn, str(secret), {})
    os.chmod(secret, 0o640)
    with pytest.raises(ConfigError, match="readable by other users"):
        upstream_dsn(None, str(secret), {})
    own = Forwarder(dsn, mode="own")
    with pytest.raises(ConfigError, match="internal project"):
        own.start(None, None)  # type: ignore[arg-type]
    own.close()
    empty = tmp_path / "empty"
    empty.write_text("")
    os.chmod(empty, 0o600)
    with pytest.raises(ConfigError, match="empty"):
        upstream_dsn(None, str(empty), {})
    with pytest.raises(ConfigError, match="cannot read"):
        upstream_dsn(None, str(tmp_path / "missing"), {})


def test_serve_refuses_an_upstream_file_others_can_read(tmp_path: Path, capsys: Any) -> None:
    from selfreport.cli import main

    secret = tmp_path / "upstream"
    secret.write_text("https://key@vendor.example/42")
    os.chmod(secret, 0o644)
    args = ["serve", "--data", str(tmp_path / "data"), "--port", "0"]
    assert main([*args, "--upstream-file", str(secret)]) == 2
    err = capsys.readouterr().err
    assert "readable by other users" in err
    assert "chmod 600" in err
    assert len(err.strip().splitlines()) == 1


def test_a_database_gone_away_pauses_forwarding_without_losing_the_thread(
    storage: Storage,
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage.start()
    forwarder = Forwarder(upstream.dsn, save_interval=3600).start(storage)
    try:
        storage.store(1, [prepare_event(make_event())]).result(5)
        forwarder(None)  # type: ignore[arg-type]  # the on_stored hook wakes it
        assert upstream.wait_for(1)
        assert wait_until(lambda: forwarder.cursor == 1)
        storage.close()  # the cursor is not saved yet (save_interval), and now cannot be
        forwarder(None)  # type: ignore[arg-type]
        assert wait_until(lambda: "forwarding paused" in caplog.text)
        assert forwarder.stats()["sent"] == 1  # the destination's counters still count
    finally:
        forwarder.close(timeout=1.0)
    assert "could not save the forwarding cursor" in caplog.text


def test_with_the_spool_nearly_full_events_wait_in_the_database(
    make_server: Callable[..., CollectorServer],
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    target, forwarder = _forwarding_to_nowhere(make_server(), tmp_path, spool_max_bytes=8192)
    try:
        for _ in range(20):
            body = envelope_of(make_event(extra={"blob": "x" * 500}))
            assert target.send(body).status == 200
        assert wait_until(lambda: forwarder.stats()["spooled"] >= 1)
        assert wait_until(lambda: forwarder.stats()["waiting"] + forwarder.stats()["spooled"] == 20)
        stats = forwarder.stats()
        assert stats["waiting"] > 0  # held back, not pushed into a full spool
        assert stats["dropped_spool_full"] == 0
        # Before, every new event woke the forwarder, which read a batch of payloads (up to
        # 100 of 1 MiB) only to find the spool full: it spun while the spool was full.
        reads = _calls(target.server.storage, "events_to_forward")
        for _ in range(10):
            body = envelope_of(make_event(extra={"blob": "x" * 500}))
            assert target.send(body).status == 200
        # Counted by the forwarding thread (on its timer) after all ten woke it.
        assert wait_until(lambda: forwarder.stats()["waiting"] == stats["waiting"] + 10)
        assert reads == []
    finally:
        forwarder.close(timeout=0.5)


def _calls(storage: Storage, method: str) -> list[str]:
    """The names of the threads that call ``storage.method`` from now on."""
    threads: list[str] = []
    original = getattr(storage, method)

    def counting(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(*args)

    setattr(storage, method, counting)
    return threads


def test_stats_never_reads_the_database(
    storage: Storage,
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
) -> None:
    # /metrics and /status call stats() on the event loop: before, each was a count(*) there.
    storage.start()
    forwarder = Forwarder(upstream.dsn).start(storage)
    readers = _calls(storage, "forwarding_state")
    try:
        storage.store(1, [prepare_event(make_event())]).result(5)
        storage.store(1, [prepare_event(make_event())]).result(5)
        forwarder(None)  # type: ignore[arg-type]  # the on_stored hook wakes it
        assert upstream.wait_for(2)
        assert wait_until(lambda: forwarder.stats()["sent"] == 2)
        assert wait_until(lambda: forwarder.stats()["waiting"] == 0)
        assert readers  # counted, in the forwarding thread only
        assert set(readers) == {"selfreport-forwarder"}
    finally:
        forwarder.close(timeout=1.0)


def test_serve_without_upstream_then_with_it_sends_no_backlog(
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"

    def run(message: str, **options: Any) -> None:
        server = CollectorServer(data, self_report=False, **options).start()
        try:
            assert Target(server).send(envelope_of(make_event(message=message))).status == 200
            if server.forwarder is not None:
                assert upstream.wait_for(len(upstream.events) + 1, timeout=30)
        finally:
            server.stop()

    run("forwarded", upstream=upstream.dsn)
    run("stored while not forwarding")
    run("forwarded again", upstream=upstream.dsn)
    assert [e["message"] for e in upstream.events] == ["forwarded", "forwarded again"]


def test_the_pipeline_latency_of_forwarded_events_is_measured(
    make_server: Callable[..., CollectorServer],
    upstream: FakeCollector,
    make_event: Callable[..., dict[str, Any]],
    envelope_of: Callable[..., bytes],
    call: Any,
) -> None:
    """received -> stored -> forwarded: p50/p99 on /status, /api/0/status/ and /metrics."""
    server = make_server(upstream=upstream.dsn)
    assert server.forwarder is not None
    auth = {"X-Sentry-Auth": f"Sentry sentry_key={server.default_project.public_key}"}
    path = f"/api/{server.default_project.id}/envelope/"
    events = [make_event() for _ in range(3)]
    for event in events:
        assert call(server.port, "POST", path, envelope_of(event), auth).status == 200
    assert wait_until(lambda: _handed_on(server, server.forwarder, events[-1]["event_id"]))
    latency = call(server.port, "GET", "/api/0/status/").json()["latency"]
    assert latency["stored"]["samples"] == 3
    assert latency["forwarded"]["samples"] == 3
    for stage in ("stored", "forwarded"):
        assert 0 <= latency[stage]["p50_ms"] <= latency[stage]["p99_ms"] < 60_000
    assert "stored → forwarded" in call(server.port, "GET", "/status").text
    metrics = call(server.port, "GET", "/metrics").text
    assert 'selfreport_collector_pipeline_latency_seconds_count{stage="forwarded"} 3.0' in metrics
    assert 'selfreport_collector_pipeline_latency_seconds_count{stage="stored"} 3.0' in metrics
