"""WSGI middleware: own reports are processed in the reporting path; crashes are reported once."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any, Callable, Optional
from urllib.parse import quote

from selfreport._capture.scope import current_state, use_state
from selfreport._core.guard import reporting_path
from selfreport.integrations import (
    RequestMiddleware,
    filter_headers,
    filter_url,
    report_request_exception,
)

__all__ = ["SelfreportWSGIMiddleware", "environ_headers", "request_info"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class SelfreportWSGIMiddleware(RequestMiddleware[WSGIApp]):
    """Wrap a WSGI app (Flask: ``app.wsgi_app = SelfreportWSGIMiddleware(app.wsgi_app)``).

    Requests carrying this process's own reports (:func:`selfreport.is_own_report`) run inside
    :func:`selfreport.reporting_path`, response iteration included; any other request whose
    handling or response iteration raises is reported once with its method, URL and headers
    (credentials filtered), and the exception is re-raised. Every request runs in a scope of its
    own (:func:`selfreport.new_scope`), response iteration included.

    ``client``: the selfreport client to consult and report to; default: the global one.
    """

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self._is_own_environ(environ):
            with reporting_path():
                try:
                    body = self.app(environ, start_response)
                except Exception as exc:
                    report_request_exception(exc, {}, mechanism="wsgi", client=self.client)
                    raise
            return _Body(body, None)
        # Per request: what it sets is its own, the response iteration (after we return) included.
        request_scope = use_state(current_state())
        with request_scope:
            try:
                body = self.app(environ, start_response)
            except Exception as exc:
                self._report(exc, environ)
                raise
        return _Body(body, lambda exc: self._report(exc, environ), request_scope)

    def _report(self, exc: BaseException, environ: Environ) -> None:
        info = request_info(environ, environ_headers(environ))
        report_request_exception(exc, info, mechanism="wsgi", client=self.client)


class _Body:
    """The app's response iterable: iterated (and closed) in the reporting path for own
    reports, with errors reported through ``on_error`` for other requests."""

    def __init__(
        self,
        body: Iterable[bytes],
        on_error: Optional[Callable[[BaseException], None]],
        scope: Optional[use_state] = None,
    ) -> None:
        self._body = body
        self._iterator: Optional[Iterator[bytes]] = None
        self._on_error = on_error
        self._scope = scope

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._on_error is None:
            with reporting_path():
                return self._next()
        with self._scope or nullcontext():
            try:
                return self._next()
            except StopIteration:
                raise
            except Exception as exc:
                self._on_error(exc)
                raise

    def _next(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._body)
        return next(self._iterator)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is None:
            return
        if self._on_error is None:
            with reporting_path():
                close()
            return
        with self._scope or nullcontext():
            try:
                close()
            except Exception as exc:
                self._on_error(exc)
                raise


def environ_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """The HTTP headers of a WSGI environ (or Django's ``request.META``), names in lower case."""
    out: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            out[key[5:].replace("_", "-").lower()] = str(value)
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            out[key.replace("_", "-").lower()] = str(value)
    return out


def request_info(environ: Mapping[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """Method, URL and filtered headers of a WSGI request, for an event."""
    scheme = environ.get("wsgi.url_scheme", "http")
    host = headers.get("host")
    if not host:  # as PEP 3333 rebuilds the URL: the port only when not the scheme's default
        host = str(environ.get("SERVER_NAME", "localhost"))
        port = str(environ.get("SERVER_PORT", "80"))
        if port != {"http": "80", "https": "443"}.get(scheme):
            host += ":" + port
    path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/;=,@:")
    query = environ.get("QUERY_STRING", "")
    url = f"{scheme}://{host}{path}" + (f"?{query}" if query else "")
    info: dict[str, Any] = {
        "method": environ.get("REQUEST_METHOD", "GET"),
        "url": filter_url(url),
        "headers": filter_headers(headers.items()),
    }
    # Flask keeps its request (with the matched rule) in the environ; others may set the key.
    werkzeug_request = environ.get("werkzeug.request")
    rule = getattr(getattr(werkzeug_request, "url_rule", None), "rule", None)
    route = environ.get("selfreport.route", rule)
    if isinstance(route, str):
        info["route"] = route
    return info
