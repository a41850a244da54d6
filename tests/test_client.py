"""The Client pipeline: options, drops by reason, before_send, limits, retries and init()."""

from __future__ import annotations

import contextvars
import logging
import math
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

import selfreport
import selfreport._state as state_module
import selfreport.testing
from selfreport import Client, ConfigError, Destination, LoggingHandler, reporting_path
from selfreport._admission.admission import Deduper, Fingerprint
from selfreport._admission.ratelimit import TokenBucket
from selfreport._capture.hooks import Hooks
from selfreport._client import STAT_KEYS
from selfreport._delivery.transport import ORIGIN_HEADER, HttpTransport, Response
from selfreport._state import _hooks as global_hooks
from selfreport.testing import FakeCollector, MemoryTransport

from .conftest import FAST_OPTIONS, ClientFactory, FakeClock, closed_port, settle, wait_until

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class HeldTransport:
    """Holds every send until ``release`` is set; keeps the bodies it sent."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sent: list[bytes] = []

    def send(self, body: bytes, timeout: float) -> Response:
        self.release.wait(10)
        self.sent.append(body)
        return Response(200)

    def close(self) -> None:
        pass


def memory_client(make_client: ClientFactory, **options: Any) -> tuple[Client, MemoryTransport]:
    transport = MemoryTransport()
    return make_client(transport=transport, **options), transport


def messages(events: list[dict[str, Any]]) -> list[Optional[str]]:
    return [(e.get("logentry") or {}).get("message") for e in events]


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("sample_rate", -0.1),
        ("sample_rate", 1.5),
        ("sample_rate", math.nan),
        ("sample_rate", "1"),
        ("sample_rate", True),
        ("max_queue", 0),
        ("max_queue", 1.5),
        ("shutdown_timeout", -1),
        ("shutdown_timeout", math.inf),
        ("rate_limit", -1),
        ("rate_burst", 0),
        ("dedupe_window", -1),
        ("http_timeout", 0),
        ("max_retries", -1),
        ("max_retries", 11),
        ("retry_backoff", -0.5),
        ("retry_backoff", 31),
        ("before_send", "not callable"),
        ("scrub", "yes"),
        ("environment", 3),
        ("release", b"1.0"),
        ("server_name", 1),
        ("transport", object()),
    ],
)
def test_bad_options_raise_config_error_naming_them(option: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        Client(None, **{option: value})
    assert info.value.option == option
    assert str(info.value).startswith(f"{option}: ")


def test_bad_dsn_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^dsn: "):
        Client("not a dsn")


def test_dsn_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFREPORT_DSN", "http://envkey@127.0.0.1:9/5")
    client = Client()
    try:
        assert client.dsn is not None
        assert client.dsn.public_key == "envkey"
        assert client.enabled
    finally:
        client.close(0)


def test_stats_keys(make_client: ClientFactory) -> None:
    client, _ = memory_client(make_client)
    stats = client.stats()
    assert tuple(stats) == STAT_KEYS
    assert set(stats.values()) == {0}
    stats["sent"] = 99  # a snapshot, not the live counters
    assert client.stats()["sent"] == 0


# --- no DSN ----------------------------------------------------------------------------------


def test_no_dsn_is_a_no_op_that_says_so_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import selfreport._client
    from selfreport._core.diag import Diagnostics

    # Once per process: start from a process that has not said it yet.
    monkeypatch.setattr(selfreport._client, "_process_diagnostics", Diagnostics())
    Client().close()  # a second client without a DSN does not say it again
    client = Client()
    try:
        assert not client.enabled
        assert client.capture_message("nowhere") is None
        assert client.capture_exception(raised(ValueError())) is None
        assert client.flush(0)
        assert set(client.stats().values()) == {0}
    finally:
        client.close()
    err = capsys.readouterr().err
    assert err.count("selfreport: no DSN given") == 1


# --- capturing -------------------------------------------------------------------------------


def test_capture_message_and_exception_are_delivered(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    client = make_client(collector.dsn, environment="test", release="r1", server_name="box")
    message_id = client.capture_message("hello", level="warning")
    try:
        raise KeyError("k")
    except KeyError:
        exception_id = client.capture_exception()
    assert message_id is not None
    assert exception_id is not None
    assert client.flush(5)
    assert collector.wait_for(2)
    by_id = {e["event_id"]: e for e in collector.events}
    assert by_id[message_id]["level"] == "warning"
    assert by_id[message_id]["environment"] == "test"
    assert by_id[message_id]["release"] == "r1"
    assert by_id[message_id]["server_name"] == "box"
    assert by_id[exception_id]["exception"]["values"][0]["type"] == "KeyError"
    stats = client.stats()
    assert (stats["captured"], stats["sent"], stats["queue_size"]) == (2, 2, 0)


def test_capture_exception_without_an_exception(make_client: ClientFactory) -> None:
    client, _ = memory_client(make_client)
    assert client.capture_exception() is None
    assert client.stats()["captured"] == 0


def test_capture_exception_with_extra_and_tags(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    job: dict[str, Any] = {"args": [1, object()], "deep": {"a": {"b": {"c": "d"}}}}
    exc = raised(ValueError("with data"))
    client.capture_exception(exc, extra={"job": job}, tags={"task": "t" * 300, "n": 5})
    job["args"].append("added after the capture")
    assert client.flush(5)
    [event] = transport.events
    assert event["extra"]["job"]["args"][0] == 1
    assert event["extra"]["job"]["args"][1].startswith("<object object at")
    assert len(event["extra"]["job"]["args"]) == 2  # copied when captured
    assert event["extra"]["job"]["deep"] == {"a": {"b": {"c": "d"}}}
    assert event["tags"] == {"task": "t" * 197 + "...", "n": "5"}


def test_extra_is_bounded_in_depth_and_breadth(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    nested: Any = "bottom"
    for _ in range(20):
        nested = [nested]
    client.capture_exception(
        raised(ValueError("big")), extra={"nested": nested, "wide": dict.fromkeys(range(500), 1)}
    )
    assert client.flush(5)
    [event] = transport.events
    assert len(event["extra"]["wide"]) == 100
    depth, value = 0, event["extra"]["nested"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert depth == 7
    assert value.startswith("[[")  # rendered as text below the last level


def test_module_capture_exception_passes_extra_and_tags() -> None:
    with selfreport.testing.capture_events() as events:
        selfreport.capture_exception(raised(KeyError("k")), extra={"a": 1}, tags={"t": "v"})
    [event] = events.flush()
    assert (event["extra"], event["tags"]) == ({"a": 1}, {"t": "v"})


def test_the_same_exception_is_reported_once(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    exc = raised(ValueError("once"))
    assert client.capture_exception(exc) is not None
    assert client.capture_exception(exc) is None
    client.capture_hooked(exc, "excepthook", True)  # uncaught later: still the same error
    assert client.flush(5)
    assert len(transport.events) == 1
    assert client.stats()["dropped_duplicate"] == 2


def test_non_string_message(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    client.capture_message(("a", 1))  # type: ignore[arg-type]
    assert client.flush(5)
    assert messages(transport.events) == ["('a', 1)"]


def test_include_locals(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client, include_locals=True)

    def fail() -> None:
        token = "local value"  # noqa: F841
        raise ValueError("with locals")

    try:
        fail()
    except ValueError as exc:
        client.capture_exception(exc)
    assert client.flush(5)
    frames = transport.events[0]["exception"]["values"][0]["stacktrace"]["frames"]
    assert frames[-1]["vars"] == {"token": "'local value'"}


# --- the guard -------------------------------------------------------------------------------


def test_captures_inside_the_reporting_path_are_dropped(
    make_client: ClientFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    client, transport = memory_client(make_client)
    record = logging.LogRecord("app", logging.ERROR, __file__, 1, "in path", (), None)
    with reporting_path():
        assert client.capture_message("in path") is None
        assert client.capture_message("in path again") is None
        assert client.capture_exception(ValueError("in path")) is None
        assert client.capture_record(record) is None
    escaped = raised(ValueError("raised in the path"))
    try:
        with reporting_path():
            raise escaped
    except ValueError:
        pass
    assert client.capture_exception(escaped) is None  # captured later, outside: still dropped
    assert client.flush(5)
    assert transport.events == []
    assert client.stats()["dropped_reentrant"] == 5
    err = capsys.readouterr().err
    assert err.count("dropped a message that originated inside the reporting path") == 1
    assert err.count("dropped an exception that originated") == 1


def test_finalizer_exceptions_are_captured_even_inside_the_path(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    with reporting_path():
        client.capture_hooked(raised(ValueError("gc")), "unraisablehook", False)
    assert client.flush(5)
    assert len(transport.events) == 1
    assert transport.events[0]["exception"]["values"][0]["mechanism"]["handled"] is False


def test_selfreport_own_log_records_are_never_reported(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    for name in ("selfreport", "selfreport.transport"):
        record = logging.LogRecord(name, logging.ERROR, __file__, 1, "own trouble", (), None)
        assert client.capture_record(record) is None
    assert client.flush(5)
    assert transport.events == []
    assert client.stats()["dropped_reentrant"] == 2


def test_the_collector_is_an_application_whose_errors_are_reported(
    make_client: ClientFactory,
) -> None:
    client, transport = memory_client(make_client)
    record = logging.LogRecord(
        "selfreport.collector.ingest", logging.ERROR, __file__, 1, "x", (), None
    )
    assert client.capture_record(record) is not None
    assert client.flush(5)
    assert transport.events[0]["logger"] == "selfreport.collector.ingest"


def test_one_record_through_two_handlers_is_one_event(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    logger = logging.getLogger("test_client.two_handlers")
    first, second = LoggingHandler(client=client), LoggingHandler(client=client)
    logger.addHandler(first)
    logger.addHandler(second)
    try:
        logger.error("logged once")
        logger.error("logged once")  # a new record: a new event (dedupe is off here)
    finally:
        logger.removeHandler(first)
        logger.removeHandler(second)
    assert client.flush(5)
    assert messages(transport.events) == ["logged once", "logged once"]
    assert client.stats()["dropped_duplicate"] == 2


# --- before_send -----------------------------------------------------------------------------


def test_before_send_edits_events_with_the_callers_context(make_client: ClientFactory) -> None:
    seen: list[tuple[bool, Any]] = []

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        seen.append((selfreport.is_reporting(), hint["exc_info"]))
        event["tags"] = {"request_id": request_id.get()}
        return event

    client, transport = memory_client(make_client, before_send=before_send)
    token = request_id.set("req-42")
    try:
        client.capture_message("with context")
    finally:
        request_id.reset(token)
    assert client.flush(5)
    assert transport.events[0]["tags"] == {"request_id": "req-42"}
    assert seen == [(True, None)]


def test_before_send_gets_exc_info(make_client: ClientFactory) -> None:
    hints: list[Any] = []
    client, _ = memory_client(make_client, before_send=lambda e, h: hints.append(h) or e)
    exc = raised(ValueError("hint"))
    client.capture_exception(exc)
    assert client.flush(5)
    assert hints[0]["exc_info"][1] is exc


def test_before_send_returning_none_drops(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client, before_send=lambda e, h: None)
    client.capture_message("dropped")
    assert client.flush(5)
    assert transport.events == []
    assert client.stats()["dropped_before_send"] == 1


@pytest.mark.parametrize(
    "before_send",
    [
        pytest.param(lambda e, h: 1 / 0, id="raises"),
        pytest.param(lambda e, h: ["not", "a", "dict"], id="returns-a-list"),
    ],
)
def test_broken_before_send_drops_and_never_sends_raw(
    collector: FakeCollector,
    make_client: ClientFactory,
    before_send: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_client(collector.dsn, before_send=before_send)
    client.capture_message("secret data")
    assert client.flush(5)
    assert collector.requests == []
    assert client.stats()["dropped_error"] == 1
    assert "dropped an event because building, before_send or scrubbing" in capsys.readouterr().err


def test_scrub_callable_and_failing_scrub(make_client: ClientFactory) -> None:
    def scrub(event: dict[str, Any]) -> dict[str, Any]:
        event["logentry"]["message"] = "[scrubbed]"
        return event

    client, transport = memory_client(make_client, scrub=scrub)
    client.capture_message("password=hunter2")
    assert client.flush(5)
    assert messages(transport.events) == ["[scrubbed]"]

    def broken(event: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("scrubber broke")

    failing, failing_transport = memory_client(make_client, scrub=broken)
    failing.capture_message("password=hunter2")
    assert failing.flush(5)
    assert failing_transport.events == []  # fail closed
    assert failing.stats()["dropped_error"] == 1


def test_scrub_true_uses_the_builtin_scrubber(make_client: ClientFactory) -> None:
    pytest.importorskip("selfreport._capture.scrub")
    client, _ = memory_client(make_client, scrub=True)
    assert client._scrub is not None
    assert memory_client(make_client, scrub=False)[0]._scrub is None


def test_capture_error_is_counted_not_raised(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)

    class BrokenRecord(logging.LogRecord):
        def getMessage(self) -> str:
            raise RuntimeError("unused")

        @property  # type: ignore[misc]
        def threadName(self) -> str:
            raise RuntimeError("a record that cannot even be read")

        @threadName.setter
        def threadName(self, value: str) -> None:
            pass

    record = BrokenRecord("app", logging.ERROR, __file__, 1, "m", (), None)
    assert client.capture_record(record) is None
    assert client.stats()["dropped_error"] == 1
    assert transport.events == []


# --- sampling, dedupe, rate limits, queue ----------------------------------------------------


def test_sample_rate(make_client: ClientFactory) -> None:
    none, _ = memory_client(make_client, sample_rate=0.0)
    assert none.capture_message("never") is None
    assert none.stats()["dropped_sampled"] == 1

    random.seed(1234)
    half, _ = memory_client(make_client, sample_rate=0.5, max_queue=10_000)
    kept = sum(half.capture_message(f"m{n}") is not None for n in range(1000))
    assert 400 < kept < 600
    assert half.stats()["dropped_sampled"] == 1000 - kept


def test_full_queue_never_blocks(
    collector: FakeCollector, make_client: ClientFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    collector.blackhole = True
    client = make_client(collector.dsn, max_queue=2, http_timeout=5)
    client.capture_message("in flight")
    assert wait_until(lambda: len(collector.requests) == 1)  # the worker is stuck sending it
    started = time.monotonic()
    results = [client.capture_message(f"queued {n}") for n in range(10)]
    assert time.monotonic() - started < 1.0
    assert sum(r is not None for r in results) == 2
    stats = client.stats()
    assert stats["dropped_queue_full"] == 8
    assert stats["queue_size"] == 2
    assert "queue full" in capsys.readouterr().err
    client.close(timeout=0.2)
    assert client.stats()["dropped_closed"] == 2


def test_the_close_summary_of_a_huge_message_names_its_beginning(
    make_client: ClientFactory,
) -> None:
    client, transport = memory_client(make_client, dedupe_window=60)
    text = "payload " + "z" * (100 * 1024)
    for _ in range(3):
        client.capture_message(text)
    client.close(timeout=5)
    summary = transport.events[-1]
    assert summary["extra"]["selfreport_summary"] == 2
    message = summary["logentry"]["message"]
    assert "'payload zzz" in message
    assert len(message) < 400  # dedupe kept a bounded prefix, not the whole text


def test_dedupe_folds_repeats_into_the_next_event_and_a_close_summary(
    make_client: ClientFactory,
) -> None:
    clock = FakeClock()
    client, transport = memory_client(make_client, dedupe_window=60)
    client._admission.deduper = Deduper(60, clock=clock)
    logger = logging.getLogger("test_client.dedupe")
    handler = LoggingHandler(client=client)
    logger.addHandler(handler)
    try:
        for n in range(4):
            logger.error("disk %s is full", n)  # one template, so one fingerprint
        clock.now += 61
        logger.error("disk %s is full", "again")
        logger.error("disk %s is full", "and again")
        logger.error("another problem")
    finally:
        logger.removeHandler(handler)
    assert client.flush(5)
    assert [e.get("extra", {}).get("selfreport_repeats") for e in transport.events] == [
        None,
        3,
        None,
    ]
    assert client.stats()["deduplicated"] == 4
    assert client.stats()["dropped_rate_limited"] == 4
    client.close(timeout=5)
    summary = transport.events[-1]
    assert summary["level"] == "info"
    assert summary["logger"] == "test_client.dedupe"
    # It stands for the one folded repeat itself: no repeats of its own to carry.
    assert summary["extra"] == {"selfreport_summary": 1}
    assert summary["logentry"]["message"] == (
        "selfreport: 1 more occurrence(s) of 'disk %s is full' were folded by dedupe and not sent"
    )


def test_repeat_summaries_carry_the_fingerprint_of_the_original(
    make_client: ClientFactory,
) -> None:
    client, transport = memory_client(make_client, dedupe_window=60)
    for _ in range(4):
        try:
            int("x")
        except ValueError as error:
            client.capture_exception(error)  # one place, so one fingerprint
    client.capture_message("other")
    client.close(timeout=5)
    first, other, summary = transport.events
    assert first["fingerprint"] == summary["fingerprint"] != other["fingerprint"]
    assert first["fingerprint"][:4] == ["selfreport", "", "", "ValueError"]
    assert summary["logentry"]["message"].startswith(
        "selfreport: 3 more occurrence(s) of ValueError at test_client.py:"
    )
    # One event for three occurrences: it carries two repeats, so a collector counts three.
    assert summary["extra"] == {"selfreport_summary": 3, "selfreport_repeats": 2}


def test_without_dedupe_events_carry_no_fingerprint(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client, dedupe_window=0)
    client.capture_message("plain")
    assert client.flush(5)
    assert "fingerprint" not in transport.events[0]


def test_repeats_arriving_while_the_queue_is_full_are_counted_as_repeats(
    make_client: ClientFactory,
) -> None:
    held = HeldTransport()
    client = make_client(transport=held, dedupe_window=60, max_queue=1)
    client._admission.bucket = TokenBucket(rate=1.0, burst=2, clock=FakeClock())
    client.capture_message("a")
    assert wait_until(lambda: client.stats()["queue_size"] == 0)  # "a" is being sent
    client.capture_message("b")  # fills the queue, and takes the last token
    for _ in range(3):
        assert client.capture_message("a") is None  # repeats of one already sent
    assert client.capture_message("c") is None  # a first occurrence: no room for it
    stats = client.stats()
    assert (stats["deduplicated"], stats["dropped_queue_full"]) == (3, 1)  # not rate limited
    held.release.set()
    client.close(timeout=5)
    assert client._admission.pending() == {}  # "a"'s repeats went in a summary


def test_drop_reentrant_is_the_public_hook_for_integrations(make_client: ClientFactory) -> None:
    client, _ = memory_client(make_client)
    client.drop_reentrant("log record")
    client.drop_reentrant("log record")
    assert client.stats()["dropped_reentrant"] == 2


def test_current_client_is_the_given_one_else_the_global_one(make_client: ClientFactory) -> None:
    given, _ = memory_client(make_client)
    global_one, _ = memory_client(make_client)
    assert selfreport._state.current_client(given) is given
    previous = selfreport._state.set_client(global_one)
    try:
        assert selfreport._state.current_client() is global_one
        assert selfreport._state.current_client(None) is global_one
        assert selfreport._state.current_client(given) is given
    finally:
        selfreport._state.set_client(previous)


def test_token_bucket_limits_and_a_refused_event_is_not_a_first_occurrence(
    make_client: ClientFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    client, transport = memory_client(make_client, dedupe_window=60)
    client._admission.bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    assert client.capture_message("a") is not None
    assert client.capture_message("b") is not None
    assert client.capture_message("c") is None  # bucket empty
    clock.now += 1
    assert client.capture_message("c") is not None  # not mistaken for a repeat of the refused one
    assert client.flush(5)
    assert messages(transport.events) == ["a", "b", "c"]
    assert client.stats()["dropped_rate_limited"] == 1
    assert client.stats()["deduplicated"] == 0
    assert "rate limit reached" in capsys.readouterr().err


def test_rate_limit_defaults_are_on() -> None:
    client = Client(None)
    try:
        assert client._admission.bucket.rate == 10.0
        assert client._admission.bucket.burst == 100
        assert client._admission.deduper.window == 60.0
    finally:
        client.close()


# --- delivery --------------------------------------------------------------------------------


def test_5xx_is_retried_with_backoff_then_counted(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    collector.status = 503
    client = make_client(collector.dsn, max_retries=2, retry_backoff=0.01)
    client.capture_message("upstream down")
    assert client.flush(5)
    assert len(collector.requests) == 3
    assert len({r.envelope.headers["event_id"] for r in collector.requests if r.envelope}) == 1
    stats = client.stats()
    assert (stats["retried"], stats["send_failed"], stats["sent"]) == (2, 1, 0)


def test_a_retry_that_succeeds_counts_as_sent(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    collector.status = 500

    def recover(request: Any) -> None:
        collector.status = 500 if len(collector.requests) == 1 else 200

    collector.on_envelope = recover  # the first answer is 500, then the collector recovers
    client = make_client(collector.dsn, max_retries=3)
    client.capture_message("eventually")
    assert client.flush(5)
    stats = client.stats()
    assert (stats["retried"], stats["sent"], stats["send_failed"]) == (1, 1, 0)


def test_4xx_is_not_retried(collector: FakeCollector, make_client: ClientFactory) -> None:
    collector.status = 413
    client = make_client(collector.dsn, max_retries=3)
    client.capture_message("too large")
    assert client.flush(5)
    assert len(collector.requests) == 1
    assert client.stats()["send_failed"] == 1
    assert client.stats()["retried"] == 0


def test_connection_errors_are_retried(make_client: ClientFactory) -> None:
    client = make_client(f"http://k@127.0.0.1:{closed_port()}/1", max_retries=1)
    client.capture_message("nobody listens")
    assert client.flush(5)
    assert client.stats()["retried"] == 1
    assert client.stats()["send_failed"] == 1


@pytest.mark.parametrize(
    ("status", "retry_after", "first_counted_as"),
    [(429, "60", "dropped_rate_limited"), (503, "120", "send_failed")],
)
def test_a_long_retry_after_holds_back_later_events(
    collector: FakeCollector,
    make_client: ClientFactory,
    capsys: pytest.CaptureFixture[str],
    status: int,
    retry_after: str,
    first_counted_as: str,
) -> None:
    """A 429, or a 503 asking for longer than a delivery ever waits (30 s), is not retried."""
    collector.status = status
    collector.response_headers = {"Retry-After": retry_after}
    client = make_client(collector.dsn, max_retries=3)
    client.capture_message("first")
    assert client.flush(5)
    client.capture_message("second")
    assert client.flush(5)
    assert len(collector.requests) == 1  # not retried, and nothing sent while limited
    stats = client.stats()
    expected = {"dropped_rate_limited": 1, "send_failed": 0, "retried": 0}
    expected[first_counted_as] += 1
    assert {key: stats[key] for key in expected} == expected
    assert client.upstream is not None
    assert client.upstream.limits.seconds_left() > 50
    if status == 503:
        assert f"asked us to wait {retry_after} s" in capsys.readouterr().err


@pytest.mark.slow
def test_a_503_with_retry_after_is_retried_after_it(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    collector.status = 503
    collector.response_headers = {"Retry-After": "1"}
    answered: list[float] = []

    def recover(request: Any) -> None:
        answered.append(time.monotonic())
        if len(answered) == 2:
            collector.status, collector.response_headers = 200, {}

    collector.on_envelope = recover
    client = make_client(collector.dsn, max_retries=3)  # with no backoff of its own
    client.capture_message("busy collector")
    assert client.flush(10)
    stats = client.stats()
    assert (stats["retried"], stats["sent"], stats["send_failed"]) == (1, 1, 0)
    assert answered[1] - answered[0] >= 0.9


def test_sentry_rate_limits_on_an_accepted_request_are_honoured(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    collector.response_headers = {"X-Sentry-Rate-Limits": "60:error:project"}
    client = make_client(collector.dsn)
    client.capture_message("accepted, but no more errors for a minute")
    assert client.flush(5)
    client.capture_message("held back")
    assert client.flush(5)
    assert len(collector.requests) == 1
    assert client.stats()["sent"] == 1
    assert client.stats()["dropped_rate_limited"] == 1


def test_rate_limits_of_other_categories_do_not_hold_errors(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    collector.status = 429
    collector.response_headers = {"X-Sentry-Rate-Limits": "60:transaction"}
    client = make_client(collector.dsn)
    client.capture_message("one")
    assert client.flush(5)
    collector.status = 200
    client.capture_message("two")
    assert client.flush(5)
    assert len(collector.requests) == 2
    assert client.stats()["sent"] == 1


def test_a_custom_transport_that_raises_is_retried_then_failed(
    make_client: ClientFactory,
) -> None:
    class Broken:
        calls = 0

        def send(self, body: bytes, timeout: float) -> Response:
            self.calls += 1
            raise RuntimeError("not even an OSError")

        def close(self) -> None:
            pass

    transport = Broken()
    client = make_client(transport=transport, max_retries=2)
    client.capture_message("x")
    assert client.flush(5)
    assert transport.calls == 3
    assert client.stats()["send_failed"] == 1


# --- lifecycle -------------------------------------------------------------------------------


def test_captures_after_close_are_dropped(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    client.close()
    client.close()  # idempotent
    assert client.capture_message("late") is None
    assert client.stats()["dropped_closed"] == 1
    assert transport.events == []


def test_close_is_bounded_against_a_blackhole(
    collector: FakeCollector, make_client: ClientFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    collector.blackhole = True
    client = make_client(collector.dsn, http_timeout=30, max_retries=5, retry_backoff=1)
    for n in range(5):
        client.capture_message(f"m{n}")
    assert wait_until(lambda: len(collector.requests) == 1)
    started = time.monotonic()
    client.close(timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert client.stats()["dropped_closed"] == 4
    assert "close() gave up after 0.3s" in capsys.readouterr().err
    assert client._worker._thread is not None
    client._worker._thread.join(5)  # the interrupted send ends too, without retrying
    assert not client._worker.alive
    assert len(collector.requests) == 1


def test_close_during_backoff_stops_retrying(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    collector.status = 500
    client = make_client(collector.dsn, max_retries=5, retry_backoff=30)
    client.capture_message("x")
    assert wait_until(lambda: client.stats()["retried"] == 1)
    started = time.monotonic()
    client.close(timeout=5)
    assert time.monotonic() - started < 2
    assert client.stats()["send_failed"] == 1
    assert len(collector.requests) == 1


def test_flush_of_a_disabled_client_is_true() -> None:
    client = Client(None)
    try:
        assert client.flush(0)
    finally:
        client.close()


def test_after_fork_in_child_gives_fresh_state(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    client.capture_message("parent")
    assert client.flush(5)
    client._worker.stop(5)  # as if the worker thread had not survived fork()
    client._counters._lock.acquire()  # ... and another thread had held a lock at fork time
    client.after_fork_in_child()
    assert client.stats()["sent"] == 0
    client.capture_message("child")
    assert client.flush(5)
    assert messages(transport.events) == ["parent", "child"]


def test_debug_logs_selfreport_activity_to_stderr_once(make_client: ClientFactory) -> None:
    own = logging.getLogger("selfreport")
    make_client(transport=MemoryTransport(), debug=True)
    make_client(transport=MemoryTransport(), debug=True)
    debug_handlers = [h for h in own.handlers if getattr(h, "_selfreport_debug", False)]
    assert len(debug_handlers) == 1
    assert own.level == logging.DEBUG


def test_is_own_report_is_case_insensitive(make_client: ClientFactory) -> None:
    client = make_client("http://pub@127.0.0.1:9/7")
    assert client.is_own_report({ORIGIN_HEADER: "7:pub"})
    assert client.is_own_report({ORIGIN_HEADER.lower(): "7:pub"})
    assert client.is_own_report({ORIGIN_HEADER.upper(): "7:pub"})
    assert not client.is_own_report({ORIGIN_HEADER: "8:pub"})
    assert not client.is_own_report({})
    assert not Client(None).is_own_report({ORIGIN_HEADER: "7:pub"})


def test_concurrent_captures_are_all_counted(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client, max_queue=10_000)

    def capture_many(n: int) -> None:
        for i in range(200):
            client.capture_message(f"thread {n} message {i}")

    threads = [threading.Thread(target=capture_many, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.flush(10)
    assert client.stats()["captured"] == 800
    assert client.stats()["sent"] == 800
    assert len(transport.events) == 800


# --- init() and the module-level API --------------------------------------------------------


def root_selfreport_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, LoggingHandler)]


def test_init_installs_one_handler_and_hooks(collector: FakeCollector) -> None:
    client = selfreport.init(collector.dsn, **FAST_OPTIONS)
    assert selfreport._state.current_client() is client
    assert len(root_selfreport_handlers()) == 1
    assert global_hooks.active
    assert sys.excepthook == global_hooks._sys_hook
    logging.getLogger("test_client.init").error("through the root handler")
    assert selfreport.flush(5)
    assert collector.wait_for(1)
    assert selfreport.stats()["sent"] == 1


def test_second_init_closes_the_first_and_never_doubles_up(collector: FakeCollector) -> None:
    first = selfreport.init(collector.dsn, **FAST_OPTIONS)
    prev_sys = global_hooks._patches.replaced(sys, "excepthook")
    second = selfreport.init(collector.dsn, **FAST_OPTIONS)
    assert first._closed.is_set()
    assert not second._closed.is_set()
    assert len(root_selfreport_handlers()) == 1
    assert (
        global_hooks._patches.replaced(sys, "excepthook") is prev_sys
    )  # not chained to our own hook
    logging.getLogger("test_client.init").error("once")
    assert settle(selfreport, collector) == 1
    assert (first.stats()["captured"], first.stats()["dropped_closed"]) == (0, 0)


def test_init_options(collector: FakeCollector) -> None:
    selfreport.init(collector.dsn, logging_level=None, install_hooks=False, **FAST_OPTIONS)
    assert root_selfreport_handlers() == []
    assert not global_hooks.active
    selfreport.init(collector.dsn, logging_level="warning", **FAST_OPTIONS)
    # Events from WARNING; the handler itself takes INFO and up, for breadcrumbs.
    assert [h.event_level for h in root_selfreport_handlers()] == [logging.WARNING]
    assert [h.level for h in root_selfreport_handlers()] == [logging.INFO]
    assert global_hooks.active


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"sampel_rate": 0.5}, "sampel_rate"),
        ({"logging_level": "LOUD"}, "logging_level"),
        ({"logging_level": -1}, "logging_level"),
        ({"logging_level": 1.5}, "logging_level"),
        ({"max_queue": 0}, "max_queue"),
    ],
)
def test_init_with_bad_options_keeps_the_previous_client(
    collector: FakeCollector, options: dict[str, Any], option: str
) -> None:
    working = selfreport.init(collector.dsn, **FAST_OPTIONS)
    with pytest.raises(ConfigError) as info:
        selfreport.init(collector.dsn, **options)
    assert info.value.option == option
    assert selfreport._state.current_client() is working
    assert not working._closed.is_set()
    assert len(root_selfreport_handlers()) == 1


def test_unknown_option_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'sample_rate'"):
        selfreport.init(sampel_rate=0.5)
    with pytest.raises(ConfigError, match=r"is not an option of selfreport\.init$"):
        selfreport.init(zzz=1)


def test_module_api_without_a_client() -> None:
    assert selfreport.capture_message("nobody") is None
    assert selfreport.capture_exception(ValueError()) is None
    assert selfreport.flush(0)
    assert selfreport.stats() == dict.fromkeys(STAT_KEYS, 0)
    assert not selfreport.is_own_report({ORIGIN_HEADER: "424242:never-registered"})
    selfreport.close()


def test_module_api_with_a_client(collector: FakeCollector) -> None:
    selfreport.init(collector.dsn, **FAST_OPTIONS)
    assert selfreport.capture_message("via module") is not None
    assert selfreport.capture_exception(raised(ValueError("via module"))) is not None
    assert selfreport.flush(5)
    assert selfreport.stats()["sent"] == 2
    assert selfreport.is_own_report({"x-selfreport-origin": "1:public"})
    assert not selfreport.is_own_report({"x-selfreport-origin": "2:public"})
    selfreport.close()
    assert selfreport._state.current_client() is None
    assert root_selfreport_handlers() == []
    assert not global_hooks.active


def test_hooks_instance_is_shared_and_idempotent() -> None:
    assert isinstance(global_hooks, Hooks)
    selfreport.init(logging_level=None)
    selfreport.init(logging_level=None)
    assert sys.excepthook == global_hooks._sys_hook
    assert global_hooks._patches.replaced(sys, "excepthook") != global_hooks._sys_hook


# --- rarer paths -----------------------------------------------------------------------------


def test_hooked_exception_inside_the_path_is_dropped(make_client: ClientFactory) -> None:
    client, transport = memory_client(make_client)
    with reporting_path():
        client.capture_hooked(raised(ValueError("hooked")), "threading", True)
    assert client.flush(5)
    assert transport.events == []
    assert client.stats()["dropped_reentrant"] == 1


def test_a_close_racing_a_capture_counts_the_event_as_closed(make_client: ClientFactory) -> None:
    client, _ = memory_client(make_client, dedupe_window=60)

    class ClosesWhileFormatted:
        def __str__(self) -> str:
            client._worker.stop(0)  # as if close() ran on another thread right now
            return "value"

    record = logging.LogRecord(
        "app", logging.ERROR, __file__, 1, "v=%s", (ClosesWhileFormatted(),), None
    )
    client._closed.set()
    client._closed.clear()
    assert client.capture_record(record) is None
    stats = client.stats()
    assert stats["dropped_queue_full"] == 1
    assert stats["captured"] == 0
    # Forgotten: a later one may go.
    assert client._admission.deduper.admit(Fingerprint("app", "v=%s")) == 0


def test_an_event_still_in_before_send_at_the_close_deadline_is_not_sent(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        entered.set()
        release.wait(10)
        return event

    client = make_client(collector.dsn, before_send=slow_before_send)
    client.capture_message("slow")
    assert entered.wait(5)
    client.close(timeout=0.05)
    release.set()
    assert client._worker._thread is not None
    client._worker._thread.join(5)
    assert client.stats()["send_failed"] == 1
    assert collector.requests == []


def test_close_timeout_with_a_transport_that_cannot_be_interrupted(
    make_client: ClientFactory,
) -> None:
    held = HeldTransport()
    client = make_client(transport=held)
    client.capture_message("stuck")
    assert wait_until(lambda: client.stats()["queue_size"] == 0)
    client.close(timeout=0.05)
    held.release.set()
    assert client._worker._thread is not None
    client._worker._thread.join(5)
    assert client.stats()["sent"] == 1


def test_repeat_summaries_stop_when_the_queue_is_full(make_client: ClientFactory) -> None:
    held = HeldTransport()
    client = make_client(transport=held, dedupe_window=60, max_queue=1)
    client.capture_message("a")
    assert wait_until(lambda: client.stats()["queue_size"] == 0)  # "a" is being sent
    for text in ("a", "b"):  # a repeat, and a first "b" that fills the queue
        client.capture_message(text)
    client.close(timeout=0.05)  # no room for the summary of "a": it is not queued
    held.release.set()
    assert client._worker._thread is not None
    client._worker._thread.join(5)
    assert len(held.sent) == 1
    stats = client.stats()
    assert (stats["captured"], stats["dropped_closed"], stats["deduplicated"]) == (2, 1, 1)


def test_after_fork_of_a_closed_http_client(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    client = make_client(collector.dsn)
    client.capture_message("before the fork")
    assert client.flush(5)
    assert isinstance(client.transport, HttpTransport)
    connection = client.transport._conn
    client.close(timeout=1)
    client.after_fork_in_child()
    assert client._closed.is_set()  # closed in the parent, closed in the child
    assert client.transport._conn is None
    if connection is not None:
        connection.close()


def test_fork_handler_resets_every_live_client(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, transport = memory_client(make_client)
    client.capture_message("parent")
    assert client.flush(5)
    client._worker.stop(5)
    client.after_fork_in_child()  # what the fork registry runs in a child (tests/core/test_fork.py)
    assert client.stats()["sent"] == 0
    client.capture_message("child")
    assert client.flush(5)
    assert messages(transport.events) == ["parent", "child"]


def test_global_hooks_report_through_the_global_client(collector: FakeCollector) -> None:
    saved = (sys.excepthook, threading.excepthook)
    printed: list[BaseException] = []
    sys.excepthook = lambda t, e, tb: printed.append(e)
    threading.excepthook = lambda args: printed.append(args.exc_value)  # type: ignore[assignment,return-value]
    try:
        selfreport.init(collector.dsn, **FAST_OPTIONS)
        exc = raised(RuntimeError("uncaught"))
        sys.excepthook(type(exc), exc, exc.__traceback__)

        def fail() -> None:
            raise ValueError("in a thread started in the path")

        with reporting_path():
            thread = threading.Thread(target=fail)
            thread.start()
        thread.join(5)
        assert selfreport.flush(5)
        assert collector.wait_for(1)
        assert selfreport.stats()["dropped_reentrant"] == 1
        selfreport.close()
        sys.excepthook(type(exc), exc, exc.__traceback__)  # no client, no hooks: just printed
    finally:
        sys.excepthook, threading.excepthook = saved
    (event,) = collector.events
    assert event["exception"]["values"][0]["mechanism"] == {"type": "excepthook", "handled": False}
    assert event["level"] == "error"  # Sentry convention: handled=False marks it
    assert len(printed) == 3


def test_hook_callbacks_without_a_client_do_nothing() -> None:
    state_module._hook_capture(ValueError(), "excepthook", True)
    state_module._hook_reentrant("thread exception")


def test_at_exit_closes_the_global_client(collector: FakeCollector) -> None:
    client = selfreport.init(collector.dsn, **FAST_OPTIONS)
    client.capture_message("delivered at exit")
    state_module._at_exit()
    assert client._closed.is_set()
    assert client.stats()["sent"] == 1
    state_module._at_exit()  # a second time, or with no client: nothing to do


def test_state_lock_is_fresh_after_fork() -> None:
    lock = state_module._lock
    state_module._after_fork_in_child()
    assert state_module._lock is not lock


# --- wiring of destinations, the spool and statsd (their behaviour has its own tests) --------


@pytest.fixture
def second_collector() -> Iterator[FakeCollector]:
    fake = FakeCollector(project_id="2", public_key="second").start()
    yield fake
    fake.stop()


def test_destinations_receive_every_event(
    collector: FakeCollector, second_collector: FakeCollector, make_client: ClientFactory
) -> None:
    client = make_client(collector.dsn, destinations=[second_collector.dsn])
    client.capture_message("to both")
    assert client.flush(5)
    assert collector.wait_for(1)
    assert second_collector.wait_for(1)
    assert collector.events[0]["event_id"] == second_collector.events[0]["event_id"]
    client.close(timeout=2)
    assert client.destinations[0].stats()["sent"] == 1


def test_a_destination_alone_enables_the_client(
    second_collector: FakeCollector, make_client: ClientFactory
) -> None:
    destination = Destination(second_collector.dsn)
    client = make_client(destinations=destination)
    assert client.enabled
    assert client.transport is None
    client.capture_message("only to the destination")
    assert client.flush(5)
    assert second_collector.wait_for(1)


def test_destinations_still_get_events_while_the_main_upstream_holds_back(
    collector: FakeCollector, second_collector: FakeCollector, make_client: ClientFactory
) -> None:
    collector.status = 429
    collector.response_headers = {"Retry-After": "60"}
    client = make_client(collector.dsn, destinations=[second_collector.dsn])
    client.capture_message("first")
    assert client.flush(5)
    client.capture_message("second")
    assert client.flush(5)
    assert second_collector.wait_for(2)
    assert len(collector.requests) == 1
    assert client.stats()["dropped_rate_limited"] == 2


def test_bad_destinations_raise_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Client(None, destinations=[42])  # type: ignore[list-item]
    assert info.value.option == "destinations"


def test_spool_needs_somewhere_to_replay_to(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Client(None, spool_dir=tmp_path)
    assert info.value.option == "spool_dir"


def test_spooled_events_are_replayed_by_the_next_client(
    collector: FakeCollector, make_client: ClientFactory, tmp_path: Path
) -> None:
    collector.status = 503
    client = make_client(collector.dsn, spool_dir=tmp_path, max_retries=0)
    client.capture_message("kept on disk")
    assert client.flush(5)
    client.close(timeout=0.5)
    assert client.stats()["spooled"] == 1
    collector.status = 200
    replaying = make_client(collector.dsn, spool_dir=tmp_path)
    assert wait_until(lambda: bool(collector.events))
    assert collector.events[-1]["logentry"]["message"] == "kept on disk"
    assert wait_until(lambda: replaying.stats()["replayed"] == 1)


def test_statsd_gets_the_counters(make_client: ClientFactory) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        client = make_client(transport=MemoryTransport(), statsd=f"127.0.0.1:{port}")
        client.capture_message("counted")
        assert client.flush(5)
        client.close(timeout=2)  # the last counts go out at close
        datagram = server.recv(65536).decode()
    assert "selfreport" in datagram


def test_finalizer_exceptions_on_our_own_threads_are_dropped(make_client: ClientFactory) -> None:
    # GC can run a finalizer on our worker while it holds its queue lock: never re-enter it.
    client, transport = memory_client(make_client)
    outcome: list[int] = []

    def on_a_selfreport_thread() -> None:
        from selfreport._core.guard import enter_thread_for_life

        enter_thread_for_life()
        client.capture_hooked(raised(ValueError("gc")), "unraisablehook", False)
        outcome.append(client.stats()["dropped_reentrant"])

    thread = threading.Thread(target=on_a_selfreport_thread)
    thread.start()
    thread.join()
    assert client.flush(5)
    assert transport.events == []
    assert outcome == [1]
