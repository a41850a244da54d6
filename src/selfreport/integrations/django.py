"""Django: a middleware giving each request its scope, request data, user and route, and
reporting its crash once."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from selfreport._core.guard import reporting_path
from selfreport._core.processors import add_event_processor
from selfreport.integrations import (
    RequestMiddleware,
    RequestView,
    describe_request,
    report_view_exception,
    requires,
    serving,
    user_info,
)
from selfreport.integrations.wsgi import environ_headers, request_info

with requires(__name__, "Django 4.2 or later", "django"):
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
    from django.conf import settings
    from django.core.signals import got_request_exception
    from django.utils.functional import empty

__all__ = ["DjangoRequest", "SelfreportMiddleware"]

# One receiver however many handlers (and so middleware instances) a process builds.
_DISPATCH_UID = "selfreport.integrations.django"


class DjangoRequest(RequestView):
    """A Django ``HttpRequest`` (WSGI or ASGI) described for events."""

    __slots__ = ("request",)

    def __init__(self, request: Any) -> None:
        self.request = request

    def info(self) -> dict[str, Any]:
        request = self.request
        meta = request.META
        info = request_info({**meta, "wsgi.url_scheme": request.scheme}, environ_headers(meta))
        match = getattr(request, "resolver_match", None)
        if match is not None:
            # The pattern, not the path: one transaction for /items/1/ and /items/2/.
            info["route"] = "/" + str(match.route).lstrip("^")
            info["endpoint"] = match.view_name
        return info

    def user(self, load: bool) -> Optional[dict[str, Any]]:
        user = getattr(self.request, "user", None)
        if user is None:
            return None
        # AuthenticationMiddleware's lazy user: loading it is a session and a database query.
        if not load and getattr(user, "_wrapped", None) is empty:
            return None
        try:
            if not user.is_authenticated:
                return None
            return user_info(
                user.pk,
                user.get_username(),
                getattr(user, "email", None),
                bool(getattr(settings, "SELFREPORT_SEND_DEFAULT_PII", False)),
            )
        except Exception:  # a broken user model or database: the event goes without a user
            return None


class SelfreportMiddleware(RequestMiddleware[Callable[[Any], Any]]):
    """Django middleware; put it first in ``MIDDLEWARE``::

        MIDDLEWARE = ["selfreport.integrations.django.SelfreportMiddleware", ...]

    - Every request runs in a :func:`selfreport.new_scope`, and every event it reports (its
      crash, an error it logs) carries its method, URL and headers (credentials filtered), the
      URL pattern as the transaction, the view name, and the authenticated user (id and
      username; the email too with ``SELFREPORT_SEND_DEFAULT_PII = True`` in settings).
    - An uncaught view exception is reported once, from Django's ``got_request_exception``
      signal; the ``django.request`` log record of the same exception is then dropped as a
      duplicate (counted in ``stats()["dropped_duplicate"]``), not reported again.
    - A request carrying this process's own reports (:func:`selfreport.is_own_report`) runs
      inside :func:`selfreport.reporting_path`.

    Works under WSGI and ASGI (sync and async middleware chains).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        super().__init__(get_response)
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)
        got_request_exception.connect(_report_exception, weak=False, dispatch_uid=_DISPATCH_UID)
        add_event_processor(describe_request)

    def __call__(self, request: Any) -> Any:
        if self._is_async:
            return self._acall(request)
        if self._is_own_environ(request.META):
            with reporting_path():
                return self.app(request)
        with serving(DjangoRequest(request)):
            return self.app(request)

    async def _acall(self, request: Any) -> Any:
        if self._is_own_environ(request.META):
            async with reporting_path():
                return await self.app(request)
        with serving(DjangoRequest(request)):
            return await self.app(request)


def _report_exception(sender: Any, request: Any = None, **kwargs: Any) -> None:
    """``got_request_exception``: Django is handling an uncaught exception (a 500)."""
    exc = sys.exc_info()[1]
    if exc is None:
        return
    view = DjangoRequest(request) if request is not None else None
    report_view_exception(exc, view, mechanism="django")
