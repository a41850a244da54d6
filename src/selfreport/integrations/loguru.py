"""A loguru sink that reports error records through selfreport's guarded pipeline."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, Union

from selfreport._core.guard import is_reporting, originated_in_reporting_path
from selfreport._core.options import check_callable
from selfreport._state import current_client
from selfreport.integrations import requires

with requires(__name__, "loguru", "loguru"):
    import loguru

if TYPE_CHECKING:
    from selfreport._client import Client

__all__ = ["LoguruSink", "add_sink", "log_record"]


def log_record(record: Any) -> logging.LogRecord:
    """The :class:`logging.LogRecord` equivalent of a loguru ``message.record`` dict."""
    exception = record.get("exception")
    exc_info = None
    if exception is not None and exception.value is not None:
        exc_info = (exception.type, exception.value, exception.traceback)
    file = record.get("file")
    out = logging.LogRecord(
        name=record.get("name") or "loguru",
        level=record["level"].no,
        pathname=getattr(file, "path", "") or "",
        lineno=record.get("line") or 0,
        msg=record.get("message", ""),
        args=None,
        exc_info=exc_info,
        func=record.get("function"),
    )
    out.levelname = record["level"].name
    when = record.get("time")
    if when is not None:
        out.created = when.timestamp()
        out.msecs = (out.created - int(out.created)) * 1000
    thread = record.get("thread")
    if thread is not None:
        out.thread, out.threadName = thread.id, thread.name
    # bind()/contextualize() values and format arguments become the event's "extra".
    for key, value in (record.get("extra") or {}).items():
        out.__dict__[key if key not in out.__dict__ else f"loguru.{key}"] = value
    return out


class LoguruSink:
    """Reports the loguru records it receives through a selfreport client::

        from loguru import logger
        from selfreport.integrations.loguru import add_sink

        selfreport.init(dsn)
        add_sink(level="ERROR")

    With no ``client`` it uses the global one made by :func:`selfreport.init`. Records logged
    inside the reporting path are dropped (and counted) by :meth:`filter`, which loguru runs on
    the logging thread even when the sink is ``enqueue=True``; :func:`add_sink` installs both.
    """

    def __init__(self, client: Optional[Client] = None) -> None:
        self.client = client

    def filter(self, record: Any) -> bool:
        """False for records born inside the reporting path; runs on the logging thread."""
        if not is_reporting():
            exception = record.get("exception")
            if exception is None or not originated_in_reporting_path(exception.value):
                return True
        client = current_client(self.client)
        if client is not None:
            client.drop_reentrant("log record")
        return False

    def __call__(self, message: Any) -> None:
        client = current_client(self.client)
        if client is None:
            return
        try:
            # capture_record repeats the reporting-path check, for sinks added without filter.
            client.capture_record(log_record(message.record))
        except Exception as error:  # pragma: no cover - capture_record never raises
            client.diagnostics.warn("loguru_error", f"could not report a loguru record: {error!r}")


def add_sink(
    logger: Any = None,
    *,
    level: Union[int, str] = "ERROR",
    client: Optional[Client] = None,
    **options: Any,
) -> int:
    """Add a :class:`LoguruSink` to ``logger`` (default: loguru's global logger).

    ``options`` go to ``logger.add`` (``enqueue``, ``filter``, ...); a callable ``filter`` runs
    after the reporting-path check. Returns loguru's handler id, for ``logger.remove(id)``.

    Raises:
        ConfigError: ``filter`` is given and is not callable (use loguru's string or dict
            filters by adding :class:`LoguruSink` yourself with ``filter=`` composed).
    """
    target = logger if logger is not None else loguru.logger
    sink = LoguruSink(client)
    user_filter = options.pop("filter", None)
    check_callable("filter", user_filter)
    if user_filter is None:
        record_filter = sink.filter
    else:

        def record_filter(record: Any) -> bool:
            return sink.filter(record) and bool(user_filter(record))

    handler_id: int = target.add(sink, level=level, filter=record_filter, **options)
    return handler_id
