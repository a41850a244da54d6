"""A structlog processor that reports error events through selfreport's guarded pipeline."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Optional, Union

from selfreport._capture.event import safe_str
from selfreport._core.guard import is_reporting
from selfreport._state import current_client
from selfreport.exceptions import ConfigError
from selfreport.integrations import requires

with requires(__name__, "structlog", "structlog"):
    import structlog  # noqa: F401 - only to fail early, naming the extra, when it is missing

if TYPE_CHECKING:
    from selfreport._client import Client

__all__ = ["SelfreportProcessor", "log_record"]

EventDict = MutableMapping[str, Any]

_LEVELS = {
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "exception": logging.ERROR,
    "error": logging.ERROR,
    "err": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "msg": logging.INFO,
    "debug": logging.DEBUG,
    "notset": logging.NOTSET,
}
# Keys that describe the event itself rather than being context for it.
_OWN_KEYS = frozenset(("event", "level", "exc_info", "logger", "timestamp", "stack_info"))


def _levelno(value: object) -> Optional[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _LEVELS.get(value.lower())
    return None


def _exc_info(value: object) -> Any:
    if value is True:
        info = sys.exc_info()
        return info if info[1] is not None else None
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and value[1] is not None:
        return value
    return None


def log_record(logger: Any, method_name: str, event_dict: EventDict) -> logging.LogRecord:
    """The :class:`logging.LogRecord` equivalent of a structlog event dict."""
    name = event_dict.get("logger") or getattr(logger, "name", None) or "structlog"
    level = _levelno(event_dict.get("level")) or _levelno(method_name) or logging.ERROR
    out = logging.LogRecord(
        name=safe_str(name, 256),
        level=level,
        pathname=str(event_dict.get("pathname") or ""),
        lineno=int(event_dict.get("lineno") or 0),
        msg=safe_str(event_dict.get("event", "")),
        args=None,
        exc_info=_exc_info(event_dict.get("exc_info")),
        func=event_dict.get("func_name"),
    )
    # The bound key-value context becomes the event's "extra", rendered now (at call time).
    for key, value in event_dict.items():
        if key not in _OWN_KEYS:
            out.__dict__[key if key not in out.__dict__ else f"structlog.{key}"] = value
    return out


class SelfreportProcessor:
    """A structlog processor: events at ``level`` and above are reported, then passed on.

    Put it before processors that render exceptions (``format_exc_info``, ``dict_tracebacks``)
    and before the renderer, so it still sees the exception object::

        structlog.configure(processors=[
            structlog.processors.add_log_level,
            SelfreportProcessor(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ])

    The event (``log.error("payment failed", order=42)``: ``"payment failed"``) is the message
    template selfreport dedupes by; the key-value pairs travel as the event's ``extra``. With no
    ``client`` it reports through the global one made by :func:`selfreport.init`. Events logged
    inside the reporting path are dropped (and counted) before anything is built from them.

    If structlog is wired to the standard library instead (``structlog.stdlib.LoggerFactory``
    with ``render_to_log_kwargs``), do not add this processor: selfreport's
    :class:`~selfreport.LoggingHandler` already reports those records (see docs/integrations.md).
    """

    def __init__(self, level: Union[int, str] = "error", client: Optional[Client] = None):
        levelno = _levelno(level)
        if levelno is None:
            raise ConfigError("level", f"unknown log level {level!r}")
        self.levelno = levelno
        self.client = client

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        levelno = _levelno(event_dict.get("level")) or _levelno(method_name)
        if levelno is None or levelno < self.levelno:
            return event_dict
        client = current_client(self.client)
        if client is None:
            return event_dict
        if is_reporting():
            client.drop_reentrant("log record")
            return event_dict
        try:
            client.capture_record(log_record(logger, method_name, event_dict))
        except Exception as error:  # never raise into the logging call
            client.diagnostics.warn(
                "structlog_error", f"could not report a structlog event: {error!r}"
            )
        return event_dict
