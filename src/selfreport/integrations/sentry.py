"""sentry-sdk 2.x integration: selfreport's reporting-path guard, dedupe and rate limit."""

from __future__ import annotations

import inspect
import logging
import sys
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, Callable, Optional

from selfreport._admission.admission import Admission, Fingerprint
from selfreport._capture.event import safe_str
from selfreport._core.counters import Counters
from selfreport._core.diag import Diagnostics
from selfreport._core.dsn import Dsn, parse_dsn
from selfreport._core.fork import on_fork_child
from selfreport._core.guard import (
    ReportingPath,
    in_nested_log_record,
    install_propagation,
    is_reporting,
    originated_in_reporting_path,
    process_born_in_path,
    record_born_in_path,
    thread_is_reporting,
    uninstall_propagation,
)
from selfreport._core.options import check_bool, check_number
from selfreport._core.patching import Patches
from selfreport._core.processors import unobserved
from selfreport._delivery.transport import ORIGIN_HEADER, register_origin
from selfreport.exceptions import ConfigError
from selfreport.integrations import requires

with requires(__name__, "sentry-sdk 2.x", "sentry"):
    import sentry_sdk
    import sentry_sdk.client
    import sentry_sdk.integrations.logging
    import sentry_sdk.scope
    import sentry_sdk.transport
    import sentry_sdk.worker
    from sentry_sdk.integrations import DidNotEnable, Integration

__all__ = ["STAT_KEYS", "SelfreportIntegration", "stats"]

STAT_KEYS = (
    "forwarded",  # events handed on to sentry-sdk's own pipeline
    "dropped_reentrant",  # events, logs, metrics and spans born inside the reporting path
    "dropped_rate_limited",  # the token bucket or per-fingerprint dedupe
    "deduplicated",  # of dropped_rate_limited: repeats folded into a later event or a summary
    "requests_marked",  # sentry-sdk requests that carried the origin header
)

# Hint key that lets the repeat summaries sent at close() through dedupe and the bucket.
_SUMMARY_HINT = "selfreport_summary"
# Event key that carries the dedupe grouping from capture_event to before_send.
_GROUPING_KEY = "_selfreport_fingerprint"
# Attribute cached on each sentry-sdk transport: the integration it reports for, or None.
_TRANSPORT_ATTR = "_selfreport_integration"
_UNKNOWN = object()
# Sentry telemetry other than events, captured through private client methods whose names
# changed within 2.x; those that exist are guarded like events.
_TELEMETRY_METHODS = (
    "_capture_log",
    "_capture_experimental_log",
    "_capture_metric",
    "_capture_span",
)
# Event types that are errors (dedupe and the rate limit apply); transactions, check-ins and
# the like are left to sentry-sdk's own sampling.
_ERROR_TYPES = (None, "error", "default")


