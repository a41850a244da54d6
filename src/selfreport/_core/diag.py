"""selfreport's own problems: the ``selfreport`` logger and a rate-limited stderr fallback."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from .guard import reporting_path

__all__ = ["Diagnostics", "logger"]

logger = logging.getLogger("selfreport")
# Like urllib3: silent unless the application configures logging; the stderr line below is ours.
logger.addHandler(logging.NullHandler())


class Diagnostics:
    """Tells about selfreport's own trouble without ever feeding it back into reporting.

    ``once(kind, ...)`` writes the first occurrence of each kind to stderr; ``warn`` writes at
    most one line per ``interval`` seconds per kind. Both also log to the ``selfreport`` logger,
    which selfreport's handler never reports.
    """

    def __init__(
        self,
        interval: float = 60.0,
        stream: Optional[Callable[[], Optional[TextIO]]] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._stream = stream or (lambda: sys.stderr)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.RLock()

    def _should_write(self, kind: str, once: bool) -> bool:
        last = self._last.get(kind)
        if last is not None and (once or self._clock() - last < self.interval):
            return False  # the usual answer in a storm, without taking the lock
        with self._lock:
            now = self._clock()
            last = self._last.get(kind)
            if last is not None and (once or now - last < self.interval):
                return False
            self._last[kind] = now
            return True

    def once(self, kind: str, message: str) -> None:
        if self._should_write(kind, once=True):
            with reporting_path():
                self._emit(message)
                logger.info("%s", message)

    def warn(self, kind: str, message: str) -> None:
        if self._should_write(kind, once=False):
            with reporting_path():
                self._emit(message)
                logger.warning("%s", message)

    def _emit(self, message: str) -> None:
        try:
            stream = self._stream()
            if stream is not None:
                stream.write(f"selfreport: {message}\n")
                stream.flush()
        except Exception:  # a closed or broken stderr must not matter
            pass

    def reset_after_fork(self) -> None:
        self._lock = threading.RLock()
