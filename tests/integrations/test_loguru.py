"""The loguru sink: error records reach a real endpoint once; the reporting path stays silent."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from loguru import logger

import selfreport
from selfreport import Client, ConfigError
from selfreport.integrations.loguru import LoguruSink, add_sink, log_record
from selfreport.testing import FakeCollector

ClientFactory = Callable[..., Client]


@pytest.fixture
def sinks() -> Iterator[list[int]]:
    """Handler ids to remove from loguru's global logger after the test."""
    ids: list[int] = []
    yield ids
    for handler_id in ids:
        logger.remove(handler_id)


def settle(client: Client, collector: FakeCollector, expected: int) -> int:
    """Wait for ``expected`` events, then until nothing is queued or in flight: flush() cannot
    finish while a loop keeps adding reports, so what has arrived then is all that comes."""
    collector.wait_for(expected, timeout=10.0)
    assert client.flush(10.0)
    return len(collector.events)


def charge(order: int) -> None:
    raise ValueError(f"card declined for order {order}")


def test_errors_are_reported_with_exception_and_bound_values(
    collector: FakeCollector, make_client: ClientFactory, sinks: list[int]
) -> None:
    client = make_client(collector.dsn)
    sinks.append(add_sink(client=client))
    logger.warning("below the sink's level")
    try:
        charge(42)
    except ValueError:
        logger.bind(order=42).exception("payment for {customer} failed", customer="ada")
    assert settle(client, collector, 1) == 1

    event = collector.events[0]
    assert event["level"] == "error"
    assert event["logger"] == __name__
    assert event["logentry"]["message"] == "payment for ada failed"
    assert event["exception"]["values"][-1]["type"] == "ValueError"
    assert event["exception"]["values"][-1]["stacktrace"]["frames"][-1]["function"] == "charge"
    assert event["extra"]["order"] == 42
    assert event["extra"]["customer"] == "ada"


def test_before_send_that_logs_through_loguru_gives_one_event(
    collector: FakeCollector, make_client: ClientFactory, sinks: list[int]
) -> None:
    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        logger.error("before_send could not enrich an event")
        return event

    client = make_client(collector.dsn, before_send=before_send)
    # A bare sink (no filter): the check inside capture_record still holds.
    sinks.append(logger.add(LoguruSink(client), level="ERROR"))
    logger.error("the original error")
    assert settle(client, collector, 1) == 1
    assert collector.events[0]["logentry"]["message"] == "the original error"
    assert client.stats()["dropped_reentrant"] == 1


def test_reporting_path_records_are_dropped_even_when_enqueued(
    collector: FakeCollector, make_client: ClientFactory, sinks: list[int]
) -> None:
    client = make_client(collector.dsn)
    sinks.append(add_sink(client=client, enqueue=True))
    with selfreport.reporting_path():
        logger.error("logged inside the reporting path")

    @selfreport.guarded
    def guarded_work() -> None:
        raise RuntimeError("escaped from the reporting path")

    try:
        guarded_work()
    except RuntimeError:
        logger.exception("caught outside the path")
    logger.error("an ordinary error")
    logger.complete()
    assert settle(client, collector, 1) == 1
    assert collector.events[0]["logentry"]["message"] == "an ordinary error"
    assert client.stats()["dropped_reentrant"] == 2


def test_global_client_and_a_callable_filter(collector: FakeCollector, sinks: list[int]) -> None:
    client = selfreport.init(collector.dsn, logging_level=None, install_hooks=False)
    sinks.append(add_sink(filter=lambda record: "noisy" not in record["message"]))
    logger.error("a noisy error")
    logger.critical("a real error")
    assert settle(client, collector, 1) == 1
    assert collector.events[0]["level"] == "fatal"
    assert collector.events[0]["logentry"]["message"] == "a real error"


def test_without_a_client_nothing_happens(sinks: list[int]) -> None:
    sink = LoguruSink()
    sinks.append(logger.add(sink, level="ERROR", filter=sink.filter))
    logger.error("no client anywhere")
    with selfreport.reporting_path():
        assert sink.filter({"exception": None}) is False
    assert sink.filter({"exception": None}) is True


def test_non_callable_filter_is_refused() -> None:
    with pytest.raises(ConfigError, match="filter"):
        add_sink(filter="myapp")


def test_log_record_maps_loguru_fields() -> None:
    records: list[Any] = []
    handler_id = logger.add(lambda message: records.append(message.record), level="INFO")
    try:
        logger.bind(name="clash").success("done {n}", n=3)
    finally:
        logger.remove(handler_id)
    record = log_record(records[0])
    assert (record.levelno, record.levelname) == (25, "SUCCESS")
    assert record.getMessage() == "done 3"
    assert record.funcName == "test_log_record_maps_loguru_fields"
    assert record.name == __name__
    assert record.__dict__["loguru.name"] == "clash"
    assert record.n == 3  # type: ignore[attr-defined]
    assert record.created == records[0]["time"].timestamp()


def test_import_without_loguru_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "selfreport.integrations.loguru")
    monkeypatch.setitem(sys.modules, "loguru", None)
    with pytest.raises(ImportError, match=r"pip install 'selfreport\[loguru\]'"):
        importlib.import_module("selfreport.integrations.loguru")