class SelfreportIntegration(Integration):
    """Makes sentry-sdk recursion-safe: ``sentry_sdk.init(integrations=[SelfreportIntegration()])``.

    An event, log, metric or span that originates inside sentry-sdk's reporting path (its
    ``before_send``/``before_send_log``, event processors, serializer, transport and worker
    thread, threads and asyncio tasks started from there, and code inside
    :func:`selfreport.reporting_path`) is dropped before sentry-sdk builds or serializes it and
    counted in :meth:`stats`. Error events also pass selfreport's per-fingerprint dedupe and
    global token bucket. sentry-sdk's requests carry selfreport's origin header, so a collector
    recognises its own reports with :func:`selfreport.is_own_report`.

    Args:
        rate_limit: error events per second handed to sentry-sdk at most; 0 disables.
        rate_burst: error events that may pass at once before ``rate_limit`` applies.
        dedupe_window: seconds during which repeats of one fingerprint (logger, message
            template, exception type and location) are folded; 0 disables.
        mark_requests: add the origin header to sentry-sdk's requests and register the DSN.
    """

    identifier = "selfreport"

    def __init__(
        self,
        *,
        rate_limit: float = 10.0,
        rate_burst: int = 100,
        dedupe_window: float = 60.0,
        mark_requests: bool = True,
    ) -> None:
        check_number("rate_limit", rate_limit, 0.0)
        check_number("rate_burst", rate_burst, 1, 10_000_000, integer=True)
        check_number("dedupe_window", dedupe_window, 0.0)
        check_bool("mark_requests", mark_requests)
        self.mark_requests = mark_requests
        self.diagnostics = Diagnostics()
        self._counters = Counters(STAT_KEYS)
        self._admission = Admission(
            rate_limit,
            rate_burst,
            dedupe_window,
            count=self._count,
            diagnostics=self.diagnostics,
            what="sentry-sdk events",
        )
        self.origins: set[str] = set()
        on_fork_child(self._after_fork_in_child)

    # --- sentry-sdk's integration protocol ----------------------------------------------

    @staticmethod
    def setup_once() -> None:
        """Install the (process-wide, permanent) hooks; each checks the client's integrations."""
        _install()

    def setup_once_with_options(self, options: Optional[Mapping[str, Any]] = None) -> None:
        """Newer sentry-sdk 2.x hands the first client's options here: register its DSN early
        (later clients register from ``_Client._init_impl``, older versions on first send)."""
        if options:
            self._register_dsn(options.get("dsn"), None)

    # --- stats ----------------------------------------------------------------------------

    def _count(self, key: str) -> None:
        self._counters.add(key)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (see ``STAT_KEYS``)."""
        return self._counters.snapshot()

    def _after_fork_in_child(self) -> None:
        self._counters.reset()
        self._admission.reset_after_fork()
        self.diagnostics.reset_after_fork()

    # --- the guard ------------------------------------------------------------------------

    def _drop_reentrant(self, client: Any, what: str, category: Optional[str]) -> None:
        self._count("dropped_reentrant")
        self.diagnostics.once(
            "reentrant:" + what,
            f"dropped a sentry-sdk {what} that originated inside the reporting path (counted "
            "in SelfreportIntegration.stats()['dropped_reentrant']; further drops are silent)",
        )
        if category is not None:
            _record_lost(client, "event_processor", category)

    def _capture_event(
        self, client: Any, wrapped: Callable[..., Any], args: Any, kwargs: Any
    ) -> Optional[str]:
        event, hint = _bind_event(*args, **kwargs)
        if not isinstance(hint, Mapping):
            hint = {}
        is_error = isinstance(event, dict) and event.get("type") in _ERROR_TYPES
        if _originates_in_path(hint):
            category = (
                str(event.get("type")) if isinstance(event, dict) and not is_error else "error"
            )
            self._drop_reentrant(client, "event", category)
            return None
        if is_error and not hint.get(_SUMMARY_HINT):
            with ReportingPath():
                admitted = self._admit(client, event, hint)
            if not admitted:
                return None
        elif isinstance(event, dict) and event.get("type") == "transaction":
            self._guard_transactions(client)
        with ReportingPath():
            event_id = wrapped(*args, **kwargs)
        if event_id is not None:
            self._count("forwarded")
        return event_id  # type: ignore[no-any-return]

    def _guard_transactions(self, client: Any) -> None:
        """Chain a check into the client's ``before_send_transaction`` (once): a transaction of
        a request that carried this process's own report is dropped.

        A web integration's transaction ends outside the request handler, so outside the
        ``reporting_path()`` a collector runs its own reports in; sentry-sdk adds the request's
        headers only while preparing the event, which is why this sits that late."""
        integration = self

        def drop_own(event: Any) -> Any:
            if _is_own_report_request(event):
                integration._drop_reentrant(client, "transaction of an own report", None)
                return None
            return event

        _chain_option(client, "before_send_transaction", drop_own)

    def _admit(self, client: Any, event: dict[str, Any], hint: Mapping[str, Any]) -> bool:
        key = _fingerprint(event, hint)
        repeats = self._admission.admit(key)
        if repeats is None:
            _record_lost(client, "ratelimit_backoff", "error")
            return False
        if repeats:
            extra = event.setdefault("extra", {})
            if isinstance(extra, dict):
                extra["selfreport_repeats"] = repeats
        if self._admission.dedupes:
            # Grouped like its repeat summary, unless the scope or the event has a fingerprint
            # of its own: sentry-sdk applies the scope's later, so this waits for before_send.
            event[_GROUPING_KEY] = key.grouping()
            _chain_option(client, "before_send", _apply_grouping)
        return True

    def _send_repeat_summaries(self, client: Any) -> None:
        """Report the repeats dedupe folded and no later event carried, before sentry closes."""
        for fingerprint, repeats in self._admission.pending().items():
            # Grouped with the original; the summary itself stands for one of the repeats.
            extra: dict[str, Any] = {"selfreport_summary": repeats}
            if repeats > 1:
                extra["selfreport_repeats"] = repeats - 1
            event: dict[str, Any] = {
                "level": "info",
                "logentry": {"message": fingerprint.summary_text(repeats)},
                "fingerprint": fingerprint.grouping(),
                "extra": extra,
            }
            if fingerprint.logger is not None:
                event["logger"] = fingerprint.logger
            client.capture_event(event, hint={_SUMMARY_HINT: True})

    # --- marking --------------------------------------------------------------------------

    def _register_dsn(self, dsn: object, parsed: Any) -> Optional[str]:
        """Register ``dsn`` as this process's own origin; the header value, or None."""
        if not self.mark_requests or not dsn:
            return None
        try:
            own: Dsn = parse_dsn(str(dsn))
        except ConfigError:
            # sentry-sdk accepted a DSN that selfreport's stricter parser does not: mark with
            # the parts sentry-sdk parsed, which are all the origin consists of.
            if parsed is None or not getattr(parsed, "project_id", None):
                return None
            own = Dsn(
                scheme=str(parsed.scheme),
                public_key=str(parsed.public_key),
                host=str(parsed.host),
                project_id=str(parsed.project_id),
            )
        origin = register_origin(own)
        self.origins.add(origin)
        return origin


