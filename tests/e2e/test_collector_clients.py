"""Real clients, unchanged, against a real collector: sentry-sdk and selfreport."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from tests.conftest import wait_until

from selfreport import Client
from selfreport.collector.server import CollectorServer

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CollectorServer]:
    collector = CollectorServer(tmp_path, self_report=False).start()
    try:
        yield collector
    finally:
        collector.stop()


def stored_events(server: CollectorServer, at_least: int = 1) -> list[dict[str, Any]]:
    """The default project's events, once there are ``at_least`` (or the wait ran out)."""

    def events() -> list[dict[str, Any]]:
        found = []
        for issue in server.storage.issues(project_id=server.default_project.id, limit=100):
            found += [json.loads(e.payload) for e in server.storage.events(issue.id)]
        return found

    wait_until(lambda: len(events()) >= at_least)
    return events()


def run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )


def test_sentry_sdk_client_in_process(server: CollectorServer) -> None:
    client = sentry_sdk.Client(server.dsn(), default_integrations=False, release="shop@2.1")
    try:
        with sentry_sdk.new_scope() as scope:
            scope.set_client(client)
            scope.set_tag("region", "eu-west")
            scope.add_breadcrumb(category="db", message="SELECT 1", level="info")
            try:
                {}["missing"]
            except KeyError as exc:
                scope.capture_exception(exc)
            scope.capture_message("payment declined", level="warning")
        client.flush(timeout=10)
    finally:
        client.close()
    events = stored_events(server, at_least=2)
    assert len(events) == 2
    by_sdk = {e.get("message") or e["exception"]["values"][-1]["type"]: e for e in events}
    crash = by_sdk["KeyError"]
    assert crash["sdk"]["name"] == "sentry.python"
    assert crash["release"] == "shop@2.1"
    assert crash["tags"]["region"] == "eu-west"
    assert crash["breadcrumbs"]["values"][0]["message"] == "SELECT 1"
    titles = {i.title: i for i in server.storage.issues()}
    assert titles["payment declined"].level == "warning"
    assert titles["KeyError: 'missing'"].culprit.endswith("in test_sentry_sdk_client_in_process")


def test_sentry_sdk_init_in_a_subprocess_reports_an_uncaught_exception(
    server: CollectorServer, tmp_path: Path
) -> None:
    result = run_script(
        f"""
        import sentry_sdk
        sentry_sdk.init({server.dsn()!r}, environment="staging")

        def checkout(cart):
            return cart["total"] / cart["items"]

        checkout({{"total": 10, "items": 0}})
        """,
        tmp_path,
    )
    assert result.returncode == 1
    assert "ZeroDivisionError" in result.stderr
    events = stored_events(server)
    assert len(events) == 1
    event = events[0]
    assert event["environment"] == "staging"
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    assert frames[-1]["function"] == "checkout"
    assert frames[-1]["context_line"].strip() == 'return cart["total"] / cart["items"]'
    issue = server.storage.issues()[0]
    assert (issue.title, issue.environment) == ("ZeroDivisionError: division by zero", "staging")


def test_selfreport_in_a_subprocess_reports_once(server: CollectorServer, tmp_path: Path) -> None:
    result = run_script(
        f"""
        import logging
        import selfreport

        selfreport.init({server.dsn()!r}, release="worker@1")
        log = logging.getLogger("worker")
        for attempt in range(3):
            try:
                int("not a number")
            except ValueError:
                log.exception("could not parse attempt %d", attempt)
        raise RuntimeError("worker crashed")
        """,
        tmp_path,
    )
    assert result.returncode == 1
    assert "RuntimeError: worker crashed" in result.stderr
    events = stored_events(server, at_least=3)
    counts = {i.title: i.times_seen for i in server.storage.issues()}
    crash = "RuntimeError: worker crashed"
    # The first occurrence; the two repeats were folded by dedupe and sent at exit in a
    # summary with the same fingerprint, so the issue counts all three (its title is the
    # latest event's: the summary).
    assert counts.pop(crash) == 1
    ((title, times),) = counts.items()
    assert title.startswith("selfreport: 2 more occurrence(s) of ValueError")
    assert times == 3
    messages = {e.get("logentry", {}).get("message", ""): e for e in events}
    (summary,) = (e for text, e in messages.items() if text.startswith("selfreport: 2 more"))
    assert messages["could not parse attempt %d"]["fingerprint"] == summary["fingerprint"]
    assert all(e["sdk"]["name"] == "selfreport.python" for e in events)


def test_selfreport_client_in_process_with_gzip(server: CollectorServer) -> None:
    client = Client(server.dsn(), rate_limit=0, dedupe_window=0)
    try:
        ids = []
        for index in range(5):
            try:
                raise OSError(f"disk {index} failed " + "x" * 2000)  # big enough to be gzipped
            except OSError as exc:
                ids.append(client.capture_exception(exc))
        assert None not in ids
        assert client.flush(10)
    finally:
        client.close()
    assert client.stats()["sent"] == 5
    issue = server.storage.issues()[0]
    assert issue.times_seen == 5
    assert issue.title.startswith("OSError: disk 4 failed")


def test_a_second_collector_process_sees_what_the_first_stored(
    server: CollectorServer, tmp_path: Path
) -> None:
    """The DSN and data directory survive a restart: project keys are persistent."""
    client = Client(server.dsn(), rate_limit=0)
    client.capture_message("before restart")
    assert client.flush(10)
    client.close()
    dsn = server.dsn()
    server.stop()
    again = CollectorServer(tmp_path, self_report=False).start()
    try:
        assert again.dsn().rsplit("@", 1)[0] == dsn.rsplit("@", 1)[0]  # same key
        assert not again.first_start
        assert [i.title for i in again.storage.issues()] == ["before restart"]
    finally:
        again.stop()
