"""The Client: the capture pipeline (caller's side, then its worker) and the upstream it feeds."""

from __future__ import annotations

import contextvars
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ._admission.admission import Admission, Fingerprint
from ._capture import scope
from ._capture.event import (
    MAX_TAG,
    Capture,
    build_event,
    capture_from_exception,
    capture_from_message,
    capture_from_record,
    plain_mapping,
    safe_str,
)
from ._capture.sensitive import Scrub, resolve_scrub
from ._core.counters import Counters
from ._core.diag import Diagnostics
from ._core.dsn import Dsn, parse_dsn
from ._core.fork import fresh_event, on_fork_child
from ._core.guard import (
    ReportingPath,
    is_reporting,
    on_own_thread,
    originated_in_reporting_path,
    process_born_in_path,
)
from ._core.options import check_callable, check_level, check_number, check_text
from ._core.processors import process_event
from ._core.text import safe_repr
from ._delivery.envelope import serialize_checkin, serialize_envelope
from ._delivery.retry import Retry
from ._delivery.spool import DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES
from ._delivery.transport import (
    Transport,
    as_transport,
    is_marked_origin,
    origin_value,
)
from ._delivery.upstream import SpoolOptions, Upstream, stop_worker
from ._delivery.worker import Worker
from ._onprem.destination import Destination
from .exceptions import ConfigError

if TYPE_CHECKING:
    from ._onprem.statsd import StatsdConfig, StatsdExporter

__all__ = ["STAT_KEYS", "Client", "ClientOptions", "Event", "Hint", "client_options"]

Event = dict[str, Any]
Hint = dict[str, Any]
BeforeSend = Callable[[Event, Hint], Optional[Event]]

STAT_KEYS = (
    "captured",  # accepted into the queue
    "sent",  # acknowledged by the collector
    "dropped_reentrant",  # originated inside the reporting path
    "breadcrumbs_dropped_reentrant",  # breadcrumbs recorded inside the reporting path
    "dropped_rate_limited",  # global bucket, per-fingerprint dedupe, or upstream 429
    "deduplicated",  # of dropped_rate_limited: repeats folded into a later event
    "dropped_sampled",  # sample_rate
    "dropped_duplicate",  # the same exception object was already captured
    "dropped_queue_full",
    "dropped_before_send",  # before_send returned None
    "dropped_error",  # building, before_send or scrubbing raised: dropped, never sent raw
    "dropped_closed",  # captured after close() or left in the queue at a timed-out close
    "send_failed",  # given up after retries, or refused by the collector
    "retried",
    "spooled",  # kept in the spool (spool_dir) while the collector was unreachable, 5xx or 429
    "replayed",  # of sent: delivered later from the spool
    "dropped_spool_full",  # the oldest spooled envelopes, dropped to stay under spool_max_bytes
    "dropped_spool_expired",  # spooled envelopes older than spool_max_age
    "quarantined",  # spooled envelopes refused for good, or failing again and again (5xx)
    "queue_size",
    "checkins",  # cron check-ins accepted into the queue (then counted in sent/send_failed too)
)

_CAPTURED_MARK = "__selfreport_captured__"


class CheckInCapture(Capture):
    """A cron check-in riding the event queue: the payload, built on the caller's thread."""

    __slots__ = ("checkin",)

    def __init__(self, checkin: dict[str, Any]) -> None:
        super().__init__("info")
        self.checkin = checkin


def mark_captured(exc: BaseException) -> None:
    """Count ``exc`` as reported already: a later capture of the same object (the framework
    logging it after an integration reported it) is dropped as ``dropped_duplicate``."""
    try:
        setattr(exc, _CAPTURED_MARK, True)
    except Exception:  # pragma: no cover - exotic exceptions without __dict__
        pass


_NO_DSN_MESSAGE = "no DSN given and SELFREPORT_DSN is not set: events are not sent anywhere"
_process_diagnostics = Diagnostics()
_admitting = threading.local()