# --- hooks (installed once per process; every one passes through for clients without us) ---


def _integration_of(client: Any) -> Optional[SelfreportIntegration]:
    found = client.get_integration(SelfreportIntegration)
    return found if isinstance(found, SelfreportIntegration) else None


def _bind_event(event: Any = None, hint: Any = None, *_: Any, **__: Any) -> tuple[Any, Any]:
    return event, hint


def _exception_of(hint: Mapping[str, Any]) -> Optional[BaseException]:
    exc_info = hint.get("exc_info")
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        exc = exc_info[1]
        return exc if isinstance(exc, BaseException) else None
    return None


def _originates_in_path(hint: Mapping[str, Any]) -> bool:
    if is_reporting() or thread_is_reporting(threading.current_thread()):
        return True
    record = hint.get("log_record")
    if isinstance(record, logging.LogRecord) and record_born_in_path(record):
        return True  # logged in the path, handled later or elsewhere (a QueueListener)
    return _PROCESS_BORN_IN_PATH or originated_in_reporting_path(_exception_of(hint))


# Started by another process's reporting path: everything this one reports is that path's.
_PROCESS_BORN_IN_PATH = process_born_in_path()


def _fingerprint(event: Mapping[str, Any], hint: Mapping[str, Any]) -> Fingerprint:
    logger = event.get("logger")
    template: object = None
    record = hint.get("log_record")
    if isinstance(record, logging.LogRecord):
        logger = record.name
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    else:
        entry = event.get("logentry")
        if isinstance(entry, Mapping):
            template = entry.get("message")
        if template is None:
            template = event.get("message")
    return Fingerprint.of(
        logger if isinstance(logger, str) else None,
        None if template is None else safe_str(template, 1024),
        _exception_of(hint),
    )


def _chain_option(client: Any, name: str, hook: Callable[[Any], Any]) -> None:
    """Run ``hook(event)`` before the client's ``name`` option (``before_send``...), once:
    it returns the event, or None to drop it."""
    options = getattr(client, "options", None)
    if not isinstance(options, dict):  # pragma: no cover - every 2.x client has a dict
        return
    previous = options.get(name)
    if getattr(previous, "_selfreport_guard", False):
        return

    def chained(event: Any, hint: Any) -> Any:
        event = hook(event)
        if event is None or previous is None:
            return event
        return previous(event, hint)

    chained._selfreport_guard = True  # type: ignore[attr-defined]
    options[name] = chained


def _apply_grouping(event: Any) -> Any:
    grouping = event.pop(_GROUPING_KEY, None) if isinstance(event, dict) else None
    if grouping is not None and not event.get("fingerprint"):
        event["fingerprint"] = grouping
    return event


def _is_own_report_request(event: Any) -> bool:
    request = event.get("request") if isinstance(event, Mapping) else None
    headers = request.get("headers") if isinstance(request, Mapping) else None
    if not isinstance(headers, Mapping):
        return False
    from selfreport import is_own_report

    return is_own_report(headers)


def _record_lost(client: Any, reason: str, category: str) -> None:
    """Tell sentry-sdk's client reports about a drop, as its own filters do."""
    transport = getattr(client, "transport", None)
    if transport is None:
        return
    try:
        transport.record_lost_event(reason, data_category=category)
    except Exception:  # pragma: no cover - a custom transport without client reports
        pass


