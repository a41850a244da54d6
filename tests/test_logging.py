"""The logging handler: dictConfig, the guard, other handlers, and the selfreport logger."""

from __future__ import annotations

import logging
import logging.config
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import selfreport
from selfreport import LoggingHandler, reporting_path
from selfreport.testing import FakeCollector, MemoryTransport

from .conftest import FAST_OPTIONS, ClientFactory


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("test_logging.app")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.handlers.clear()
    log.propagate = True
    log.setLevel(logging.NOTSET)


def test_handler_reports_through_its_client(
    logger: logging.Logger, make_client: ClientFactory
) -> None:
    transport = MemoryTransport()
    client = make_client(transport=transport)
    handler = LoggingHandler(client=client)
    logger.addHandler(handler)
    logger.warning("below the handler's level")
    logger.error("reported %d", 1)
    try:
        raise ValueError("logged with a traceback")
    except ValueError:
        logger.exception("it failed")
    assert client.flush(5)
    assert [e["logentry"]["message"] for e in transport.events] == ["reported %d", "it failed"]
    assert transport.events[0]["logger"] == "test_logging.app"
    assert transport.events[1]["exception"]["values"][0]["type"] == "ValueError"
    assert handler.level == logging.ERROR


def test_handler_from_dict_config(logger: logging.Logger, collector: FakeCollector) -> None:
    selfreport.init(collector.dsn, logging_level=None, **FAST_OPTIONS)
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"report": {"class": "selfreport.LoggingHandler", "level": "WARNING"}},
            "loggers": {"test_logging.app": {"handlers": ["report"], "propagate": False}},
        }
    )
    (handler,) = logger.handlers
    assert isinstance(handler, LoggingHandler)
    assert handler.level == logging.WARNING
    logger.warning("via dictConfig")
    assert selfreport.flush(5)
    assert collector.wait_for(1)
    assert collector.events[0]["level"] == "warning"


def test_handler_without_any_client_is_a_no_op(logger: logging.Logger) -> None:
    handler = LoggingHandler()
    logger.addHandler(handler)
    logger.error("nobody is listening")  # must not raise
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "m", (), None)
    assert handler.handle(record) is False


def test_other_handlers_still_receive_records_the_guard_drops(
    logger: logging.Logger, make_client: ClientFactory
) -> None:
    transport = MemoryTransport()
    client = make_client(transport=transport)
    others = ListHandler()
    logger.addHandler(LoggingHandler(client=client))
    logger.addHandler(others)
    with reporting_path():
        logger.error("inside the reporting path")
    logger.error("outside")
    assert client.flush(5)
    assert [r.getMessage() for r in others.records] == ["inside the reporting path", "outside"]
    assert [e["logentry"]["message"] for e in transport.events] == ["outside"]
    assert client.stats()["dropped_reentrant"] == 1


def test_the_selfreport_logger_is_never_reported(make_client: ClientFactory) -> None:
    transport = MemoryTransport()
    client = make_client(transport=transport)
    handler = LoggingHandler(client=client)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logging.getLogger("selfreport").error("selfreport's own trouble")
        logging.getLogger("selfreport.transport").error("also ours")
    finally:
        root.removeHandler(handler)
    assert client.flush(5)
    assert transport.events == []


def test_filters_apply_before_capture(logger: logging.Logger, make_client: ClientFactory) -> None:
    transport = MemoryTransport()
    client = make_client(transport=transport)
    handler = LoggingHandler(client=client)
    handler.addFilter(lambda record: "secret" not in record.getMessage())
    logger.addHandler(handler)
    logger.error("has a secret")
    logger.error("harmless")
    assert client.flush(5)
    assert [e["logentry"]["message"] for e in transport.events] == ["harmless"]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="filters return records from 3.12 on")
