"""Recursion scenarios: events born in the reporting path are dropped; real errors arrive once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
import time
from typing import Any

import pytest
from tests.conftest import wait_until

import selfreport
from selfreport.testing import FakeCollector

log = logging.getLogger("app")


def settle(collector: FakeCollector, expected: int) -> int:
    """Wait for ``expected`` events, then until nothing is queued or in flight: flush() cannot
    finish while a loop keeps adding reports, so what has arrived then is all that comes."""
    collector.wait_for(expected, timeout=10.0)
    assert selfreport.flush(10.0)
    return len(collector.events)


def event_ids(collector: FakeCollector) -> set[str]:
    return {event["event_id"] for event in collector.events}


def test_before_send_that_logs_an_error_gives_one_event(collector: FakeCollector) -> None:
    calls = []

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        calls.append(event["event_id"])
        logging.getLogger("app.hooks").error("before_send failed to enrich %s", event["event_id"])
        return event

    selfreport.init(collector.dsn, before_send=before_send)
    log.error("the original error")

    assert settle(collector, 1) == 1
    assert collector.events[0]["logentry"]["message"] == "the original error"
    assert len(calls) == 1
    assert selfreport.stats()["dropped_reentrant"] == 1


def test_log_argument_whose_str_logs_gives_one_event(collector: FakeCollector) -> None:
    class Noisy:
        def __str__(self) -> str:
            log.error("formatting a log argument failed")
            return "noisy-value"

    selfreport.init(collector.dsn)
    log.error("value is %s", Noisy())

    assert settle(collector, 1) == 1
    assert collector.events[0]["logentry"]["formatted"] == "value is noisy-value"
    assert selfreport.stats()["dropped_reentrant"] >= 1


def test_failing_upstream_with_root_logging_at_debug_sends_nothing_new(
    collector: FakeCollector,
) -> None:
    collector.status = 500
    logging.getLogger().setLevel(logging.DEBUG)
    selfreport.init(collector.dsn, logging_level=logging.DEBUG, max_retries=2, retry_backoff=0.01)
    log.error("one error while the collector is broken")

    assert selfreport.flush(5.0)  # retried and given up: nothing queued or in flight
    stats = selfreport.stats()
    # One event, tried 1 + max_retries times: no other event was ever produced.
    assert len(collector.requests) == 3
    assert len(event_ids(collector)) == 1
    assert stats["send_failed"] == 1
    assert stats["retried"] == 2
    assert stats["captured"] == 1


def test_thread_started_in_before_send_that_crashes_gives_one_event(
    collector: FakeCollector,
) -> None:
    threads: list[threading.Thread] = []
    previous_hook_saw: list[str] = []

    def crash() -> None:
        raise RuntimeError("crash in a thread started by before_send")

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        thread = threading.Thread(target=crash, name="enricher")
        threads.append(thread)
        thread.start()
        thread.join()
        return event

    original_hook = threading.excepthook
    threading.excepthook = lambda args: previous_hook_saw.append(str(args.exc_value))
    try:
        client = selfreport.init(collector.dsn, before_send=before_send)
        log.error("the original error")
        assert settle(collector, 1) == 1
    finally:
        selfreport.close()
        threading.excepthook = original_hook
    assert len(threads) == 1
    assert client.stats()["dropped_reentrant"] == 1
    # The hook that selfreport replaced still ran for the dropped thread exception.
    assert previous_hook_saw == ["crash in a thread started by before_send"]


def test_executor_work_submitted_from_before_send_stays_in_the_path(
    collector: FakeCollector,
) -> None:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def failing_work() -> None:
        try:
            raise ValueError("executor work failed")
        except ValueError:
            log.exception("caught in the executor")

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        executor.submit(failing_work).result()
        return event

    try:
        selfreport.init(collector.dsn, before_send=before_send)
        log.error("the original error")
        assert settle(collector, 1) == 1
        assert selfreport.stats()["dropped_reentrant"] >= 1
        # The same executor thread, used outside the path, still reports.
        executor.submit(failing_work).result()
        assert settle(collector, 2) == 2
    finally:
        executor.shutdown()


@pytest.mark.asyncio
async def test_task_scheduled_from_before_send_that_fails_gives_one_event(
    collector: FakeCollector,
) -> None:
    loop = asyncio.get_running_loop()
    scheduled = threading.Event()
    tasks: list[asyncio.Task[None]] = []

    async def fail() -> None:
        raise RuntimeError("task started by before_send failed")

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        if event.get("logentry", {}).get("message") == "the original error":
            loop.call_soon_threadsafe(
                lambda: (tasks.append(loop.create_task(fail())), scheduled.set())
            )
        return event

    selfreport.init(collector.dsn, before_send=before_send)
    log.error("the original error")
    assert await loop.run_in_executor(None, scheduled.wait, 10.0)
    await asyncio.wait(tasks)  # failed; asyncio.wait leaves the exception unretrieved
    tasks.clear()
    gc.collect()  # the unretrieved task reports from its finalizer

    # A task of the application's own, failing the same way, is reported.
    async def app_fail() -> None:
        raise KeyError("the application's own task failed")

    tasks.append(loop.create_task(app_fail()))
    await asyncio.wait(tasks)
    tasks.clear()
    gc.collect()

    await loop.run_in_executor(None, settle, collector, 2)
    messages = [e.get("logentry", {}).get("message") for e in collector.events]
    types = [e["exception"]["values"][-1]["type"] for e in collector.events if "exception" in e]
    assert messages.count("the original error") == 1
    assert types == ["KeyError"]
    assert len(collector.events) == 2
    assert selfreport.stats()["dropped_reentrant"] >= 1


def test_before_send_that_raises_drops_the_event(collector: FakeCollector) -> None:
    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("broken before_send")

    selfreport.init(collector.dsn, before_send=before_send)
    log.error("an error carrying a secret that before_send would have removed")

    assert settle(collector, 0) == 0
    assert collector.requests == []
    stats = selfreport.stats()
    assert stats["dropped_error"] == 1
    assert stats["sent"] == 0


def _ingesting_collector(collector: FakeCollector, marked: bool) -> list[str]:
    """Make the endpoint log an error while ingesting each report, like a collector would."""
    ingested: list[str] = []
    ingest_log = logging.getLogger("collector.ingest")

    def on_envelope(request: Any) -> None:
        ingested.append(request.path)
        if marked and selfreport.is_own_report(request.headers):
            with selfreport.reporting_path():
                ingest_log.error("could not ingest a report")
        else:
            ingest_log.error("could not ingest a report")

    collector.on_envelope = on_envelope
    return ingested


def test_endpoint_that_fails_on_its_own_marked_reports_gives_exactly_one_event(
    collector: FakeCollector,
) -> None:
    ingested = _ingesting_collector(collector, marked=True)
    selfreport.init(collector.dsn)
    log.error("the original error")

    assert settle(collector, 1) == 1
    assert len(ingested) == 1
    assert selfreport.stats()["dropped_reentrant"] == 1


def test_endpoint_that_fails_on_unmarked_reports_is_bounded_by_dedupe(
    collector: FakeCollector,
) -> None:
    _ingesting_collector(collector, marked=False)
    selfreport.init(collector.dsn)
    log.error("the original error")

    # The original, then one ingest error; its repeats are folded by dedupe, not sent.
    assert settle(collector, 2) == 2
    stats = selfreport.stats()
    assert stats["deduplicated"] >= 1
    selfreport.close(timeout=2.0)
    # At close, the folded repeats travel in one summary event.
    assert len(collector.events) == 3
    assert collector.events[-1]["extra"]["selfreport_summary"] >= 1


def test_error_storm_never_blocks_and_is_accounted_for(collector: FakeCollector) -> None:
    collector.blackhole = True  # the worst case: every send hangs until its timeout
    selfreport.init(collector.dsn, max_queue=100, http_timeout=0.5, rate_limit=1000, rate_burst=500)
    total = 20_000
    for i in range(total):
        log.error("storm error %d", i % 50)
    stats = selfreport.stats()
    accounted = (
        stats["captured"]
        + stats["dropped_rate_limited"]
        + stats["dropped_queue_full"]
        + stats["dropped_sampled"]
    )
    assert accounted == total
    assert stats["captured"] <= 100 + 50  # the queue, plus what the worker took meanwhile
    assert stats["deduplicated"] >= total - 50 - 50
    started = time.monotonic()
    selfreport.close(timeout=1.0)
    assert time.monotonic() - started < 3.0


def test_event_inside_reporting_path_is_dropped_before_formatting(
    collector: FakeCollector,
) -> None:
    formatted = []

    class Tracked:
        def __str__(self) -> str:
            formatted.append(1)
            return "tracked"

    selfreport.init(collector.dsn)
    isolated = logging.getLogger("isolated")  # only selfreport's handler: nobody else formats
    isolated.propagate = False
    isolated.addHandler(selfreport.LoggingHandler())
    with selfreport.reporting_path():
        isolated.error("never formatted %s", Tracked())
        selfreport.capture_message("never sent")
        event_id = selfreport.capture_exception(ValueError("inside the path"))
    assert event_id is None
    isolated.handlers.clear()
    assert formatted == []
    assert settle(collector, 0) == 0
    assert selfreport.stats()["dropped_reentrant"] == 3


def test_other_handlers_still_receive_records_dropped_by_the_guard(
    collector: FakeCollector,
) -> None:
    seen: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    recorder = Recorder()
    log.addHandler(recorder)
    try:
        selfreport.init(collector.dsn)
        with selfreport.reporting_path():
            log.error("inside the reporting path")
        log.error("outside the reporting path")
    finally:
        log.removeHandler(recorder)
    assert seen == ["inside the reporting path", "outside the reporting path"]
    assert settle(collector, 1) == 1


@pytest.mark.asyncio
async def test_callbacks_scheduled_from_the_path_that_raise_are_not_reported(
    collector: FakeCollector,
) -> None:
    loop = asyncio.get_running_loop()
    ran: list[str] = []

    def callback(name: str) -> None:
        ran.append(name)
        raise RuntimeError(f"callback {name} scheduled from the reporting path failed")

    client = selfreport.init(collector.dsn)
    async with selfreport.reporting_path():
        loop.call_soon(callback, "soon")
        loop.call_later(0.01, callback, "later")
    assert await loop.run_in_executor(None, wait_until, lambda: len(ran) == 2)
    assert ran == ["soon", "later"]
    loop.call_soon(callback, "outside")  # the control: the same failure outside is reported
    assert await loop.run_in_executor(None, settle, collector, 1) == 1
    assert "outside" in collector.events[0]["exception"]["values"][-1]["value"]
    assert client.stats()["dropped_reentrant"] >= 2
