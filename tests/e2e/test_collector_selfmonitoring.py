"""The collector reports its own errors into itself, over real HTTP, and never loops."""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import wait_until

import selfreport
from selfreport.collector.server import CollectorServer
from selfreport.collector.storage import Project

pytestmark = pytest.mark.slow


# Joined at run time, so the source lines around the raise (which travel in a report's stack
# frames as context) do not contain the markers themselves.
POISON = "~" + "poison" + "~"
SELF_POISON = "~self" + POISON


class PoisonProcessor:
    """An event processor with two bugs: it chokes on events carrying the POISON marker, and on
    events carrying SELF_POISON it raises an error whose report carries SELF_POISON again (the
    report of the failure is itself poison: without the guard, an endless loop)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, bool]] = []  # (project, ran inside the reporting path)

    def __call__(self, event: dict[str, Any], project: Project) -> dict[str, Any]:
        with self.lock:
            self.calls.append((project.name, selfreport.is_reporting()))
        text = json.dumps(event)
        if SELF_POISON in text:
            raise RuntimeError(f"cannot ingest a {SELF_POISON} event")
        if POISON in text:
            raise RuntimeError("cannot ingest this event")
        return event


@pytest.fixture
def poison() -> PoisonProcessor:
    return PoisonProcessor()


@pytest.fixture
def server(tmp_path: Path, poison: PoisonProcessor) -> Iterator[CollectorServer]:
    # No dedupe and no rate limit: only the reporting-path guard may stop a loop here.
    options = {"dedupe_window": 0, "rate_limit": 0, "retry_backoff": 0.05}
    collector = CollectorServer(
        tmp_path, self_report=True, reporter_options=options, processors=[poison]
    ).start()
    try:
        yield collector
    finally:
        collector.stop()


def send_event(server: CollectorServer, message: str) -> int:
    event_id = uuid.uuid4().hex
    payload = json.dumps({"event_id": event_id, "message": message}).encode()
    body = json.dumps({"event_id": event_id}).encode() + b"\n"
    body += json.dumps({"type": "event", "length": len(payload)}).encode() + b"\n" + payload
    key = server.default_project.public_key
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(
            "POST",
            f"/api/{server.default_project.id}/envelope/",
            body=body,
            headers={
                "X-Sentry-Auth": f"Sentry sentry_key={key}, sentry_version=7",
                "Authorization": "Bearer hunter2",
            },
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def internal_events(server: CollectorServer) -> list[dict[str, Any]]:
    storage = server.storage
    out = []
    for issue in storage.issues(project_id=server.internal_project.id, limit=1000):
        out += [json.loads(e.payload) for e in storage.events(issue.id, limit=1000)]
    return out


def test_a_poison_event_gives_exactly_one_self_report(
    server: CollectorServer, poison: PoisonProcessor
) -> None:
    assert send_event(server, f"a {POISON} event") == 500
    assert wait_until(lambda: len(internal_events(server)) >= 1)
    # All the reporter queued was delivered: a loop would have queued another report first.
    assert selfreport.flush(10)
    reports = internal_events(server)
    assert len(reports) == 1
    report = reports[0]
    exception = report["exception"]["values"][-1]
    assert (exception["type"], exception["value"]) == ("RuntimeError", "cannot ingest this event")
    assert exception["mechanism"] == {"type": "asgi", "handled": False}
    request = report["request"]
    assert request["method"] == "POST"
    assert request["url"].endswith(f"/api/{server.default_project.id}/envelope/")
    assert request["headers"]["x-sentry-auth"] == "[Filtered]"
    assert request["headers"]["authorization"] == "[Filtered]"
    assert report["transaction"] == report["tags"]["route"] == "/api/{project_id}/envelope/"
    assert report["tags"]["endpoint"] == "selfreport.collector.ingest.IngestEndpoint"
    assert report["environment"] == "selfreport-collector"
    # The self-report's own ingestion ran inside the reporting path; the poison's did not.
    assert poison.calls == [("default", False), ("selfreport-internal", True)]
    stats = selfreport.stats()
    # Dropped: the collector's one log line about the failure (the report has it already).
    assert (stats["captured"], stats["sent"], stats["dropped_reentrant"]) == (1, 1, 1)


def test_a_self_report_that_is_poison_too_is_dropped_not_looped(
    server: CollectorServer, poison: PoisonProcessor
) -> None:
    assert send_event(server, f"a {SELF_POISON} event") == 500
    # The self-report arrives, fails to ingest inside the reporting path, is answered 500 and
    # retried by the reporter (max_retries=3), then given up: nothing more, ever.
    assert wait_until(lambda: selfreport.stats()["send_failed"] == 1)
    assert selfreport.flush(10)  # nothing else queued or in flight
    stats = selfreport.stats()
    assert stats["captured"] == 1  # the one report of the original failure
    assert stats["sent"] == 0
    assert stats["retried"] == 3
    assert stats["dropped_reentrant"] >= 4  # each failed ingestion of the self-report
    internal_calls = [c for c in poison.calls if c[0] == "selfreport-internal"]
    assert len(internal_calls) == 4  # 1 attempt + 3 retries, all inside the reporting path
    assert all(inside for _, inside in internal_calls)
    assert internal_events(server) == []
    # The drops are visible to operators: metrics and the self-monitoring page.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.request("GET", "/status")
        page = conn.getresponse().read().decode()
    finally:
        conn.close()
    line = next(
        ln for ln in metrics.splitlines() if 'outcome="dropped_reentrant"' in ln and "_total" in ln
    )
    assert float(line.split()[-1]) >= 4
    assert "dropped_reentrant" in page
    assert 'internal_error"} 5.0' in metrics.replace(
        "selfreport_collector_rejected_total{reason=", ""
    )


def test_ordinary_ingestion_keeps_working_next_to_the_failures(
    server: CollectorServer, poison: PoisonProcessor
) -> None:
    assert send_event(server, "fine") == 200
    assert send_event(server, f"a {POISON} event") == 500
    assert send_event(server, "fine again") == 200
    assert wait_until(lambda: len(internal_events(server)) == 1)
    titles = {i.title for i in server.storage.issues(project_id=server.default_project.id)}
    assert titles == {"fine", "fine again"}


def test_errors_the_collector_logs_are_reported_once(server: CollectorServer) -> None:
    """A plain logged error in the collector process lands in the internal project."""
    import logging

    logging.getLogger("selfreport_collector_test").error("the collector noticed a problem")
    assert wait_until(lambda: len(internal_events(server)) == 1)
    assert selfreport.flush(10)  # nothing else queued or in flight
    assert [e["logentry"]["message"] for e in internal_events(server)] == [
        "the collector noticed a problem"
    ]
