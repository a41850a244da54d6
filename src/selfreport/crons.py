"""Cron monitoring: check-ins and the ``monitor`` decorator, as sentry-sdk's ``crons`` has them."""

from __future__ import annotations

import functools
import inspect
import random
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Callable, Optional, TypeVar, cast

from ._capture.event import plain_mapping
from ._core.diag import Diagnostics
from ._core.text import safe_repr
from ._state import current_client

__all__ = ["checkin", "monitor"]

F = TypeVar("F", bound=Callable[..., Any])
_diagnostics = Diagnostics()
_MAX_SLUG = 200


def _new_id() -> str:
    return f"{random.getrandbits(128):032x}"  # as event ids: unique, not secret, no urandom


def _payload(
    monitor_slug: str,
    status: str,
    check_in_id: str,
    duration: Optional[float],
    monitor_config: Optional[Mapping[str, Any]],
    environment: Optional[str],
) -> dict[str, Any]:
    checkin: dict[str, Any] = {
        "check_in_id": check_in_id,
        "monitor_slug": str(monitor_slug)[:_MAX_SLUG],
        "status": str(status),
    }
    if duration is not None:
        checkin["duration"] = float(duration)
    if monitor_config:
        checkin["monitor_config"] = plain_mapping(monitor_config)  # copied now, as events are
    if environment is not None:
        checkin["environment"] = str(environment)
    return checkin


def checkin(
    monitor_slug: str,
    status: str,
    *,
    check_in_id: Optional[str] = None,
    duration: Optional[float] = None,
    monitor_config: Optional[Mapping[str, Any]] = None,
    environment: Optional[str] = None,
) -> str:
    """Send a check-in for ``monitor_slug``: ``status`` is ``"in_progress"``, ``"ok"`` or
    ``"error"``; the check-in id, new unless given (pass it to close an in_progress one).

    ``monitor_config`` (Sentry's: ``schedule`` crontab or interval, ``checkin_margin``,
    ``max_runtime`` in minutes, ``timezone``) creates or updates the monitor on the collector;
    ``duration`` is in seconds; ``environment`` defaults to the client's. Never raises, never
    blocks: dropped check-ins are counted in ``stats()``.
    """
    check_in_id = check_in_id or _new_id()
    try:
        client = current_client()
        if client is not None:
            client.capture_checkin(
                _payload(monitor_slug, status, check_in_id, duration, monitor_config, environment)
            )
    except Exception as error:  # never into the caller
        _diagnostics.warn("checkin", f"could not send a check-in: {safe_repr(error)}")
    return check_in_id


class monitor:
    """Check in ``in_progress`` on entry and ``ok`` or ``error`` (with the duration) on exit.

    As a context manager (``with selfreport.monitor("nightly"):``) or a decorator of sync and
    async functions (``@selfreport.monitor("nightly", monitor_config={...})``); the exception
    of a failing job is re-raised untouched.
    """

    def __init__(
        self, monitor_slug: str, monitor_config: Optional[Mapping[str, Any]] = None
    ) -> None:
        self.monitor_slug = monitor_slug
        self.monitor_config = monitor_config
        self.check_in_id: Optional[str] = None
        self._start = 0.0

    def __enter__(self) -> monitor:
        self._start = time.monotonic()
        self.check_in_id = checkin(
            self.monitor_slug, "in_progress", monitor_config=self.monitor_config
        )
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        checkin(
            self.monitor_slug,
            "ok" if exc_type is None else "error",
            check_in_id=self.check_in_id,
            duration=time.monotonic() - self._start,
            monitor_config=self.monitor_config,
        )

    def __call__(self, func: F) -> F:
        slug, config = self.monitor_slug, self.monitor_config
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with monitor(slug, config):  # one per call: concurrent runs have their own ids
                    return await func(*args, **kwargs)

            return cast(F, run_async)

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with monitor(slug, config):
                return func(*args, **kwargs)

        return cast(F, run)