def _client_capture_event(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    integration = _integration_of(instance)
    if integration is None:
        return wrapped(*args, **kwargs)
    return integration._capture_event(instance, wrapped, args, kwargs)


def _client_capture_telemetry(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    integration = _integration_of(instance)
    if integration is None:
        return wrapped(*args, **kwargs)
    if is_reporting():
        integration._drop_reentrant(instance, "log, metric or span", None)
        return None
    with ReportingPath():
        return wrapped(*args, **kwargs)


def _client_init_impl(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    # Clients made after the first one (setup_once runs inside the first one's init) register
    # their DSN as soon as they exist, so is_own_report() knows it before anything is sent.
    result = wrapped(*args, **kwargs)
    integration = _integration_of(instance)
    if integration is not None:
        options = getattr(instance, "options", None) or {}
        integration._register_dsn(options.get("dsn"), None)
    return result


def _client_close(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    integration = _integration_of(instance)
    if integration is not None and getattr(instance, "transport", None) is not None:
        try:
            integration._send_repeat_summaries(instance)
        except Exception as error:  # pragma: no cover - capture_event does not raise
            integration.diagnostics.warn("summary_error", f"could not send summaries: {error!r}")
    return wrapped(*args, **kwargs)


def _record_from_path(record: object) -> bool:
    if isinstance(record, logging.LogRecord) and record_born_in_path(record):
        return True
    exc_info = getattr(record, "exc_info", None)
    return bool(exc_info) and originated_in_reporting_path(exc_info[1])  # type: ignore[index]


def _sentry_logs_enabled(client: Any) -> bool:
    options = getattr(client, "options", None) or {}
    experiments = options.get("_experiments") or {}
    return bool(options.get("enable_logs") or experiments.get("enable_logs"))


def _drop_if_reentrant(
    wrapped: Callable[..., Any], args: Any, kwargs: Any, exc: Optional[BaseException]
) -> Any:
    # Cheap checks first: this runs for every sentry_sdk.capture_exception/capture_message.
    if not (
        is_reporting()
        or thread_is_reporting(threading.current_thread())
        or originated_in_reporting_path(exc)
    ):
        return wrapped(*args, **kwargs)
    client = sentry_sdk.get_client()
    integration = _integration_of(client)
    if integration is None:
        return wrapped(*args, **kwargs)
    integration._drop_reentrant(client, "event", "error")
    return None


def _scope_capture_exception(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    # Scope.capture_exception builds the event (frames, local variables) before capture_event
    # sees it: drop reentrant ones here already.
    error = args[0] if args else kwargs.get("error")
    if isinstance(error, tuple):
        error = error[1] if len(error) == 3 else None
    if error is None:
        error = sys.exc_info()[1]
    exc = error if isinstance(error, BaseException) else None
    return _drop_if_reentrant(wrapped, args, kwargs, exc)


def _scope_capture_message(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    return _drop_if_reentrant(wrapped, args, kwargs, None)


def _log_handler_emit(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    # Cheap checks first: this runs for every record sentry-sdk's logging integration sees.
    record = args[0] if args else kwargs.get("record")
    if not (is_reporting() or in_nested_log_record() or _record_from_path(record)):
        return wrapped(*args, **kwargs)
    client = sentry_sdk.get_client()
    integration = _integration_of(client)
    if integration is None:
        return wrapped(*args, **kwargs)
    # Dropped before sentry-sdk formats the record or builds an event from it. The Sentry Logs
    # handler sees every record whether or not Sentry Logs are on: count only real drops.
    if type(instance).__name__ != "SentryLogsHandler" or _sentry_logs_enabled(client):
        integration._drop_reentrant(client, "log record", None)
    return None


def _transport_integration(transport: Any) -> Optional[SelfreportIntegration]:
    cached = getattr(transport, _TRANSPORT_ATTR, _UNKNOWN)
    if cached is not _UNKNOWN:
        return cached  # type: ignore[return-value]
    options = getattr(transport, "options", None) or {}
    found = next(
        (i for i in options.get("integrations") or () if isinstance(i, SelfreportIntegration)),
        None,
    )
    try:
        setattr(transport, _TRANSPORT_ATTR, found)
    except Exception:  # pragma: no cover - a transport with __slots__
        pass
    return found


def _mark_request(
    transport: Any, integration: SelfreportIntegration, args: Any, kwargs: Any
) -> None:
    origin = getattr(transport, "_selfreport_origin", None)
    if origin is None:
        options = getattr(transport, "options", None) or {}
        origin = integration._register_dsn(
            options.get("dsn"), getattr(transport, "parsed_dsn", None)
        )
        if origin is None:
            return
        try:
            transport._selfreport_origin = origin
        except Exception:  # pragma: no cover - a transport with __slots__
            pass
    headers = args[1] if len(args) > 1 else kwargs.get("headers")
    if isinstance(headers, dict):
        headers[ORIGIN_HEADER] = origin
        integration._count("requests_marked")


def _in_path(call: Callable[[], Any]) -> Any:
    with ReportingPath(), unobserved():
        return call()


async def _await_in_path(coroutine: Coroutine[Any, Any, Any], suppress: bool) -> Any:
    async with ReportingPath():
        if not suppress:
            return await coroutine
        with unobserved():
            return await coroutine


def _send_request_wrapper(run: Callable[[Callable[[], Any]], Any]) -> Callable[..., Any]:
    """A wrapper of a transport's ``_send_request``: requests of a client with the integration
    are marked and sent by ``run`` (in the reporting path); other clients' pass through."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        integration = _transport_integration(instance)
        if integration is None:
            return wrapped(*args, **kwargs)
        _mark_request(instance, integration, args, kwargs)
        return run(lambda: wrapped(*args, **kwargs))

    return wrapper


_transport_send_request = _send_request_wrapper(_in_path)
_transport_send_request_async = _send_request_wrapper(
    lambda call: _await_in_path(call(), suppress=True)
)


def _worker_target(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    # sentry-sdk's BackgroundWorker thread is reporting path for its whole life.
    with ReportingPath():
        return wrapped(*args, **kwargs)


def _async_worker_target(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    # The AsyncWorker's consumer task; the tasks it starts for each send inherit the flag.
    return _await_in_path(wrapped(*args, **kwargs), suppress=False)


def _hook_points() -> list[tuple[Any, str, Callable[..., Any]]]:
    client_cls = sentry_sdk.client._Client
    points: list[tuple[Any, str, Callable[..., Any]]] = [
        (client_cls, "capture_event", _client_capture_event),
        (client_cls, "_init_impl", _client_init_impl),
        (client_cls, "close", _client_close),
        (sentry_sdk.worker.BackgroundWorker, "_target", _worker_target),
    ]
    missing = [name for owner, name, _ in points if name not in vars(owner)]
    if missing:
        raise DidNotEnable(
            f"this sentry-sdk ({sentry_sdk.VERSION}) lacks {', '.join(missing)}; "
            "SelfreportIntegration supports sentry-sdk 2.x"
        )
    points += [
        (client_cls, name, _client_capture_telemetry)
        for name in _TELEMETRY_METHODS
        if name in vars(client_cls)
    ]
    for name, wrapper in (
        ("capture_exception", _scope_capture_exception),
        ("capture_message", _scope_capture_message),
    ):
        if name in vars(sentry_sdk.scope.Scope):
            points.append((sentry_sdk.scope.Scope, name, wrapper))
    async_worker = getattr(sentry_sdk.worker, "AsyncWorker", None)
    if async_worker is not None and "_target" in vars(async_worker):
        points.append((async_worker, "_target", _async_worker_target))
    senders = 0
    for owner in vars(sentry_sdk.transport).values():
        if (
            isinstance(owner, type)
            and issubclass(owner, sentry_sdk.transport.Transport)
            and "_send_request" in vars(owner)
        ):
            is_async = inspect.iscoroutinefunction(vars(owner)["_send_request"])
            wrapper = _transport_send_request_async if is_async else _transport_send_request
            points.append((owner, "_send_request", wrapper))
            senders += 1
    if not senders:
        raise DidNotEnable(
            f"this sentry-sdk ({sentry_sdk.VERSION}) has no HttpTransport._send_request; "
            "SelfreportIntegration supports sentry-sdk 2.x"
        )
    log_module = sentry_sdk.integrations.logging
    for name in ("EventHandler", "SentryLogsHandler"):
        handler_cls = getattr(log_module, name, None)
        if handler_cls is not None and "emit" in vars(handler_cls):
            points.append((handler_cls, "emit", _log_handler_emit))
    return points


_patches: Optional[Patches] = None
_install_lock = threading.Lock()


def _install() -> None:
    global _patches
    with _install_lock:
        if _patches is None:
            _patches = Patches(*_hook_points())
            install_propagation()  # one counted use for the life of the process
        _patches.install()


def _uninstall() -> None:
    """Remove the hooks (tests only: sentry-sdk integrations are set up once per process)."""
    global _patches
    with _install_lock:
        if _patches is not None:
            _patches.uninstall()
            _patches = None
            uninstall_propagation()


def stats() -> dict[str, int]:
    """Counters of the current sentry-sdk client's :class:`SelfreportIntegration` (zeros
    when it has none)."""
    integration = _integration_of(sentry_sdk.get_client())
    return integration.stats() if integration is not None else dict.fromkeys(STAT_KEYS, 0)
