"""selfreport: error reporting that can report its own errors without ever feeding on itself."""

from __future__ import annotations

from collections.abc import Mapping
from logging import ERROR as _ERROR
from typing import TYPE_CHECKING, Any, Optional, Union

from ._capture.scope import (
    add_breadcrumb,
    new_scope,
    set_context,
    set_extra,
    set_tag,
    set_tags,
    set_user,
)
from ._client import Client
from ._core.guard import guarded, is_reporting, reporting_path
from ._core.processors import activate_on_import
from ._delivery.transport import is_marked_origin
from ._onprem.destination import Destination
from ._state import current_client
from ._state import init as _init
from ._version import __version__
from .crons import checkin, monitor
from .exceptions import ConfigError, SelfreportError
from .logging import LoggingHandler

if TYPE_CHECKING:
    from ._capture.scrub import Scrubber

# Documented as needing no set-up: the OpenTelemetry integration registers its event processor
# and send wrapper once the application has imported OpenTelemetry (never on our account).
activate_on_import("opentelemetry.context", "selfreport.integrations.opentelemetry")

__all__ = [
    "Client",
    "ConfigError",
    "Destination",
    "LoggingHandler",
    "Scrubber",
    "SelfreportError",
    "__version__",
    "add_breadcrumb",
    "capture_exception",
    "capture_message",
    "checkin",
    "close",
    "flush",
    "guarded",
    "init",
    "is_own_report",
    "is_reporting",
    "monitor",
    "new_scope",
    "reporting_path",
    "set_context",
    "set_extra",
    "set_tag",
    "set_tags",
    "set_user",
    "stats",
]


def init(
    dsn: Optional[str] = None,
    *,
    environment: Optional[str] = None,
    release: Optional[str] = None,
    before_send: Any = None,
    sample_rate: float = 1.0,
    max_queue: int = 1000,
    shutdown_timeout: float = 2.0,
    logging_level: Union[int, str, None] = _ERROR,
    install_hooks: bool = True,
    debug: bool = False,
    rate_limit: float = 10.0,
    rate_burst: int = 100,
    dedupe_window: float = 60.0,
    **options: Any,
) -> Client:
    """Start reporting: install a logging handler and exception hooks sending to ``dsn``.

    Args:
        dsn: Sentry-format DSN; ``None`` reads ``SELFREPORT_DSN``; with neither, nothing is sent.
        environment: ``environment`` of every event (``"production"``, ...).
        release: ``release`` of every event.
        before_send: ``before_send(event, hint) -> event | None``; runs on the worker thread in
            the reporting path, with the caller's contextvars. If it raises, the event is dropped.
        sample_rate: share of events kept, 0.0 to 1.0.
        max_queue: events waiting for the worker at most; more are dropped, never blocking.
        shutdown_timeout: seconds ``close()`` and interpreter exit may spend delivering.
        logging_level: level of the root-logger handler; ``None`` installs none.
        install_hooks: install sys/threading/unraisable/asyncio hooks and guard propagation.
        debug: log selfreport's own activity to stderr through the ``selfreport`` logger.
        rate_limit: events per second sent at most (token bucket); 0 disables.
        rate_burst: events that may be sent at once before ``rate_limit`` applies.
        dedupe_window: seconds during which repeats of one fingerprint are folded; 0 disables.
        **options: further :class:`Client` options (``scrub``, ``include_locals``,
            ``server_name``, ``http_timeout``, ``max_retries``, ``compress``, ...), among them
            ``scrub=True`` or a :class:`Scrubber`; ``spool_dir``, ``spool_max_bytes`` and
            ``spool_max_age`` to keep envelopes on disk while the collector is unreachable or
            answers 5xx/429; ``destinations``, more :class:`Destination` objects or DSNs to
            send every event to as well; ``statsd``, ``"host:port"`` or a dict of
            ``StatsdConfig`` fields, to export counters over StatsD/DogStatsD;
            ``breadcrumbs_level`` (default ``logging.INFO``; ``None``: none), the level from
            which records below ``logging_level`` become breadcrumbs of the current scope, and
            ``max_breadcrumbs`` (default 100), how many of the newest an event carries.

    Raises:
        ConfigError: a malformed DSN or option, naming the offending part.
    """
    arguments = dict(locals())
    options = arguments.pop("options")
    return _init(**arguments, make_handler=LoggingHandler, **options)


def capture_exception(
    exc: Optional[BaseException] = None,
    *,
    extra: Optional[Mapping[str, Any]] = None,
    tags: Optional[Mapping[str, Any]] = None,
) -> Optional[str]:
    """Report ``exc`` (default: the exception being handled); the event id, or None if dropped.

    ``extra`` (JSON-like data, copied now) and ``tags`` (values as strings) go to the event.
    """
    client = current_client()
    if client is None:
        return None
    return client.capture_exception(exc, extra=extra, tags=tags)


def capture_message(message: str, level: str = "error") -> Optional[str]:
    """Report a message at ``level``; the event id, or None if dropped."""
    client = current_client()
    return client.capture_message(message, level) if client is not None else None


def flush(timeout: float = 2.0) -> bool:
    """Wait up to ``timeout`` seconds for queued events to be delivered; True when all were."""
    client = current_client()
    return client.flush(timeout) if client is not None else True


def close(timeout: Optional[float] = None) -> None:
    """Deliver what is queued (bounded by ``timeout``), remove the handler and hooks."""
    from ._state import close as _close

    _close(timeout)


def stats() -> dict[str, int]:
    """Counters of the global client: captured, sent, and dropped by reason."""
    client = current_client()
    if client is None:
        from ._client import STAT_KEYS

        return dict.fromkeys(STAT_KEYS, 0)
    return client.stats()


def is_own_report(headers: Mapping[str, str]) -> bool:
    """Whether an incoming request carries a report sent by a selfreport client for this
    process's DSN project (headers: any str->str mapping, keys compared case-insensitively).

    A collector that reports its own errors processes such requests inside
    :func:`reporting_path`, so ingesting its own reports can never report again.
    """
    client = current_client()
    if client is not None:
        return client.is_own_report(headers)
    return is_marked_origin(headers, None)


def __getattr__(name: str) -> Any:
    # The scrubber's patterns take a while to compile: only for those who use it.
    if name == "Scrubber":
        from ._capture.scrub import Scrubber

        return Scrubber
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
