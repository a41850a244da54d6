"""ASGI middleware: own reports are processed in the reporting path; crashes are reported once."""

from __future__ import annotations

from collections.abc import Awaitable, MutableMapping
from typing import Any, Callable, Optional

from selfreport._capture.scope import new_scope
from selfreport._core.guard import reporting_path
from selfreport._delivery.transport import ORIGIN_HEADER
from selfreport.integrations import (
    RequestMiddleware,
    filter_headers,
    filter_url,
    report_request_exception,
)

__all__ = ["SelfreportMiddleware", "request_info"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ORIGIN_NAME = ORIGIN_HEADER.lower().encode("latin-1")


class SelfreportMiddleware(RequestMiddleware[ASGIApp]):
    """Wrap an ASGI app (Starlette: ``Middleware(SelfreportMiddleware)``)::

        app = SelfreportMiddleware(app)

    - A request that carries a report sent by this process's selfreport client
      (:func:`selfreport.is_own_report`) is processed inside :func:`selfreport.reporting_path`:
      whatever fails while ingesting it is never reported again, so a service that receives its
      own reports cannot feed on itself.
    - Any other request that raises is reported once, as unhandled, with its method, URL,
      route and headers (credentials filtered), and the exception is re-raised.
    - Every request runs in a :func:`selfreport.new_scope`: the tags, user and breadcrumbs set
      while handling it are on its events only.

    ``client``: the selfreport client to consult and report to; default: the global one.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._is_own_scope(scope):
            async with reporting_path():
                try:
                    await self.app(scope, receive, send)
                except Exception as exc:
                    # Dropped, and counted in stats()["dropped_reentrant"]: never sent.
                    report_request_exception(exc, {}, mechanism="asgi", client=self.client)
                    raise
            return
        # Per request: the tags, user and breadcrumbs it sets are its own.
        async with new_scope():
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                info = request_info(scope, _headers(scope))
                report_request_exception(exc, info, mechanism="asgi", client=self.client)
                raise

    def _is_own_scope(self, scope: Scope) -> bool:
        # The one header that matters, found among the raw ones (ASGI lowercases their names):
        # decoding them all for every request would cost more than the rest of the middleware.
        for name, value in scope.get("headers", ()):
            if name == _ORIGIN_NAME:
                return self._is_own({ORIGIN_HEADER: value.decode("latin-1")})
        return False


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _matched_route_path(scope: Scope) -> Optional[str]:
    """The path of the route a Starlette router matched, found again by matching.

    Starlette records the matched route in ``scope["route"]`` only from 1.0 on, and its last
    releases for Python 3.9 are older; they record the router, so match as Sentry's integration
    does. The innermost route wins, as it does in ``scope["route"]``.
    """
    router = scope.get("router")
    try:
        for _ in range(8):  # mounts nest; a bound rather than recursion
            for route in getattr(router, "routes", None) or ():
                match, child = route.matches(scope)
                if getattr(match, "name", None) == "FULL":
                    break
            else:
                return None
            if getattr(route, "routes", None) is None:  # not a Mount: the endpoint's route
                path = getattr(route, "path", None)
                return path if isinstance(path, str) else None
            router, scope = route, {**scope, **child}
    except Exception:  # a foreign router: no route rather than no event
        return None
    return None


def request_info(scope: Scope, headers: dict[str, str]) -> dict[str, Any]:
    """Method, URL, route and filtered headers of an ASGI request, for an event."""
    scheme = scope.get("scheme") or "http"
    host = headers.get("host")
    if not host:
        server = scope.get("server")
        host = f"{server[0]}:{server[1]}" if server else "localhost"
    path = scope.get("root_path", "") + scope.get("path", "")
    query = scope.get("query_string", b"").decode("latin-1")
    url = f"{scheme}://{host}{path}" + (f"?{query}" if query else "")
    info: dict[str, Any] = {
        "method": scope.get("method", "GET" if scope.get("type") == "http" else "WEBSOCKET"),
        "url": filter_url(url),
        "headers": filter_headers(headers.items()),
    }
    route_path = getattr(scope.get("route"), "path", None)
    if route_path is None:
        route_path = _matched_route_path(scope)
    if isinstance(route_path, str):
        info["route"] = route_path
    endpoint = scope.get("endpoint")
    name = getattr(endpoint, "__qualname__", None) or getattr(type(endpoint), "__qualname__", None)
    if endpoint is not None and isinstance(name, str):
        info["endpoint"] = f"{getattr(endpoint, '__module__', '?')}.{name}"
    return info