def test_a_filter_may_replace_the_record(
    logger: logging.Logger, make_client: ClientFactory
) -> None:
    transport = MemoryTransport()
    client = make_client(transport=transport)

    def redact(record: logging.LogRecord) -> logging.LogRecord:
        return logging.makeLogRecord({**record.__dict__, "msg": "redacted", "args": ()})

    handler = LoggingHandler(client=client)
    handler.addFilter(redact)
    logger.addHandler(handler)
    logger.error("password %s", "hunter2")
    assert client.flush(5)
    assert transport.events[0]["logentry"] == {"message": "redacted"}


def test_emit_delegates_to_handle(make_client: ClientFactory) -> None:
    transport = MemoryTransport()
    client = make_client(transport=transport)
    LoggingHandler(client=client).emit(
        logging.LogRecord("direct", logging.ERROR, __file__, 1, "emitted", (), None)
    )
    assert client.flush(5)
    assert transport.events[0]["logentry"]["message"] == "emitted"


def test_a_record_logged_while_another_handler_formats_is_dropped(
    collector: FakeCollector,
) -> None:
    selfreport.init(collector.dsn, **FAST_OPTIONS)  # installs the nested-record guard
    app = logging.getLogger("test_logging.nested")

    class Noisy:
        def __str__(self) -> str:
            app.error("formatting a log argument failed")
            return "noisy"

    class FormattingHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            self.format(record)

    formatting = FormattingHandler()
    root = logging.getLogger()
    root.handlers.insert(0, formatting)  # runs before selfreport's root handler
    try:
        app.error("value is %s", Noisy())
    finally:
        root.removeHandler(formatting)
    assert selfreport.flush(5)
    assert collector.wait_for(1)
    assert [e["logentry"]["message"] for e in collector.events] == ["value is %s"]
    assert selfreport.stats()["dropped_reentrant"] >= 1


def test_handler_level_accepts_names(make_client: ClientFactory) -> None:
    client: Any = make_client(transport=MemoryTransport())
    assert LoggingHandler("CRITICAL", client=client).level == logging.CRITICAL


class Unprintable:
    """An argument whose rendering raises what ``except Exception`` does not catch."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error
        self.armed = True  # disarmed before the asserts, so pytest can show a failure

    def __str__(self) -> str:
        if self.armed:
            raise self.error("from __str__")
        return "Unprintable"

    def __repr__(self) -> str:
        if self.armed:
            raise self.error("from __repr__")
        return "Unprintable()"


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise SystemExit("from the exception's __str__")


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_base_exception_from_rendering_an_argument_never_escapes(
    make_client: ClientFactory, error: type[BaseException]
) -> None:
    # Plain logging with a NullHandler renders nothing, so raises nothing: neither may we.
    transport = MemoryTransport()
    client = make_client(transport=transport, include_locals=True)
    logger = logging.Logger("isolated")  # no parent: no handler of pytest's formats records
    logger.addHandler(LoggingHandler(client=client))
    evil = Unprintable(error)
    try:
        logger.error("value %s", evil, extra={"payload": evil})
        logger.error("mapping %(a)s", {"a": evil})
        try:
            raise UnprintableError()
        except UnprintableError:
            logger.exception("local %s", "ok")  # `evil` is a local of this frame
        captured = client.capture_message(evil)  # type: ignore[arg-type]
        assert client.flush(5)
    finally:
        evil.armed = False
    assert captured is not None
    assert len(transport.events) == 4
    first = transport.events[0]
    assert first["logentry"]["message"] == "value %s"
    assert "unrepresentable Unprintable" in str(first["logentry"]["params"])
    assert "unrepresentable Unprintable" in str(first["extra"]["payload"])
    third = transport.events[2]
    assert "unprintable UnprintableError: SystemExit" in third["exception"]["values"][0]["value"]
    assert "unrepresentable Unprintable" in str(third["exception"]["values"][0]["stacktrace"])


def test_a_before_send_raising_system_exit_drops_and_counts(make_client: ClientFactory) -> None:
    def before_send(event: Any, hint: Any) -> Any:
        raise SystemExit("in before_send")

    transport = MemoryTransport()
    client = make_client(transport=transport, before_send=before_send)
    client.capture_message("dropped, counted")
    assert client.flush(5)
    assert transport.events == []
    assert client.stats()["dropped_error"] == 1
