"""Celery: task failures reported with task, args and worker; the reporting-path mark in headers."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from selfreport._capture.event import plain_copy
from selfreport._capture.scope import NewScope
from selfreport._client import mark_captured
from selfreport._core.guard import ReportingPath, is_reporting
from selfreport._delivery.transport import origin_value
from selfreport._state import current_client
from selfreport.integrations import FILTERED, is_sensitive, requires

with requires(__name__, "celery", "celery"):
    from celery import signals
    from celery.exceptions import Ignore, Reject, Retry
    from celery.utils.serialization import UnpickleableExceptionWrapper

if TYPE_CHECKING:
    from selfreport._client import Client

__all__ = ["MARK_HEADER", "install", "uninstall"]

# The task header that marks a task published inside the reporting path. Its value names the
# publisher's DSN project ("project_id:public_key", like X-Selfreport-Origin) or is "1" without
# one; a worker runs every task carrying any value in the reporting path.
MARK_HEADER = "selfreport_origin"

_PATH_ATTR = "_selfreport_path"  # on the task's request: the ReportingPath it runs in
_SCOPE_ATTR = "_selfreport_scope"  # and the scope it runs in
_UID = "selfreport.integrations.celery"


class _Settings:
    __slots__ = ("client", "send_args")

    def __init__(self, client: Optional[Client], send_args: bool) -> None:
        self.client = client
        self.send_args = send_args


_settings = _Settings(None, True)
_lock = threading.Lock()


def install(*, client: Optional[Client] = None, send_args: bool = True) -> None:
    """Report Celery task failures and carry the reporting-path mark through the broker.

    Call it where the Celery app is defined, so it runs both in the processes that publish
    tasks and in the workers::

        app = Celery("proj", broker="redis://localhost")
        selfreport.init(dsn)
        selfreport.integrations.celery.install()

    A failed task is reported once, unhandled, with ``extra["celery-job"]`` (task name and id,
    args and kwargs, ``retries`` and the worker's ``hostname``) and the tags
    ``celery_task_id`` and ``celery_task_name``, as sentry-sdk's Celery integration shapes
    them. Retries, ``Ignore``, ``Reject`` and the exceptions in a task's ``throws`` are not
    reported; a task with ``autoretry_for`` is reported when its last attempt fails.

    Keyword-argument values whose names look like credentials (``password``, ``token``...,
    at any depth) are ``[Filtered]``; the client's ``scrub`` option scrubs the rest of the
    event, positional args included. ``send_args=False`` sends neither args nor kwargs.

    A task published inside the reporting path (from a ``before_send``, from a task that runs
    in it...) carries the :data:`MARK_HEADER` header, and a worker runs such a task in the
    reporting path: its failure is dropped (and counted) instead of reported, and the tasks it
    publishes carry the mark on, so a reporting hook that enqueues a failing task cannot loop
    through the broker. ``client``: the client to report to; default: the global one.
    """
    global _settings
    with _lock:
        _settings = _Settings(client, bool(send_args))
        signals.before_task_publish.connect(_mark_published, weak=False, dispatch_uid=_UID)
        signals.task_prerun.connect(_enter_path, weak=False, dispatch_uid=_UID)
        signals.task_postrun.connect(_leave_path, weak=False, dispatch_uid=_UID)
        signals.task_failure.connect(_report_failure, weak=False, dispatch_uid=_UID)
        signals.worker_process_shutdown.connect(_flush, weak=False, dispatch_uid=_UID)
        signals.after_setup_logger.connect(_restore_handler, weak=False, dispatch_uid=_UID)


def uninstall() -> None:
    """Disconnect what :func:`install` connected."""
    with _lock:
        signals.before_task_publish.disconnect(dispatch_uid=_UID)
        signals.task_prerun.disconnect(dispatch_uid=_UID)
        signals.task_postrun.disconnect(dispatch_uid=_UID)
        signals.task_failure.disconnect(dispatch_uid=_UID)
        signals.worker_process_shutdown.disconnect(dispatch_uid=_UID)
        signals.after_setup_logger.disconnect(dispatch_uid=_UID)


# --- the mark: set when publishing inside the path, honoured by the worker --------------------


def _mark_value() -> str:
    client = current_client(_settings.client)
    dsn = client.dsn if client is not None else None
    return origin_value(dsn) if dsn is not None else "1"


def _mark_published(sender: Any = None, headers: Any = None, **_: Any) -> None:
    # Sent on the publishing thread, before the message is encoded: still inside the path.
    if isinstance(headers, dict) and is_reporting():
        headers[MARK_HEADER] = _mark_value()


def _carries_mark(request: Any) -> bool:
    # Celery copies the message headers onto the request; ``request.headers`` holds the custom
    # ones on the versions that keep them apart.
    if getattr(request, MARK_HEADER, None):
        return True
    headers = getattr(request, "headers", None)
    return isinstance(headers, Mapping) and bool(headers.get(MARK_HEADER))


def _enter_path(sender: Any = None, task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    if request is None:
        return
    # Every task in a scope of its own: what one sets (tags, user, breadcrumbs) is on its own
    # events only, never on the next task this worker thread runs.
    scope = NewScope()
    scope.__enter__()
    setattr(request, _SCOPE_ATTR, scope)
    if not _carries_mark(request):
        return
    path = ReportingPath()
    path.__enter__()
    # task_postrun is sent from a ``finally`` on this thread, with the same request on top.
    setattr(request, _PATH_ATTR, path)


def _leave_path(sender: Any = None, task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    path = getattr(request, _PATH_ATTR, None)
    if isinstance(path, ReportingPath):
        delattr(request, _PATH_ATTR)
        path.__exit__(None, None, None)
    scope = getattr(request, _SCOPE_ATTR, None)
    if isinstance(scope, NewScope):
        delattr(request, _SCOPE_ATTR)
        scope.__exit__(None, None, None)


# --- failures ---------------------------------------------------------------------------------


def _report_failure(
    sender: Any = None,
    task_id: Any = None,
    exception: Any = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    client = current_client(_settings.client)
    if client is None or not isinstance(exception, Exception):
        return
    # Celery 5.7 sends task_failure for Reject(requeue=False) too: control flow, like Retry
    # and Ignore (which never reach it). ``throws``: expected errors, logged by Celery as INFO.
    expected = (Retry, Ignore, Reject, *(getattr(sender, "throws", None) or ()))
    if isinstance(exception, expected):
        return
    if _carries_mark(getattr(sender, "request", None)):
        # Also when the worker's main process reports it (a pool child lost, a hard time
        # limit): outside the path there, but the task was born in it.
        client.drop_reentrant("exception")
        return
    error = _original(exception)
    try:
        extra: Optional[dict[str, Any]] = {"celery-job": _job(sender, task_id, args, kwargs)}
        tags: Optional[dict[str, Any]] = {
            "celery_task_id": task_id,
            "celery_task_name": getattr(sender, "name", None),
        }
    except Exception as problem:  # a Mapping or sequence subclass among the args that raises
        client.diagnostics.warn("celery_job", f"could not describe a failed task: {problem!r}")
        extra = tags = None
    client.capture_exception(error, mechanism="celery", handled=False, extra=extra, tags=tags)


def _original(exception: Exception) -> Exception:
    """The exception the task raised: Celery hands the signal a stand-in when it cannot be
    pickled; the original is still the one being handled on this thread."""
    current = sys.exc_info()[1]
    if isinstance(exception, UnpickleableExceptionWrapper) and isinstance(current, Exception):
        # Celery logs the stand-in next: a logging handler feeding selfreport must not report
        # it again.
        mark_captured(exception)
        return current
    return exception


def _job(task: Any, task_id: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    request = getattr(task, "request", None)
    job: dict[str, Any] = {"task_name": getattr(task, "name", None), "task_id": task_id}
    if _settings.send_args:
        job["args"] = plain_copy(args if args is not None else [], depth=6, redact=is_sensitive)
        job["kwargs"] = plain_copy(kwargs or {}, depth=6, redact=is_sensitive)
    else:
        job["args"] = job["kwargs"] = FILTERED
    job["retries"] = getattr(request, "retries", None)
    job["hostname"] = getattr(request, "hostname", None)
    return job


def _restore_handler(logger: Any = None, **_: Any) -> None:
    # The worker empties the root logger's handlers (worker_hijack_root_logger) after the app
    # module ran selfreport.init(): without this, logged errors would never be reported.
    from selfreport._state import root_handler

    handler = root_handler()
    if handler is not None and isinstance(logger, logging.Logger):
        logger.addHandler(handler)  # a no-op when it is there


def _flush(**_: Any) -> None:
    # A prefork child leaves with os._exit, past atexit: deliver what it queued first.
    client = current_client(_settings.client)
    if client is not None:
        client.flush(client.shutdown_timeout)