@dataclass(frozen=True)
class ClientOptions:
    """A Client's checked options (those it keeps; destinations and statsd are built)."""

    dsn: Optional[Dsn]
    environment: Optional[str]
    release: Optional[str]
    server_name: Optional[str]
    before_send: Optional[BeforeSend]
    sample_rate: float
    shutdown_timeout: float
    include_locals: bool
    http_timeout: float
    retry: Retry
    compress: bool
    scrub: Optional[Scrub]
    spool: Optional[SpoolOptions]
    transport: Optional[Transport]
    breadcrumbs_level: Optional[int]
    max_breadcrumbs: int


def client_options(arguments: dict[str, Any]) -> ClientOptions:
    """The Client's arguments checked: ConfigError naming the first offending one."""
    get: Callable[[str], Any] = arguments.__getitem__
    check_number("sample_rate", get("sample_rate"), 0.0, 1.0)
    check_number("max_queue", get("max_queue"), 1, 10_000_000, integer=True)
    check_number("shutdown_timeout", get("shutdown_timeout"), 0.0, 3600.0)
    check_number("rate_limit", get("rate_limit"), 0.0)
    check_number("rate_burst", get("rate_burst"), 1, 10_000_000, integer=True)
    check_number("dedupe_window", get("dedupe_window"), 0.0)
    check_number("http_timeout", get("http_timeout"), 0.001, 600.0)
    check_number("max_breadcrumbs", get("max_breadcrumbs"), 0, scope.MAX_BREADCRUMBS, integer=True)
    retry = Retry.for_delivery(get("max_retries"), get("retry_backoff"))
    check_callable("before_send", get("before_send"))
    for name in ("environment", "release", "server_name"):
        check_text(name, get(name), optional=True)
    transport = as_transport(get("transport")) if get("transport") is not None else None
    dsn = get("dsn") or os.environ.get("SELFREPORT_DSN") or None
    if dsn is not None and not isinstance(dsn, Dsn):
        dsn = parse_dsn(dsn)
    spool = None
    if get("spool_dir") is not None:
        if transport is None and dsn is None:
            raise ConfigError("spool_dir", "needs a DSN (or a transport) to replay to")
        spool = SpoolOptions(get("spool_dir"), get("spool_max_bytes"), get("spool_max_age"))
    return ClientOptions(
        dsn=dsn,
        environment=get("environment"),
        release=get("release"),
        server_name=get("server_name"),
        before_send=get("before_send"),
        sample_rate=float(get("sample_rate")),
        shutdown_timeout=float(get("shutdown_timeout")),
        include_locals=bool(get("include_locals")),
        http_timeout=float(get("http_timeout")),
        retry=retry,
        compress=bool(get("compress")),
        scrub=resolve_scrub(get("scrub")),
        spool=spool,
        transport=transport,
        breadcrumbs_level=check_level("breadcrumbs_level", get("breadcrumbs_level")),
        max_breadcrumbs=get("max_breadcrumbs"),
    )


def _is_sdk_logger(name: str) -> bool:
    """The SDK's own loggers are never reported; the collector is an application and is."""
    return name == "selfreport" or (
        name.startswith("selfreport.") and not name.startswith("selfreport.collector")
    )


