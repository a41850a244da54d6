"""Limits on what any client can send, enforced on the connection itself, before the app runs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from selfreport._core.guard import reporting_path

__all__ = [
    "DEFAULT_MAX_BODY",
    "HttpLimits",
    "LogThrottle",
    "ThrottleFilter",
    "loop_exception_handler",
    "protocol_class",
]

logger = logging.getLogger("selfreport.collector")

DEFAULT_MAX_BODY = 20 * 1024 * 1024

# Why a reply was refused, as the ``reason`` label of the collector's rejection counter.
OnReject = Callable[[str], None]


@dataclass(frozen=True)
class HttpLimits:
    """Everything a client, with or without a key, may send, and how slowly.

    Attributes:
        max_request_line: longest request target (path and query), in bytes; else 414.
        max_header_bytes: request line and headers together, in bytes; else 431.
        max_headers: most header fields in one request; else 431.
        max_body: largest request body on any route, chunked or not, in bytes; else 413
            (ingestion also holds the decompressed body to it).
        header_timeout: seconds from connecting (or from a request's first byte on a
            keep-alive connection) to the end of its headers; else 408 and closed.
        body_timeout: seconds for a request's whole body to arrive; else 408 and closed.
        keep_alive_timeout: seconds an idle keep-alive connection stays open.
        max_connections: open connections served at once; the ones beyond get a 503.

    The timeouts are checked together, every second (a quarter of the shortest when that is
    under 4 s), so a connection is closed up to that much after its deadline.
    """

    max_request_line: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body: int = DEFAULT_MAX_BODY
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: int = 5
    max_connections: int = 1000


class LogThrottle:
    """At most one log line per ``interval`` seconds; the next one says how many were left out.

    For lines any stranger can cause (one per bad request would let a flood fill the disk).
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def admit(self) -> Optional[int]:
        """None: leave this line out; else how many were left out before it."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self.interval
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed

    def log(self, logger: logging.Logger, level: int, message: str, *args: object) -> None:
        """``logger.log(level, message, *args)`` unless throttled, inside the reporting path
        (what a request's failure logs was reported already, or is not worth a report)."""
        suppressed = self.admit()
        if suppressed is None:
            return
        if suppressed:
            message += " (%d similar lines left out)"
            args += (suppressed,)
        with reporting_path():
            logger.log(level, message, *args)


class ThrottleFilter(logging.Filter):
    """A logging filter passing one warning-or-worse record per interval (uvicorn's own lines
    about requests: a traceback per failing request, a warning per malformed one)."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.throttle = LogThrottle(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        suppressed = self.throttle.admit()
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar lines left out)"
        return suppressed is not None


def protocol_class(limits: HttpLimits, on_reject: OnReject) -> Optional[type[asyncio.Protocol]]:
    """uvicorn's httptools protocol, enforcing ``limits``; None without httptools (PyPy),
    where uvicorn's h11 protocol bounds the headers (``h11_max_incomplete_event_size``)."""
    try:
        # Imported here: the CLI imports this module (for --help) without uvicorn.
        from .protocol import limited_protocol
    except ImportError:  # pragma: no cover - httptools is installed on CPython
        return None
    return limited_protocol(limits, on_reject)


# Read at each use (tests replace them).
_malformed = LogThrottle()
_accept_failures = LogThrottle()


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The serving loop's exception handler: out of file descriptors, asyncio's accept loop
    reports the failure once per pending connection (up to the backlog, each second, each
    with a traceback); here that is one line a second. Anything else goes to the default."""
    if context.get("message") == "socket.accept() out of system resource":
        _accept_failures.log(
            logger,
            logging.ERROR,
            "cannot accept connections: %s (retrying every second; raise the file limit, "
            "ulimit -n, or lower max_connections; slow and idle clients are closed after "
            "the header timeout)",
            context.get("exception"),
        )
        return
    loop.default_exception_handler(context)
