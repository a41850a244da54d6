"""The logging handler that feeds log records into selfreport's guarded pipeline."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, Union

from . import _state
from ._capture.scope import record_log_breadcrumb

# The mark is read inline: this runs for every record the root logger sees.
from ._core.guard import record_in_path
from ._core.options import check_level

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

    With ``breadcrumbs_level`` (``logging.INFO``, say; :func:`selfreport.init` passes its
    ``breadcrumbs_level``), records from that level up to ``level`` are recorded as
    breadcrumbs of the current scope instead: their message, rendered now, and logger name.
    """

    def __init__(
        self,
        level: Union[int, str] = logging.ERROR,
        client: Optional[Client] = None,
        *,
        breadcrumbs_level: Union[int, str, None] = None,
    ):
        self.breadcrumbs_level = check_level("breadcrumbs_level", breadcrumbs_level)
        super().__init__(level)
        self.event_level = self.level
        self.setLevel(level)
        self.client = client

    def setLevel(self, level: Union[int, str]) -> None:
        """Report records at ``level`` and above; the handler itself also takes the records
        from ``breadcrumbs_level`` on, to record them as breadcrumbs."""
        super().setLevel(level)
        self.event_level = self.level
        if self.breadcrumbs_level is not None and self.breadcrumbs_level < self.level:
            self.level = self.breadcrumbs_level

    # handle(), not emit(): the drop decision comes before Handler.handle takes its lock.
    def handle(self, record: logging.LogRecord) -> bool:
        client = _state.current_client(self.client)
        if client is None:
            return False
        if record.levelno < self.event_level:  # a breadcrumb, or nothing: the hot path
            crumbs = self.breadcrumbs_level
            if crumbs is None or record.levelno < crumbs:
                return False
            if record_in_path(record):
                client.drop_reentrant_breadcrumb()
                return False
            if self.filters:
                return self._filtered_breadcrumb(record)
            record_log_breadcrumb(record)
            return True
        if record_in_path(record):
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

    def _filtered_breadcrumb(self, record: logging.LogRecord) -> bool:
        verdict: object = self.filter(record)
        if not verdict:
            return False
        if isinstance(verdict, logging.LogRecord):  # Python 3.12+: filters may swap the record
            record = verdict
        record_log_breadcrumb(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)