class Client:
    """One configured reporter. Use :func:`selfreport.init` to make the global one.

    ``options`` holds its checked options, ``upstream`` where its events go (None without a
    DSN or transport) and ``destinations`` the further upstreams that get a copy of each.
    ``transport`` may be any object with a ``send(body, timeout)`` method returning a
    ``Response``; ``close()``, ``interrupt()`` and ``reset_after_fork()`` are called when it
    has them.
    """

    def __init__(
        self,
        dsn: Union[str, Dsn, None] = None,
        *,
        environment: Optional[str] = None,
        release: Optional[str] = None,
        server_name: Optional[str] = None,
        before_send: Optional[BeforeSend] = None,
        sample_rate: float = 1.0,
        max_queue: int = 1000,
        shutdown_timeout: float = 2.0,
        rate_limit: float = 10.0,
        rate_burst: int = 100,
        dedupe_window: float = 60.0,
        include_locals: bool = False,
        http_timeout: float = 5.0,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        compress: bool = True,
        scrub: Union[bool, Scrub, None] = None,
        spool_dir: Union[str, os.PathLike[str], None] = None,
        spool_max_bytes: int = DEFAULT_MAX_BYTES,
        spool_max_age: float = DEFAULT_MAX_AGE,
        destinations: Sequence[Union[Destination, str]] = (),
        statsd: Union[str, StatsdConfig, Mapping[str, Any], None] = None,
        transport: object = None,
        debug: bool = False,
        breadcrumbs_level: Union[int, str, None] = logging.INFO,
        max_breadcrumbs: int = scope.DEFAULT_MAX_BREADCRUMBS,
    ) -> None:
        arguments = dict(locals())
        del arguments["self"]
        self.options = options = client_options(arguments)
        self._keep_options(options)
        self.diagnostics = Diagnostics()
        self._counters = Counters(STAT_KEYS)
        self._admission = Admission(
            rate_limit, rate_burst, dedupe_window, count=self._count, diagnostics=self.diagnostics
        )
        self._reentrant_told: set[str] = set()
        self._last_record: Optional[weakref.ref[logging.LogRecord]] = None
        self._closed = threading.Event()
        # Started by another process's reporting path: all it does is that path's work.
        self._born_in_path = process_born_in_path()
        self._origin = origin_value(self.dsn) if self.dsn is not None else None
        # Validated in this order so a ConfigError leaves no thread behind.
        self._statsd = self._make_statsd(statsd)
        self.destinations = self._resolve_destinations(destinations)
        self.upstream = self._make_upstream(options)
        self.enabled = self.upstream is not None or bool(self.destinations)
        self._worker: Worker[Capture] = Worker(self._process, max_queue)
        self._start_statsd()
        on_fork_child(self.after_fork_in_child)
        if not self.enabled:
            _process_diagnostics.once("no_dsn", _NO_DSN_MESSAGE)  # once per process, not init
        self.debug = debug
        if debug:
            self._enable_debug_logging()

    # --- configuration helpers -----------------------------------------------------------

    def _keep_options(self, options: ClientOptions) -> None:
        """The options as attributes, as they always were (before_send may be swapped later)."""
        self.dsn = options.dsn
        self.environment = options.environment
        self.release = options.release
        self.server_name = options.server_name
        self.before_send = options.before_send
        self.sample_rate = options.sample_rate
        self.shutdown_timeout = options.shutdown_timeout
        self.include_locals = options.include_locals
        self.http_timeout = options.http_timeout
        self.max_retries = options.retry.total
        self.retry_backoff = options.retry.backoff_factor
        self.breadcrumbs_level = options.breadcrumbs_level
        self.max_breadcrumbs = options.max_breadcrumbs
        self._scrub = options.scrub

    @property
    def transport(self) -> Optional[Transport]:
        """Where events go (None: only to destinations, or nowhere)."""
        return self.upstream.transport if self.upstream is not None else None

    def _make_statsd(
        self, statsd: Union[str, StatsdConfig, Mapping[str, Any], None]
    ) -> Optional[StatsdExporter]:
        if statsd is None:
            return None
        from ._onprem.statsd import StatsdConfig, StatsdExporter

        return StatsdExporter(StatsdConfig.parse(statsd))

    def _start_statsd(self) -> None:
        if self._statsd is not None:
            self._statsd.add_source(self.stats)
            for destination in self.destinations:
                self._statsd.add_source(destination.stats, destination.tags)
                destination.latency = self._statsd.timing
            self._statsd.start()

    def _resolve_destinations(
        self, destinations: Union[Sequence[Union[Destination, str]], Destination, str]
    ) -> list[Destination]:
        if isinstance(destinations, (str, Destination)):
            destinations = [destinations]
        resolved = []
        for item in destinations:
            if isinstance(item, Destination):
                resolved.append(item)
            elif isinstance(item, str):
                resolved.append(Destination(item, diagnostics=self.diagnostics))
            else:
                raise ConfigError(
                    "destinations",
                    f"expected Destination objects or DSN strings, got {type(item).__name__}",
                )
        return resolved

    def _make_upstream(self, options: ClientOptions) -> Optional[Upstream]:
        if options.transport is None and options.dsn is None:
            return None
        return Upstream.connect(
            options.dsn,
            options.transport,
            compress=options.compress,
            spool=options.spool,
            count=self._count,
            diagnostics=self.diagnostics,
            closed=self._closed,
            http_timeout=options.http_timeout,
            retry=options.retry,
            observe=self._observe_latency,
        )

    def _observe_latency(self, seconds: float) -> None:
        if self._statsd is not None:
            self._statsd.timing(seconds)

    @staticmethod
    def _enable_debug_logging() -> None:
        own = logging.getLogger("selfreport")
        if not any(getattr(h, "_selfreport_debug", False) for h in own.handlers):
            handler = logging.StreamHandler()
            handler._selfreport_debug = True  # type: ignore[attr-defined]
            handler.setFormatter(logging.Formatter("selfreport [%(levelname)s] %(message)s"))
            own.addHandler(handler)
        own.setLevel(logging.DEBUG)

    # --- stats -----------------------------------------------------------------------------

    def _count(self, key: str, amount: int = 1) -> None:
        self._counters.add(key, amount)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (see ``STAT_KEYS``); never raises."""
        out = self._counters.snapshot()
        out["queue_size"] = self._worker.qsize()
        return out

    # --- the caller's side: cheap decisions first ------------------------------------------

    def drop_reentrant(self, what: str) -> None:
        """Count a ``what`` (``"log record"``, ``"exception"``...) that originated inside the
        reporting path and is dropped; tells once, through the ``selfreport`` logger.

        The hook for integrations: a logging bridge that sees ``is_reporting()`` calls this
        instead of building anything from the record, so the drop shows in ``stats()``."""
        self._count("dropped_reentrant")
        if what in self._reentrant_told:  # the hot path of a drop: no message built
            return
        self._reentrant_told.add(what)
        self.diagnostics.once(
            "reentrant:" + what,
            f"dropped {'an' if what[0] in 'aeiou' else 'a'} {what} that originated inside the "
            "reporting path "
            "(counted in stats()['dropped_reentrant']; further drops are counted silently)",
        )

    def drop_reentrant_breadcrumb(self) -> None:
        """Count a breadcrumb recorded inside the reporting path, dropped so that a
        ``before_send`` that logs cannot fill every later event's breadcrumbs."""
        self._count("breadcrumbs_dropped_reentrant")

    def capture_record(self, record: logging.LogRecord) -> Optional[str]:
        """Report a log record (what the logging handler calls)."""
        if is_reporting() or _is_sdk_logger(record.name):
            self.drop_reentrant("log record")
            return None
        last = self._last_record
        if last is not None and last() is record:
            # The same record through a second handler feeding this client (init() plus a
            # dictConfig handler, or capture_events() under init()): one event, not two.
            self._count("dropped_duplicate")
            return None
        self._last_record = weakref.ref(record)
        exc = record.exc_info[1] if record.exc_info else None
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        return self._admit(
            exc,
            lambda: Fingerprint.of(record.name, template, exc),
            lambda: capture_from_record(record, self.include_locals),
        )

    def capture_exception(
        self,
        exc: Optional[BaseException] = None,
        *,
        mechanism: str = "generic",
        handled: bool = True,
        request: Optional[Mapping[str, Any]] = None,
        extra: Optional[Mapping[str, Any]] = None,
        tags: Optional[Mapping[str, Any]] = None,
    ) -> Optional[str]:
        """Report ``exc`` (default: the exception being handled); the event id, or None.

        ``request`` (``method``, ``url``, ``headers``, ``query_string``, ``data``, ``route``,
        ``endpoint``) becomes the event's request interface; filter secrets out of it first
        (the ASGI and WSGI middleware do). ``extra`` (JSON-like data, copied now) and ``tags``
        (values as strings of at most 200 characters) go to the event's ``extra`` and ``tags``.
        """
        if is_reporting():
            self.drop_reentrant("exception")
            return None
        if exc is None:
            exc = sys.exc_info()[1]
            if exc is None:
                return None
        error = exc

        def snapshot() -> Capture:
            capture = capture_from_exception(error, mechanism, handled, self.include_locals)
            if request:
                capture.request = dict(request)
            if extra:
                capture.extra = plain_mapping(extra)
            if tags:
                capture.tags = {safe_str(k, MAX_TAG): safe_str(v, MAX_TAG) for k, v in tags.items()}
            return capture

        return self._admit(error, lambda: Fingerprint.of(None, None, error), snapshot)

    def capture_hooked(self, exc: BaseException, mechanism: str, context_meaningful: bool) -> None:
        """Report an exception handed to an exception hook (uncaught, so unhandled)."""
        if (context_meaningful and is_reporting()) or on_own_thread():
            # A finalizer on one of our own threads may have interrupted it holding a lock:
            # dropped, like everything born on those threads.
            self.drop_reentrant("exception")
            return
        self._admit(
            exc,
            lambda: Fingerprint.of(None, None, exc),
            lambda: capture_from_exception(exc, mechanism, False, self.include_locals),
        )

    def capture_message(self, message: str, level: str = "error") -> Optional[str]:
        """Report a plain message; the event id, or None when dropped."""
        if is_reporting():
            self.drop_reentrant("message")
            return None
        text = message if isinstance(message, str) else safe_repr(message)
        return self._admit(
            None,
            lambda: Fingerprint(None, text, level=level),
            lambda: capture_from_message(text, level),
        )

    def capture_checkin(self, checkin: dict[str, Any]) -> bool:
        """Queue a cron check-in (``selfreport.checkin`` builds it); whether it was queued.

        Not an error: neither deduplicated nor sampled nor held by the token bucket, but
        dropped (and counted) inside the reporting path, when closed or when the queue is
        full. Check-ins go to the upstream only, not to destinations.
        """
        if is_reporting() or self._born_in_path:
            self.drop_reentrant("check-in")
            return False
        if self.upstream is None:
            return False
        if self._closed.is_set():
            self._count("dropped_closed")
            return False
        checkin.setdefault("environment", self.environment)
        checkin.setdefault("release", self.release)
        if not self._worker.submit(CheckInCapture(checkin)):
            self._count("dropped_closed" if self._closed.is_set() else "dropped_queue_full")
            return False
        self._count("checkins")
        return True

    def _admissible(self, exc: Optional[BaseException]) -> bool:
        """The cheap checks, before any work: each refusal counted under its reason."""
        if self._born_in_path:
            self.drop_reentrant("report of a process started inside the reporting path")
            return False
        if exc is not None:
            if originated_in_reporting_path(exc):
                self.drop_reentrant("exception")
                return False
            if getattr(exc, _CAPTURED_MARK, False):
                self._count("dropped_duplicate")
                return False
        if not self.enabled:
            return False
        if self._closed.is_set():
            self._count("dropped_closed")
            return False
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            self._count("dropped_sampled")
            return False
        return True

    def _admit(
        self,
        exc: Optional[BaseException],
        fingerprint: Callable[[], Fingerprint],
        snapshot: Callable[[], Capture],
    ) -> Optional[str]:
        # A signal handler or a GC finalizer may interrupt a thread in here and report: the
        # locks held are not reentrant, so the nested call touches none and drops the event.
        # Inline, not a decorator: a storm makes this call for every error it drops.
        if getattr(_admitting, "active", False):
            return None
        _admitting.active = True
        try:
            if not self._admissible(exc):
                return None
            with ReportingPath():
                # Dedupe before the queue-full check: a repeat is counted as one even while
                # the queue is full, and carried by the next event sent.
                key = fingerprint()
                admission = self._admission
                # A storm's errors take the first two ways out, touching nothing else.
                if admission.fold(key):
                    return None
                if admission.limited() and not self._worker.full():
                    admission.drop_limited()
                    return None
                repeats = admission.dedupe(key)
                if repeats is None:
                    return None
                if self._worker.full():  # before the bucket: a full queue spends no token
                    self._drop_queue_full(key, repeats)
                    return None
                if not admission.take(key, repeats):
                    return None
                return self._capture_admitted(exc, key, repeats, snapshot)
        except Exception as error:
            self._count("dropped_error")
            self.diagnostics.warn("capture_error", f"could not capture an event: {error!r}")
            return None
        finally:
            _admitting.active = False

    def _capture_admitted(
        self,
        exc: Optional[BaseException],
        key: Fingerprint,
        repeats: int,
        snapshot: Callable[[], Capture],
    ) -> Optional[str]:
        """Snapshot an admitted event on the caller's thread and queue it (in the path)."""
        capture = snapshot()
        capture.repeats = repeats
        if self._admission.dedupes:
            capture.fingerprint = key
        capture.context = contextvars.copy_context()
        capture.scope = scope.current_state(self.max_breadcrumbs)
        if exc is not None:
            mark_captured(exc)
        if not self._worker.submit(capture):
            if self._closed.is_set():
                self._admission.forget(key, repeats)
                self._count("dropped_closed")
                return None
            self._drop_queue_full(key, repeats)
            return None
        self._count("captured")
        return capture.event_id

    def _drop_queue_full(self, key: Fingerprint, repeats: int) -> None:
        # Not sent, so not a first occurrence either: the next one goes, carrying the count.
        self._admission.forget(key, repeats)
        self._count("dropped_queue_full")
        self.diagnostics.warn("queue_full", "queue full: dropping events (is the collector slow?)")

    # --- the worker's side ------------------------------------------------------------------

    def _prepare(self, capture: Capture) -> Optional[Event]:
        with ReportingPath():
            event = build_event(capture, self.environment, self.release, self.server_name)
            process_event(event)  # the caller's span is current here: we run in its Context
            if self.before_send is not None:
                hint: Hint = {"exc_info": capture.exc_info}
                result = self.before_send(event, hint)
                if result is None:
                    self._count("dropped_before_send")
                    return None
                if not isinstance(result, Mapping):
                    raise TypeError(f"before_send returned {type(result).__name__}, not a dict")
                event = dict(result)
            return event

    def _send_checkin(self, capture: CheckInCapture, upstream: Upstream) -> None:
        if upstream.holding_back():
            self._count("dropped_rate_limited")
            return
        try:
            sent_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            body = serialize_checkin(capture.checkin, capture.event_id, self.dsn, sent_at)
        except BaseException as error:  # pragma: no cover - _dumps copes with any value
            self._count("dropped_error")
            self.diagnostics.warn("checkin_error", f"dropped a check-in: {error!r}")
            return
        upstream.deliver(body)

    def _process(self, capture: Capture) -> None:
        # A spool keeps what the collector cannot take now; destinations have their own limits.
        upstream = self.upstream
        if isinstance(capture, CheckInCapture):
            if upstream is not None:
                self._send_checkin(capture, upstream)
            return
        limited = upstream is not None and upstream.holding_back()
        if limited and not self.destinations:
            self._count("dropped_rate_limited")
            return
        try:
            context = capture.context
            capture.context = None
            event = context.run(self._prepare, capture) if context else self._prepare(capture)
            if event is None:
                return
            for destination in self.destinations:
                destination.send_event(event, copy=True)  # each scrubs its own copy
            if upstream is None:
                return
            if limited:
                self._count("dropped_rate_limited")
                return
            if self._scrub is not None:
                event = self._scrub(event)
            sent_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            body = serialize_envelope(event, self.dsn, sent_at)
        except BaseException as error:
            self._count("dropped_error")
            self.diagnostics.warn(
                "prepare_error",
                f"dropped an event because building, before_send or scrubbing it raised {error!r}",
            )
            return
        upstream.deliver(body)

    # --- lifecycle --------------------------------------------------------------------------

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait up to ``timeout`` seconds for queued events to be delivered; True when done."""
        if not self.enabled:
            return True
        try:
            deadline = time.monotonic() + timeout
            done = self._worker.flush(timeout)
            for destination in self.destinations:
                done = destination.flush(max(0.0, deadline - time.monotonic())) and done
            return done
        except Exception:  # pragma: no cover - never raise into the caller
            return False

    def close(self, timeout: Optional[float] = None) -> None:
        """Deliver what is queued within ``timeout`` (default ``shutdown_timeout``), then stop."""
        if self._closed.is_set():
            return
        limit = self.shutdown_timeout if timeout is None else max(0.0, float(timeout))
        deadline = time.monotonic() + limit
        try:
            self._send_repeat_summaries()
            self._closed.set()
            if self.enabled and not self._stop_worker(limit):
                self.diagnostics.warn(
                    "close_timeout",
                    f"close() gave up after {limit:.1f}s; undelivered events were dropped",
                )
            self._close_extras(deadline)
        except Exception as error:  # pragma: no cover - never raise into the caller
            self.diagnostics.warn("close_error", f"error while closing: {error!r}")

    def _stop_worker(self, limit: float) -> bool:
        def left(captures: list[Capture]) -> None:
            self._count("dropped_closed", len(captures))

        if self.upstream is None:
            return stop_worker(self._worker, limit, left)
        return self.upstream.close(self._worker, limit, left)

    def _close_extras(self, deadline: float) -> None:
        """Destinations and metrics, within what is left of close()."""
        for destination in self.destinations:
            destination.close(max(0.0, deadline - time.monotonic()))
        if self._statsd is not None:  # last, so the final counts go out
            self._statsd.close(max(0.0, deadline - time.monotonic()))

    def _send_repeat_summaries(self) -> None:
        """The repeats dedupe folded and no later event carried: one event per fingerprint,
        grouped with the original (same ``fingerprint``) and counting as ``repeats`` of it."""
        for fingerprint, repeats in self._admission.pending().items():
            if not self.enabled or self._worker.full():
                break
            capture = capture_from_message(fingerprint.summary_text(repeats), "info")
            capture.logger = fingerprint.logger
            capture.fingerprint = fingerprint
            capture.repeats = repeats - 1  # the summary itself stands for one of them
            capture.extra = {"selfreport_summary": repeats}
            if self._worker.submit(capture):
                self._count("captured")

    def after_fork_in_child(self) -> None:
        """Give the child its own queue, locks and connection; the parent sends what it queued."""
        self._worker.reset_after_fork()
        self._counters.reset()
        self._closed = fresh_event(self._closed)  # its lock may be held
        self._admission.reset_after_fork()
        self.diagnostics.reset_after_fork()
        if self.upstream is not None:
            self.upstream.after_fork_in_child(self._closed)
        if self._statsd is not None:
            self._statsd.after_fork_in_child()

    # --- marking --------------------------------------------------------------------------

    def is_own_report(self, headers: Mapping[str, str]) -> bool:
        """Whether a request with ``headers`` carries a report sent for this client's project."""
        return is_marked_origin(headers, self._origin)
