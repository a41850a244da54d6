"""The structlog processor and the stdlib-bridge recipe, counted at a real endpoint."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable

import pytest
import structlog

import selfreport
from selfreport import Client, ConfigError, LoggingHandler
from selfreport.integrations.structlog import SelfreportProcessor, log_record
from selfreport.testing import FakeCollector

ClientFactory = Callable[..., Client]


def settle(client: Client, collector: FakeCollector, expected: int) -> int:
    """Wait for ``expected`` events, then until nothing is queued or in flight: flush() cannot
    finish while a loop keeps adding reports, so what has arrived then is all that comes."""
    collector.wait_for(expected, timeout=10.0)
    assert client.flush(10.0)
    return len(collector.events)


def make_logger(processor: Any) -> Any:
    """A structlog logger that returns what it renders, with ``processor`` in its chain."""
    processors = [structlog.processors.add_log_level]
    if processor is not None:
        processors.append(processor)
    processors += [structlog.processors.format_exc_info, structlog.processors.KeyValueRenderer()]
    return structlog.wrap_logger(structlog.ReturnLogger(), processors=processors)


def charge(order: int) -> None:
    raise ValueError(f"card declined for order {order}")


def test_errors_are_reported_with_exception_and_context(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    client = make_client(collector.dsn)
    log = make_logger(SelfreportProcessor(client=client)).bind(logger="payments", order=42)
    plain = make_logger(None).bind(logger="payments", order=42)

    assert log.warning("retrying") == plain.warning("retrying")
    try:
        charge(42)
    except ValueError:
        rendered = log.exception("payment failed", attempt=3)
    assert "event='payment failed'" in rendered
    assert "ValueError: card declined for order 42" in rendered  # passed on unchanged
    assert settle(client, collector, 1) == 1

    event = collector.events[0]
    assert event["logger"] == "payments"
    assert event["level"] == "error"
    assert event["logentry"]["message"] == "payment failed"
    assert event["extra"]["order"] == 42
    assert event["extra"]["attempt"] == 3
    assert "level" not in event["extra"]
    assert event["exception"]["values"][-1]["type"] == "ValueError"
    assert event["exception"]["values"][-1]["stacktrace"]["frames"][-1]["function"] == "charge"


def test_repeats_of_one_event_are_deduplicated_by_its_name(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    client = make_client(collector.dsn, dedupe_window=60)
    log = make_logger(SelfreportProcessor(client=client))
    for order in range(5):
        log.error("payment failed", order=order)
    assert settle(client, collector, 1) == 1
    assert client.stats()["deduplicated"] == 4


def test_before_send_that_logs_through_structlog_gives_one_event(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    log: Any = None

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        log.error("before_send could not enrich an event")
        return event

    client = make_client(collector.dsn, before_send=before_send)
    log = make_logger(SelfreportProcessor(client=client))
    log.error("the original error")
    with selfreport.reporting_path():
        log.critical("inside the reporting path")
    assert settle(client, collector, 1) == 1
    assert collector.events[0]["logentry"]["message"] == "the original error"
    assert client.stats()["dropped_reentrant"] == 2


def test_level_threshold_and_the_global_client(collector: FakeCollector) -> None:
    client = selfreport.init(collector.dsn, logging_level=None, install_hooks=False)
    log = make_logger(SelfreportProcessor(level=logging.WARNING))
    log.info("not reported")
    log.warning("disk almost full")
    log.msg("not reported either")
    assert settle(client, collector, 1) == 1
    assert collector.events[0]["level"] == "warning"
    assert collector.events[0]["logger"] == "structlog"


def test_without_a_client_events_pass_through() -> None:
    log = make_logger(SelfreportProcessor())
    assert "event='nobody listens'" in log.error("nobody listens")


def test_a_broken_event_never_raises_into_the_logging_call(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    client = make_client(collector.dsn)
    log = make_logger(SelfreportProcessor(client=client))
    assert "lineno='not a number'" in log.error("odd call site", lineno="not a number")
    assert client.stats()["captured"] == 0


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ConfigError, match="level"):
        SelfreportProcessor(level="loud")
    with pytest.raises(ConfigError, match="level"):
        SelfreportProcessor(level=None)  # type: ignore[arg-type]


def test_log_record_reads_exc_info_in_every_form() -> None:
    error = KeyError("missing")
    try:
        raise error
    except KeyError:
        from_true = log_record(None, "exception", {"event": "e", "exc_info": True})
    assert log_record(None, "error", {"event": "e", "exc_info": True}).exc_info is None
    from_instance = log_record(None, "error", {"event": "e", "exc_info": error})
    from_tuple = log_record(None, "error", {"event": "e", "exc_info": (KeyError, error, None)})
    assert from_true.exc_info is not None
    assert from_true.exc_info[1] is error
    assert from_instance.exc_info is not None
    assert from_instance.exc_info[1] is error
    assert from_tuple.exc_info == (KeyError, error, None)
    assert log_record(None, "error", {"event": "e", "exc_info": "yes"}).exc_info is None

    named = log_record(logging.getLogger("orders"), "warn", {"event": 42, "msg": "clash"})
    assert (named.name, named.levelno, named.getMessage()) == ("orders", logging.WARNING, "42")
    assert named.__dict__["structlog.msg"] == "clash"
    assert log_record(None, "custom", {"event": "e", "level": 35}).levelno == 35


def test_stdlib_bridge_recipe_reports_through_the_logging_handler(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    client = make_client(collector.dsn)
    handler = LoggingHandler(client=client)
    stdlib_logger = logging.getLogger("payments.bridge")
    stdlib_logger.addHandler(handler)
    try:
        log = structlog.wrap_logger(
            stdlib_logger,
            wrapper_class=structlog.stdlib.BoundLogger,
            processors=[
                structlog.stdlib.filter_by_level,
                structlog.stdlib.add_log_level,
                structlog.stdlib.render_to_log_kwargs,
            ],
        )
        try:
            charge(7)
        except ValueError:
            log.exception("payment failed", order=7)
        log.info("below the handler's level")
    finally:
        stdlib_logger.removeHandler(handler)
    assert settle(client, collector, 1) == 1
    event = collector.events[0]
    assert event["logger"] == "payments.bridge"
    assert event["logentry"]["message"] == "payment failed"
    assert event["extra"]["order"] == 7
    assert event["exception"]["values"][-1]["type"] == "ValueError"


def test_import_without_structlog_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "selfreport.integrations.structlog")
    monkeypatch.setitem(sys.modules, "structlog", None)
    with pytest.raises(ImportError, match=r"pip install 'selfreport\[structlog\]'"):
        importlib.import_module("selfreport.integrations.structlog")
