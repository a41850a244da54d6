"""The logging handler that feeds log records into selfreport's guarded pipeline."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, Union

from . import _state
from ._core.guard import in_nested_log_record, is_reporting, record_born_in_path

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["LoggingHandler"]


class LoggingHandler(logging.Handler):
    """Reports records at ``level`` and above through a selfreport client.

    With no ``client`` it reports through the global one made by :func:`selfreport.init`, so
    it can be declared in ``logging.config.dictConfig``::

        {"class": "selfreport.LoggingHandler", "level": "ERROR"}

    Records that originate inside the reporting path are dropped (and counted) before anything
    is formatted; other handlers still receive them.
    """

    def __init__(self, level: Union[int, str] = logging.ERROR, client: Optional[Client] = None):
        super().__init__(level)
        self.client = client

    # handle(), not emit(): the drop decision comes before Handler.handle takes its lock.
    def handle(self, record: logging.LogRecord) -> bool:
        client = _state.current_client(self.client)
        if client is None:
            return False
        if is_reporting() or in_nested_log_record() or record_born_in_path(record):
            client.drop_reentrant("log record")
            return False
        verdict: object = self.filter(record)
        if not verdict:
            return False
        if isinstance(verdict, logging.LogRecord):  # Python 3.12+: filters may swap the record
            record = verdict
        try:
            client.capture_record(record)
        except Exception:  # pragma: no cover - capture_record never raises; belt and braces
            pass
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)
