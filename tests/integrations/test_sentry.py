"""SelfreportIntegration with the real sentry-sdk, counting events at a real local endpoint."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Union

import pytest
import sentry_sdk
import sentry_sdk.integrations
from sentry_sdk.integrations import logging as sentry_logging
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.integrations.threading import ThreadingIntegration

import selfreport
import selfreport.integrations.sentry as sentry_integration
from selfreport import ConfigError
from selfreport._delivery.transport import ORIGIN_HEADER
from selfreport.integrations.sentry import SelfreportIntegration
from selfreport.testing import FakeCollector

log = logging.getLogger("app")
ingest_log = logging.getLogger("collector.ingest")

# Everything sentry-sdk's integrations and ours patch, process-wide and for good.
_PATCHED = (
    (threading.Thread, "start"),
    (concurrent.futures.ThreadPoolExecutor, "submit"),
    (logging.Logger, "callHandlers"),
    (logging.Logger, "handle"),
    (asyncio.BaseEventLoop, "create_task"),
    (asyncio.BaseEventLoop, "call_exception_handler"),
)
_IDENTIFIERS = ("logging", "threading", "selfreport")


@pytest.fixture(scope="module", autouse=True)
def _sentry_integrations_set_up_once() -> Iterator[None]:
    """sentry-sdk sets integrations up once per process and never removes them: do it before
    the first test (so per-test leak checks see a stable state) and undo it after the last."""
    saved = {(owner, name): owner.__dict__[name] for owner, name in _PATCHED}
    sentry_sdk.init(
        integrations=[SelfreportIntegration(), LoggingIntegration(), ThreadingIntegration()],
        default_integrations=False,
    )
    sentry_sdk.get_client().close()
    yield
    sentry_integration._uninstall()
    for (owner, name), original in saved.items():
        setattr(owner, name, original)
    for identifier in _IDENTIFIERS:
        sentry_sdk.integrations._processed_integrations.discard(identifier)
        sentry_sdk.integrations._installed_integrations.discard(identifier)
    sentry_sdk.Scope.get_global_scope().set_client(None)


Guard = Union[bool, SelfreportIntegration]


@pytest.fixture
def init_sentry() -> Iterator[Callable[..., Any]]:
    """``init_sentry(dsn, guard=True, **options)``: sentry-sdk with the logging and threading
    integrations, plus ours unless ``guard=False`` (default: dedupe and rate limit off, so
    the guard alone is what is tested)."""
    clients: list[Any] = []

    def init(dsn: str, guard: Guard = True, **options: Any) -> Any:
        integrations: list[Any] = [LoggingIntegration(), ThreadingIntegration()]
        if guard is True:
            guard = SelfreportIntegration(dedupe_window=0, rate_limit=0)
        if isinstance(guard, SelfreportIntegration):
            integrations.insert(0, guard)
        # sentry-sdk sends brotli when the module is installed; FakeCollector reads gzip.
        experiments = options.setdefault("_experiments", {})
        experiments.setdefault("transport_compression_algo", "gzip")
        sentry_sdk.init(dsn=dsn, integrations=integrations, default_integrations=False, **options)
        client = sentry_sdk.get_client()
        clients.append(client)
        return client

    yield init
    for client in clients:
        client.close(timeout=0.5)
    sentry_sdk.Scope.get_global_scope().set_client(None)


def settle(collector: FakeCollector, expected: int) -> int:
    """Wait for ``expected`` events, then until sentry-sdk's queue is empty with nothing in
    flight (a report made while sending is queued before that send counts as done)."""
    collector.wait_for(expected, timeout=10.0)
    sentry_sdk.flush(timeout=10.0)
    return len(collector.events)


def count(collector: FakeCollector, guard: Guard, amplified: int) -> int:
    """Events that arrived: with the guard, all there will be; without it, enough to show the
    amplification (it would go on, so waiting for the queue to drain would never end)."""
    if guard is False:
        collector.wait_for(amplified, timeout=5.0)
        return len(collector.events)
    return settle(collector, 1)


def messages(collector: FakeCollector) -> list[str]:
    out = []
    for event in collector.events:
        entry = event.get("logentry") or {}
        out.append(entry.get("message") or event.get("message") or "")
    return out


@contextmanager
def thread_exceptions() -> Iterator[list[BaseException]]:
    """Collect exceptions of failing threads for the block (instead of pytest's warning)."""
    seen: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)  # type: ignore[arg-type,misc]
    try:
        yield seen
    finally:
        threading.excepthook = previous


