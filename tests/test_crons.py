"""selfreport.checkin and selfreport.monitor: check-in envelopes as sentry-sdk's crons send them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope as SentryEnvelope

import selfreport
from selfreport import Client
from selfreport._delivery.envelope import Envelope
from selfreport.testing import FakeCollector

CONFIG = {"schedule": {"type": "crontab", "value": "0 * * * *"}, "checkin_margin": 5}


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as running:
        yield running


@pytest.fixture
def client(collector: FakeCollector) -> Iterator[Client]:
    reporter = selfreport.init(
        collector.dsn, environment="prod", release="1.0", install_hooks=False, logging_level=None
    )
    yield reporter
    selfreport.close()


def test_fake_collector_lists_checkins(client: Client, collector: FakeCollector) -> None:
    selfreport.checkin("nightly", "ok")
    selfreport.capture_message("not a check-in")
    assert selfreport.flush(5)
    assert [c["monitor_slug"] for c in collector.checkins] == ["nightly"]
    assert len(collector.events) == 1


def checkins(collector: FakeCollector) -> list[tuple[Envelope, dict[str, Any]]]:
    return [
        (envelope, item.json())
        for envelope in collector.envelopes
        for item in envelope.items
        if item.type == "check_in"
    ]


def test_checkin_is_a_check_in_item_sentry_sdk_reads(
    client: Client, collector: FakeCollector
) -> None:
    check_in_id = selfreport.checkin("nightly", "ok", duration=1.5, monitor_config=CONFIG)
    assert selfreport.flush(5)
    ((envelope, payload),) = checkins(collector)
    assert payload == {
        "check_in_id": check_in_id,
        "monitor_slug": "nightly",
        "status": "ok",
        "duration": 1.5,
        "monitor_config": CONFIG,
        "environment": "prod",
        "release": "1.0",
    }
    assert envelope.headers["dsn"] == collector.dsn.replace(":secret", "")
    assert envelope.events() == []  # not an event: never grouped into an issue
    request = collector.requests[-1]
    theirs = SentryEnvelope.deserialize(request.body)
    assert [item.type for item in theirs.items] == ["check_in"]
    assert theirs.items[0].data_category == "monitor"  # sentry-sdk's category for check-ins
    assert json.loads(theirs.items[0].payload.get_bytes()) == payload
    stats = selfreport.stats()
    assert (stats["checkins"], stats["captured"], stats["sent"]) == (1, 0, 1)


def test_same_fields_as_sentry_sdk_capture_checkin(collector: FakeCollector) -> None:
    """The oracle: what sentry-sdk sends for a check-in, field by field."""
    sentry_sdk.init(collector.dsn, default_integrations=False, environment="prod")
    try:
        sentry_sdk.crons.capture_checkin(
            "nightly", status="ok", duration=2.0, monitor_config=CONFIG
        )
        sentry_sdk.flush(5)
    finally:
        sentry_sdk.get_client().close()
    ((_, theirs),) = checkins(collector)
    selfreport.init(collector.dsn, environment="prod", install_hooks=False, logging_level=None)
    try:
        selfreport.checkin("nightly", "ok", duration=2.0, monitor_config=CONFIG)
        selfreport.flush(5)
    finally:
        selfreport.close()
    (_, ours) = checkins(collector)[1]
    for key in ("monitor_slug", "status", "duration", "monitor_config", "environment"):
        assert ours[key] == theirs[key], key
    assert set(ours) <= set(theirs)
    assert len(ours["check_in_id"]) == len(theirs["check_in_id"]) == 32


def test_monitor_context_manager_in_progress_then_ok_with_one_id(
    client: Client, collector: FakeCollector
) -> None:
    with selfreport.monitor("backup", monitor_config=CONFIG) as job:
        pass
    assert selfreport.flush(5)
    (_, started), (_, ended) = checkins(collector)
    assert started["status"] == "in_progress"
    assert "duration" not in started
    assert ended["status"] == "ok"
    assert ended["duration"] >= 0
    assert started["check_in_id"] == ended["check_in_id"] == job.check_in_id
    assert ended["monitor_config"] == CONFIG


def test_monitor_decorator_sync_and_async_error_is_reraised(
    client: Client, collector: FakeCollector
) -> None:
    @selfreport.monitor("sync-job")
    def work(value: int) -> int:
        if value < 0:
            raise ValueError("negative")
        return value * 2

    @selfreport.monitor("async-job")
    async def work_async() -> str:
        await asyncio.sleep(0)
        return "done"

    assert work(2) == 4
    assert work.__name__ == "work"
    with pytest.raises(ValueError, match="negative"):
        work(-1)
    assert asyncio.run(work_async()) == "done"
    assert selfreport.flush(5)
    seen = [(payload["monitor_slug"], payload["status"]) for _, payload in checkins(collector)]
    assert seen == [
        ("sync-job", "in_progress"),
        ("sync-job", "ok"),
        ("sync-job", "in_progress"),
        ("sync-job", "error"),
        ("async-job", "in_progress"),
        ("async-job", "ok"),
    ]


def test_checkins_are_not_rate_limited_nor_deduplicated(collector: FakeCollector) -> None:
    selfreport.init(
        collector.dsn, rate_limit=1, rate_burst=1, install_hooks=False, logging_level=None
    )
    try:
        for _ in range(5):
            selfreport.checkin("every-second", "ok")
        assert selfreport.flush(5)
        stats = selfreport.stats()
    finally:
        selfreport.close()
    assert len(checkins(collector)) == 5
    assert stats["checkins"] == 5
    assert stats["dropped_rate_limited"] == 0


def test_checkin_inside_the_reporting_path_is_dropped_and_counted(
    client: Client, collector: FakeCollector
) -> None:
    with selfreport.reporting_path():
        check_in_id = selfreport.checkin("nightly", "ok")
    assert len(check_in_id) == 32
    assert selfreport.flush(5)
    assert checkins(collector) == []
    stats = selfreport.stats()
    assert (stats["dropped_reentrant"], stats["checkins"]) == (1, 0)


def test_queue_full_and_closed_are_counted(collector: FakeCollector) -> None:
    reporter = Client(collector.dsn, max_queue=1)
    reporter._worker._stopping = True  # the queue refuses, as when it is full or stopping
    assert not reporter.capture_checkin({"monitor_slug": "x", "status": "ok"})
    reporter._worker._stopping = False
    reporter.close(5)
    assert not reporter.capture_checkin({"monitor_slug": "x", "status": "ok"})
    stats = reporter.stats()
    assert (stats["dropped_queue_full"], stats["dropped_closed"]) == (1, 1)


def test_without_a_client_or_dsn_nothing_is_sent_and_nothing_raises(
    collector: FakeCollector,
) -> None:
    assert len(selfreport.checkin("x", "ok", check_in_id="a" * 32)) == 32
    reporter = Client(None)
    assert not reporter.capture_checkin({"monitor_slug": "x", "status": "ok"})
    reporter.close()


def test_a_failure_inside_checkin_is_logged_not_raised(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no str")

    with caplog.at_level("WARNING", logger="selfreport"):
        assert selfreport.checkin(Unprintable(), "ok")  # type: ignore[arg-type]
    assert "could not send a check-in" in caplog.text