# --- before_send ---------------------------------------------------------------------------


def run_before_send_logs(collector: FakeCollector, init_sentry: Callable[..., Any], guard: Guard):
    calls: list[str] = []

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        calls.append(event["event_id"])
        # Plain sentry-sdk recurses until RecursionError otherwise; 50 levels show the
        # amplification and stay well below the limit (a finalizer run deeper than that failed
        # in pytest's unraisable hook on a loaded machine).
        if len(calls) < 50:
            logging.getLogger("app.hooks").error("before_send could not enrich an event")
        return event

    init_sentry(collector.dsn, guard=guard, before_send=before_send)
    log.error("the original error")
    return calls


def test_before_send_that_logs_an_error_amplifies_without_the_integration(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    run_before_send_logs(collector, init_sentry, guard=False)
    # sentry-sdk sends every level of the recursion (until RecursionError without our cap).
    assert count(collector, False, 20) >= 20


def test_before_send_that_logs_an_error_gives_one_event(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    integration = SelfreportIntegration(dedupe_window=0, rate_limit=0)
    calls = run_before_send_logs(collector, init_sentry, guard=integration)

    assert settle(collector, 1) == 1
    assert messages(collector) == ["the original error"]
    assert len(calls) == 1
    stats = integration.stats()
    assert stats["dropped_reentrant"] == 1
    assert stats["forwarded"] == 1
    assert sentry_integration.stats() == stats


def test_event_processor_that_logs_an_error_gives_one_event(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    def processor(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        log.error("event processor failed")
        event.setdefault("tags", {})["processed"] = "yes"
        return event

    init_sentry(collector.dsn)
    with sentry_sdk.new_scope() as scope:
        scope.add_event_processor(processor)
        log.error("the original error")

    assert settle(collector, 1) == 1
    assert collector.events[0]["tags"]["processed"] == "yes"
    assert sentry_integration.stats()["dropped_reentrant"] == 1


def test_code_inside_reporting_path_is_not_reported(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    init_sentry(collector.dsn)
    with selfreport.reporting_path():
        assert sentry_sdk.capture_message("inside the path") is None
        assert sentry_sdk.capture_exception(ValueError("inside the path")) is None
        log.error("inside the path")

    @selfreport.guarded
    def guarded_work() -> None:
        raise KeyError("raised inside a guarded function")

    with pytest.raises(KeyError) as raised:
        guarded_work()
    # Caught outside the path, but it escaped from inside: still not reported, in any form.
    assert sentry_sdk.capture_exception(raised.value) is None
    try:
        raise raised.value
    except KeyError:
        assert sentry_sdk.capture_exception() is None
        assert sentry_sdk.capture_exception(sys.exc_info()) is None
    sentry_sdk.capture_message("outside the path")

    assert settle(collector, 1) == 1
    assert messages(collector) == ["outside the path"]
    assert sentry_integration.stats()["dropped_reentrant"] == 6


# --- threads and tasks started from before_send ----------------------------------------------


def run_thread_scenario(
    collector: FakeCollector, init_sentry: Callable[..., Any], guard: Guard
) -> tuple[int, list[BaseException]]:
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def fail() -> None:
        raise RuntimeError("a thread started from before_send failed")

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        if not stop.is_set():
            thread = threading.Thread(target=fail, name="from-before-send")
            threads.append(thread)
            thread.start()
        return event

    with thread_exceptions() as failures:
        init_sentry(collector.dsn, guard=guard, before_send=before_send)
        log.error("the original error")
        events = count(collector, guard, 5)
        stop.set()
        for thread in list(threads):
            thread.join(5.0)
    return events, failures


def test_thread_started_from_before_send_amplifies_without_the_integration(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    events, failures = run_thread_scenario(collector, init_sentry, guard=False)
    assert events >= 5
    assert len(failures) >= 4


def test_thread_started_from_before_send_that_fails_gives_one_event(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    events, failures = run_thread_scenario(collector, init_sentry, guard=True)
    assert events == 1
    assert messages(collector) == ["the original error"]
    # The thread did fail (and other hooks saw it); only reporting it was suppressed.
    assert [str(exc) for exc in failures] == ["a thread started from before_send failed"]
    assert sentry_integration.stats()["dropped_reentrant"] == 1


async def run_task_scenario(
    collector: FakeCollector, init_sentry: Callable[..., Any], guard: Guard, at_least: int
) -> int:
    stop = threading.Event()

    async def fail() -> None:
        raise RuntimeError("a task started from before_send failed")

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        if not stop.is_set():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return event
            # Never awaited, no reference kept: "Task exception was never retrieved".
            loop.create_task(fail())  # noqa: RUF006
        return event

    init_sentry(collector.dsn, guard=guard, before_send=before_send)
    log.error("the original error")
    # The loop must run (and collect the finished task) for the failure to surface.
    deadline = time.monotonic() + (5.0 if guard is False else 0.6)
    while len(collector.events) < at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        gc.collect()
    events = len(collector.events)
    stop.set()
    return events


@pytest.mark.asyncio
async def test_task_started_from_before_send_amplifies_without_the_integration(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    assert await run_task_scenario(collector, init_sentry, guard=False, at_least=5) >= 5


@pytest.mark.asyncio
async def test_task_started_from_before_send_that_fails_gives_one_event(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    assert await run_task_scenario(collector, init_sentry, guard=True, at_least=2) == 1
    assert messages(collector) == ["the original error"]
    assert sentry_integration.stats()["dropped_reentrant"] == 1


# --- the transport and its worker thread -----------------------------------------------------


def run_failing_upstream(collector: FakeCollector, init_sentry: Callable[..., Any], guard: Guard):
    collector.status = 500
    # sentry-sdk logs its transport errors only with debug on, and never makes events of them
    # by name; take that name off its ignore list, as if the list had missed a logger.
    sentry_logging._IGNORED_LOGGERS.discard("sentry_sdk.errors")
    try:
        init_sentry(collector.dsn, guard=guard, debug=True)
        log.error("the original error")
        return count(collector, guard, 5)
    finally:
        sentry_logging._IGNORED_LOGGERS.add("sentry_sdk.errors")


def test_transport_errors_on_the_worker_amplify_without_the_integration(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    # Each 500 makes sentry-sdk's worker log "Unexpected status code": a new event, and so on.
    assert run_failing_upstream(collector, init_sentry, guard=False) >= 5


def test_transport_errors_on_the_worker_thread_are_dropped(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    assert run_failing_upstream(collector, init_sentry, guard=True) == 1
    assert sentry_integration.stats()["dropped_reentrant"] >= 1


def test_work_on_the_background_worker_is_reporting_path(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    client = init_sentry(collector.dsn)
    seen: list[bool] = []

    def job() -> None:
        seen.append(selfreport.is_reporting())
        log.error("logged on sentry-sdk's worker thread")

    client.transport._worker.submit(job)
    log.error("the original error")
    assert settle(collector, 1) == 1
    assert seen == [True]


# --- a collector that reports into itself ----------------------------------------------------


def run_self_ingesting(
    collector: FakeCollector, init_sentry: Callable[..., Any], guard: Guard, honour_marks: bool
) -> int:
    stop = threading.Event()

    def ingest(request: Any) -> None:
        if stop.is_set():
            return
        if honour_marks and selfreport.is_own_report(request.headers):
            with selfreport.reporting_path():
                ingest_log.error("could not ingest a report")
        else:
            ingest_log.error("could not ingest a report")

    collector.on_envelope = ingest
    init_sentry(collector.dsn, guard=guard)
    log.error("the original error")
    events = count(collector, guard, 10)
    stop.set()
    return events


def test_self_ingesting_endpoint_streams_without_the_integration(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    assert run_self_ingesting(collector, init_sentry, guard=False, honour_marks=True) >= 10
    assert all(ORIGIN_HEADER not in r.headers for r in collector.requests)


def test_self_ingesting_endpoint_honouring_marks_gives_exactly_one_event(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    # Dedupe and rate limit are off: the mark alone stops the loop.
    assert run_self_ingesting(collector, init_sentry, guard=True, honour_marks=True) == 1
    assert messages(collector) == ["the original error"]
    assert collector.requests[0].headers[ORIGIN_HEADER] == "1:public"
    assert sentry_integration.stats()["requests_marked"] == 1


def test_self_ingesting_endpoint_ignoring_marks_is_bounded_by_dedupe(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    integration = SelfreportIntegration()  # default dedupe window and rate limit
    events = run_self_ingesting(collector, init_sentry, guard=integration, honour_marks=False)
    # The original, then one "could not ingest"; its own ingestion error is a repeat.
    assert events == 2
    assert messages(collector) == ["the original error", "could not ingest a report"]
    assert integration.stats()["deduplicated"] >= 1


# --- marking ---------------------------------------------------------------------------------


def test_origin_is_registered_when_the_client_is_made(init_sentry: Callable[..., Any]) -> None:
    init_sentry("http://key77@127.0.0.1:9/77")
    assert selfreport.is_own_report({ORIGIN_HEADER: "77:key77"})
    assert selfreport.is_own_report({ORIGIN_HEADER.lower(): " 77:key77 "})
    assert not selfreport.is_own_report({ORIGIN_HEADER: "77:other"})


def test_dsn_that_selfreport_would_reject_is_still_marked(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    dsn = f"http://odd,key@127.0.0.1:{collector.port}/79"  # "," is not allowed by selfreport
    with pytest.raises(ConfigError):
        selfreport.Client(dsn)
    init_sentry(dsn)
    sentry_sdk.capture_message("marked anyway")
    assert settle(collector, 1) == 1
    assert collector.requests[0].headers[ORIGIN_HEADER] == "79:odd,key"
    assert selfreport.is_own_report(collector.requests[0].headers)


def test_marking_can_be_turned_off(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    init_sentry(
        collector.dsn.replace("/1", "/78"), guard=SelfreportIntegration(mark_requests=False)
    )
    sentry_sdk.capture_message("not marked")
    assert settle(collector, 1) == 1
    assert ORIGIN_HEADER not in collector.requests[0].headers
    assert not selfreport.is_own_report({ORIGIN_HEADER: "78:public"})


# --- dedupe and rate limit -------------------------------------------------------------------


def test_repeats_are_folded_and_summarised_at_close(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    integration = SelfreportIntegration(rate_limit=0)
    client = init_sentry(collector.dsn, guard=integration)
    for attempt in range(5):
        log.error("payment %s failed", attempt)
    for _ in range(3):
        sentry_sdk.capture_message("cache unavailable")
    assert settle(collector, 2) == 2
    assert integration.stats()["deduplicated"] == 6

    client.close(timeout=2.0)
    assert collector.wait_for(4)
    summaries = {event["extra"]["selfreport_summary"]: event for event in collector.events[2:]}
    assert sorted(summaries) == [2, 4]
    assert "4 more occurrence(s)" in summaries[4]["logentry"]["message"]
    assert "payment %s failed" in summaries[4]["logentry"]["message"]
    assert summaries[4]["logger"] == "app"
    assert "cache unavailable" in summaries[2]["logentry"]["message"]
    assert "logger" not in summaries[2]
    # Grouped with the original, and counting as many occurrences as were folded.
    payment, cache = collector.events[:2]
    assert summaries[4]["fingerprint"] == payment["fingerprint"]
    assert summaries[2]["fingerprint"] == cache["fingerprint"] != payment["fingerprint"]
    assert payment["fingerprint"][:3] == ["selfreport", "app", "payment %s failed"]
    assert summaries[4]["extra"]["selfreport_repeats"] == 3
    assert summaries[2]["extra"]["selfreport_repeats"] == 1


def test_an_own_fingerprint_is_kept(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    init_sentry(collector.dsn, guard=SelfreportIntegration(rate_limit=0))
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["my", "group"]
        sentry_sdk.capture_message("grouped my way")
    sentry_sdk.capture_message("grouped by selfreport")
    assert settle(collector, 2) == 2
    assert collector.events[0]["fingerprint"] == ["my", "group"]
    assert collector.events[1]["fingerprint"][:3] == ["selfreport", "", "grouped by selfreport"]
    assert not any("_selfreport_fingerprint" in event for event in collector.events)


def test_the_next_event_carries_the_repeats(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    def flaky() -> None:
        raise ValueError("flaky")

    def report_flaky() -> None:
        try:
            flaky()
        except ValueError:
            sentry_sdk.capture_exception()

    init_sentry(collector.dsn, guard=SelfreportIntegration(rate_limit=0, dedupe_window=0.3))
    for _ in range(3):
        report_flaky()
    time.sleep(0.35)
    report_flaky()
    assert settle(collector, 2) == 2
    assert "selfreport_repeats" not in collector.events[0].get("extra", {})
    assert collector.events[1]["extra"]["selfreport_repeats"] == 2


def test_rate_limit_applies_to_errors_but_not_transactions(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    integration = SelfreportIntegration(rate_limit=0.001, rate_burst=2, dedupe_window=0)
    init_sentry(collector.dsn, guard=integration, traces_sample_rate=1.0)
    for number in range(4):
        sentry_sdk.capture_message(f"distinct message {number}")
    sentry_sdk.capture_event({"logentry": {"message": "a hand-made event"}, "level": "error"})
    for _ in range(3):
        with sentry_sdk.start_transaction(name="checkout"):
            pass
    assert settle(collector, 2) == 2
    sentry_sdk.flush(timeout=5.0)
    kinds = [item.type for envelope in collector.envelopes for item in envelope.items]
    assert kinds.count("transaction") == 3
    stats = integration.stats()
    assert stats["dropped_rate_limited"] == 3
    assert stats["deduplicated"] == 0
    assert stats["forwarded"] == 5


def test_transactions_finished_inside_the_reporting_path_are_dropped(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    # A collector ingesting its own reports must not trace that work either, or each report
    # would produce a transaction, whose ingestion produces the next one.
    init_sentry(collector.dsn, traces_sample_rate=1.0)
    with selfreport.reporting_path(), sentry_sdk.start_transaction(name="ingest own report"):
        pass
    with sentry_sdk.start_transaction(name="checkout"):
        pass
    sentry_sdk.flush(timeout=5.0)
    names = [
        item.json()["transaction"]
        for envelope in collector.envelopes
        for item in envelope.items
        if item.type == "transaction"
    ]
    assert names == ["checkout"]
    assert sentry_integration.stats()["dropped_reentrant"] == 1


def run_request_transactions(
    collector: FakeCollector, init_sentry: Callable[..., Any], guard: Guard
) -> tuple[list[str], list[str]]:
    """Two request transactions as a web integration records them, one carrying a report."""
    seen_by_user: list[str] = []

    def before_send_transaction(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        seen_by_user.append(event["transaction"])
        return event

    init_sentry(
        collector.dsn,
        guard=guard,
        traces_sample_rate=1.0,
        before_send_transaction=before_send_transaction,
    )
    for name, headers in (
        ("POST /api/1/envelope/", {ORIGIN_HEADER: "1:public", "Content-Type": "x"}),
        ("GET /orders", {"Accept": "*/*"}),
    ):
        with sentry_sdk.new_scope() as scope:
            # What sentry-sdk's ASGI/WSGI integrations add while preparing the event.
            scope.add_event_processor(
                lambda event, hint, headers=headers: {**event, "request": {"headers": headers}}
            )
            with sentry_sdk.start_transaction(name=name):
                pass
    sentry_sdk.flush(timeout=5.0)
    sent = [
        item.json()["transaction"]
        for envelope in collector.envelopes
        for item in envelope.items
        if item.type == "transaction"
    ]
    return sent, seen_by_user


def test_transactions_of_own_report_requests_are_dropped(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    sent, seen_by_user = run_request_transactions(collector, init_sentry, guard=True)
    assert sent == ["GET /orders"]
    assert seen_by_user == ["GET /orders"]  # the user's hook still runs for the others
    assert sentry_integration.stats()["dropped_reentrant"] == 1


def test_transactions_of_own_report_requests_are_sent_without_the_integration(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    sent, _ = run_request_transactions(collector, init_sentry, guard=False)
    assert sent == ["POST /api/1/envelope/", "GET /orders"]


def test_events_dropped_by_before_send_are_not_counted_as_forwarded(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    init_sentry(collector.dsn, before_send=lambda event, hint: None)
    sentry_sdk.capture_message("dropped by before_send")
    sentry_sdk.flush(timeout=2.0)
    assert collector.events == []
    assert sentry_integration.stats()["forwarded"] == 0


def test_a_client_without_dsn_still_dedupes(init_sentry: Callable[..., Any]) -> None:
    integration = SelfreportIntegration(rate_limit=0)
    init_sentry(None, guard=integration)
    for _ in range(3):
        sentry_sdk.capture_message("nowhere to go")
    assert integration.stats()["deduplicated"] == 2


def test_first_clients_options_register_its_dsn() -> None:
    integration = SelfreportIntegration()
    integration.setup_once_with_options(None)
    integration.setup_once_with_options({"dsn": None})
    assert integration.origins == set()
    integration.setup_once_with_options({"dsn": "https://firstkey@sentry.example/4242"})
    assert integration.origins == {"4242:firstkey"}
    assert selfreport.is_own_report({ORIGIN_HEADER: "4242:firstkey"})


def test_unsupported_sentry_sdk_does_not_enable(monkeypatch: pytest.MonkeyPatch) -> None:
    from sentry_sdk.integrations import DidNotEnable

    sentry_integration._install()  # idempotent: already installed by the module fixture
    for owner in list(vars(sentry_sdk.transport).values()):
        if isinstance(owner, type) and "_send_request" in vars(owner):
            monkeypatch.delattr(owner, "_send_request")
    with pytest.raises(DidNotEnable, match="_send_request"):
        sentry_integration._hook_points()
    monkeypatch.delattr(sentry_sdk.worker.BackgroundWorker, "_target")
    with pytest.raises(DidNotEnable, match=r"sentry-sdk 2\.x"):
        sentry_integration._hook_points()


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="rate_limit"):
        SelfreportIntegration(rate_limit=-1)
    with pytest.raises(ConfigError, match="rate_burst"):
        SelfreportIntegration(rate_burst=0)
    with pytest.raises(ConfigError, match="dedupe_window"):
        SelfreportIntegration(dedupe_window="long")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mark_requests"):
        SelfreportIntegration(mark_requests="yes")  # type: ignore[arg-type]


def test_clients_without_the_integration_are_left_alone(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    init_sentry(collector.dsn, guard=False)
    assert sentry_integration.stats() == dict.fromkeys(sentry_integration.STAT_KEYS, 0)
    with selfreport.reporting_path():
        sentry_sdk.capture_message("plain sentry-sdk reports this")
    assert settle(collector, 1) == 1


# --- Sentry Logs, the async transport, OpenTelemetry -----------------------------------------

# Sentry Logs: "_capture_experimental_log" and _experiments options from 2.2x, then public.
LOG_METHOD = next(
    (
        m
        for m in ("_capture_log", "_capture_experimental_log")
        if m in vars(sentry_sdk.client._Client)
    ),
    None,
)
needs_logs = pytest.mark.skipif(LOG_METHOD is None, reason="no Sentry Logs in this sentry-sdk")


def run_before_send_log(
    collector: FakeCollector, init_sentry: Callable[..., Any], guard: Guard
) -> list[str]:
    calls: list[str] = []

    def before_send_log(record: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        calls.append(record["body"])
        # Plain sentry-sdk recurses until RecursionError otherwise; 50 levels stay well below
        # the recursion limit (200 came within reach of it on 3.12: a finalizer run that deep
        # failed in the unraisable hook)
        if len(calls) < 50:
            log.warning("before_send_log could not enrich a log")
        return record

    if LOG_METHOD == "_capture_log":
        options: dict[str, Any] = {"enable_logs": True, "before_send_log": before_send_log}
    else:
        options = {"_experiments": {"enable_logs": True, "before_send_log": before_send_log}}
    init_sentry(collector.dsn, guard=guard, **options)
    log.warning("the original warning")
    sentry_sdk.flush(timeout=5.0)
    return calls


@needs_logs
def test_before_send_log_that_logs_recurses_without_the_integration(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    assert len(run_before_send_log(collector, init_sentry, guard=False)) >= 20


@needs_logs
def test_before_send_log_that_logs_gives_one_log(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    assert run_before_send_log(collector, init_sentry, guard=True) == ["the original warning"]
    assert sentry_integration.stats()["dropped_reentrant"] == 1
    with selfreport.reporting_path():  # dropped before sentry-sdk looks at the arguments
        getattr(sentry_sdk.get_client(), str(LOG_METHOD))(None)
    assert sentry_integration.stats()["dropped_reentrant"] == 2


@pytest.mark.asyncio
@pytest.mark.skipif(
    not hasattr(sentry_sdk.transport, "AsyncHttpTransport"), reason="no async transport here"
)
async def test_async_transport_is_marked_and_guarded(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    seen: list[bool] = []

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        log.error("before_send failed")
        return event

    client = init_sentry(
        collector.dsn, transport=sentry_sdk.transport.AsyncHttpTransport, before_send=before_send
    )

    async def job() -> None:
        seen.append(selfreport.is_reporting())

    client.transport._worker.submit(job)
    log.error("the original error")
    for _ in range(100):
        if collector.events:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    await client.close_async(timeout=2.0)
    assert len(collector.events) == 1
    assert collector.requests[0].headers[ORIGIN_HEADER] == "1:public"
    assert seen == [True]

    plain = init_sentry(
        collector.dsn, guard=False, transport=sentry_sdk.transport.AsyncHttpTransport
    )
    sentry_sdk.capture_message("plain sentry-sdk, async transport")
    for _ in range(100):
        if len(collector.events) == 2:
            break
        await asyncio.sleep(0.02)
    await plain.close_async(timeout=2.0)
    assert ORIGIN_HEADER not in collector.requests[-1].headers


def test_sends_suppress_opentelemetry_instrumentation(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    from opentelemetry import context as otel_context

    def is_http_instrumentation_enabled() -> bool:
        return not otel_context.get_value(otel_context._SUPPRESS_HTTP_INSTRUMENTATION_KEY)

    seen: list[bool] = []
    client = init_sentry(collector.dsn)
    pool_request = client.transport._pool.request

    def recording_request(*args: Any, **kwargs: Any) -> Any:
        seen.append(is_http_instrumentation_enabled())
        return pool_request(*args, **kwargs)

    client.transport._pool.request = recording_request
    sentry_sdk.capture_message("sent with instrumentation suppressed")
    assert settle(collector, 1) == 1
    assert seen == [False]
    assert is_http_instrumentation_enabled()


def test_sends_work_without_opentelemetry_loaded(
    collector: FakeCollector, init_sentry: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "opentelemetry.context", raising=False)
    init_sentry(collector.dsn)
    sentry_sdk.capture_message("no OpenTelemetry here")
    assert settle(collector, 1) == 1
    assert collector.requests[0].headers[ORIGIN_HEADER] == "1:public"


# --- odds and ends ---------------------------------------------------------------------------


def test_state_is_fresh_after_fork() -> None:
    integration = SelfreportIntegration()
    integration._count("dropped_reentrant")
    integration._counters._lock.acquire()  # held by another thread at fork time
    integration._after_fork_in_child()
    integration._count("forwarded")  # would block for ever on the old lock
    expected = dict.fromkeys(sentry_integration.STAT_KEYS, 0)
    assert integration.stats() == {**expected, "forwarded": 1}


def test_import_without_sentry_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "selfreport.integrations.sentry")
    monkeypatch.setitem(sys.modules, "sentry_sdk", None)
    with pytest.raises(ImportError, match=r"pip install 'selfreport\[sentry\]'"):
        importlib.import_module("selfreport.integrations.sentry")


def test_a_record_logged_in_the_path_and_handled_on_a_listener_thread_is_dropped(
    collector: FakeCollector, init_sentry: Callable[..., Any]
) -> None:
    import logging.handlers
    import queue

    from sentry_sdk.integrations.logging import EventHandler

    init_sentry(collector.dsn)
    records: queue.Queue[logging.LogRecord] = queue.Queue()
    logger = logging.getLogger("tests.sentry.listener")
    logger.propagate = False
    logger.addHandler(logging.handlers.QueueHandler(records))
    listener = logging.handlers.QueueListener(records, EventHandler())
    listener.start()
    try:
        with selfreport.reporting_path():
            logger.error("born in the path")
        logger.error("born outside")
    finally:
        listener.stop()  # every queued record handled
        logger.handlers.clear()
        logger.propagate = True
    sentry_sdk.flush(timeout=5.0)
    # "born outside" twice: by sentry-sdk's logging hook and by the listener's EventHandler.
    assert collector.wait_for(2, timeout=5.0)
    # Dropped twice: by sentry-sdk's own logging hook as it was logged, then by the listener's
    # EventHandler, on the listener's thread, outside the path, by the mark on the record.
    assert sentry_integration.stats()["dropped_reentrant"] == 2
    assert messages(collector) == ["born outside", "born outside"]
