"""Integrations: web-framework middleware and other SDKs, each importing its library lazily."""

# - selfreport.integrations.asgi: SelfreportMiddleware for ASGI apps (Starlette, FastAPI, ...).
# - selfreport.integrations.wsgi: SelfreportWSGIMiddleware for WSGI apps (Flask, Django, ...).
# Both run requests carrying this process's own reports (selfreport.is_own_report) inside
# selfreport.reporting_path(), and report other requests' unhandled exceptions once, with the
# method, URL, route and headers (credentials filtered), before re-raising them.
# - selfreport.integrations.django / .flask: the frameworks' own integrations, on top of these:
#   the request, user and route on every event a request reports, its crash reported once.
# - selfreport.integrations.celery: install() reports failed tasks, and carries the reporting-path
#   mark through the broker in a task header (a task published in the path runs in it).

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, Optional, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from selfreport._capture.event import add_request
from selfreport._capture.scope import current_state, new_scope, set_user
from selfreport._capture.sensitive import FILTERED, is_sensitive_name
from selfreport._core.guard import reporting_path
from selfreport._core.text import safe_str
from selfreport._delivery.transport import ORIGIN_HEADER

if TYPE_CHECKING:
    from selfreport._client import Client

__all__ = [
    "FILTERED",
    "RequestMiddleware",
    "RequestView",
    "describe_request",
    "filter_headers",
    "filter_url",
    "is_sensitive",
    "report_request_exception",
    "report_view_exception",
    "requires",
    "reset_request",
    "serving",
    "set_request",
    "user_info",
]

App = TypeVar("App")
_ORIGIN_ENVIRON = "HTTP_" + ORIGIN_HEADER.upper().replace("-", "_")


@contextmanager
def requires(module: str, library: str, extra: str) -> Iterator[None]:
    """Around an integration's imports of its library: when one is missing, the ImportError
    names the extra that installs it (``pip install 'selfreport[extra]'``)."""
    try:
        yield
    except ImportError as missing:
        raise ImportError(
            f"{module} needs {library}: pip install 'selfreport[{extra}]'", name=module
        ) from missing


def is_sensitive(name: str) -> bool:
    """Whether a header or parameter called ``name`` may carry a credential or personal data:
    the scrubber's default key lists (``Authorization``, ``Cookie``, ``X-Forwarded-For``...)."""
    return is_sensitive_name(name)


def filter_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers as a dict with the values of credential-bearing ones replaced by ``[Filtered]``."""
    out: dict[str, str] = {}
    for name, value in headers:
        out[name] = FILTERED if is_sensitive(name) else value
    return out


def filter_url(url: str) -> str:
    """``url`` without a password and with credential-bearing query values filtered."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:{FILTERED}@{hostport}" if ":" in userinfo else netloc
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, FILTERED if is_sensitive(k) else v) for k, v in pairs], safe="[]")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return FILTERED


def report_request_exception(
    exc: BaseException,
    request: Mapping[str, Any],
    *,
    mechanism: str,
    client: Optional[Client] = None,
) -> Optional[str]:
    """Report ``exc`` as unhandled, with ``request`` (method, url, headers, route) as the event's
    request interface; the event id, or None when dropped. Never raises."""
    from selfreport._state import current_client

    reporter = current_client(client)
    if reporter is None or not isinstance(exc, Exception):
        return None
    try:
        return reporter.capture_exception(exc, mechanism=mechanism, handled=False, request=request)
    except Exception:  # pragma: no cover - reporting never raises into the request
        return None


class RequestMiddleware(Generic[App]):
    """What the ASGI and WSGI middleware share: the wrapped app, the client, own-report checks."""

    def __init__(self, app: App, *, client: Optional[Client] = None) -> None:
        self.app = app
        self.client = client

    def _is_own_environ(self, environ: Mapping[str, Any]) -> bool:
        """:meth:`_is_own` for a WSGI environ (or Django's ``request.META``), reading the one
        header that matters: building them all for every request would cost more than the
        rest of the middleware."""
        mark = environ.get(_ORIGIN_ENVIRON)
        return mark is not None and self._is_own({ORIGIN_HEADER: str(mark)})

    def _is_own(self, headers: Mapping[str, str]) -> bool:
        if self.client is not None:
            return self.client.is_own_report(headers)
        from selfreport import is_own_report

        return is_own_report(headers)


# --- what the framework integrations share: the request behind every event it reports ----------


class RequestView:
    """A framework's request as events describe it. Read on the request's thread when it
    crashes, and on the worker thread (inside the reporting path) for the other events it
    reports: a logged error carries its request, route and user too."""

    __slots__ = ()

    def info(self) -> dict[str, Any]:
        """Method, URL and headers (credentials filtered), route and endpoint."""
        raise NotImplementedError

    def user(self, load: bool) -> Optional[dict[str, Any]]:
        """The authenticated user (id, username; email with ``send_default_pii``), or None.
        With ``load`` false only a user the application already loaded: no query of ours, and
        none ever on the worker thread."""
        raise NotImplementedError


_current_request: contextvars.ContextVar[Optional[RequestView]] = contextvars.ContextVar(
    "selfreport_request", default=None
)


def set_request(view: Optional[RequestView]) -> contextvars.Token[Optional[RequestView]]:
    """Make ``view`` the request of this context's events (undo with :func:`reset_request`)."""
    return _current_request.set(view)


def reset_request(token: contextvars.Token[Optional[RequestView]]) -> None:
    _current_request.reset(token)


class serving:
    """``with serving(view):`` runs one request in a scope of its own, ``view`` describing the
    events it reports. A class, not a generator: it runs for every request."""

    __slots__ = ("_scope", "_token", "_view")

    def __init__(self, view: RequestView) -> None:
        self._view = view
        self._scope = new_scope()

    def __enter__(self) -> None:
        self._token = _current_request.set(self._view)
        self._scope.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._scope.__exit__(None, None, None)
        _current_request.reset(self._token)


def describe_request(event: dict[str, Any]) -> None:
    """The event processor: the current request's data, route and user on an event that has
    none (a user set with ``set_user`` wins)."""
    view = _current_request.get()
    if view is None:
        return
    if "request" not in event:
        add_request(event, view.info())
    if "user" not in event:
        user = view.user(load=False)
        if user:
            event["user"] = user


def user_info(
    user_id: object, username: object, email: object, send_default_pii: bool
) -> Optional[dict[str, Any]]:
    """A Sentry user: id and username, the email only with ``send_default_pii``; bounded."""
    out = {}
    for key, value in (("id", user_id), ("username", username), ("email", email)):
        if value is not None and value != "" and (key != "email" or send_default_pii):
            out[key] = safe_str(value, 200)
    return out or None


def report_view_exception(
    exc: BaseException,
    view: Optional[RequestView],
    *,
    mechanism: str,
    client: Optional[Client] = None,
) -> Optional[str]:
    """Report a request's crash once, with ``view``'s request, route and user (loaded now, on
    the request's thread); the event id, or None when dropped. Never raises."""
    if view is None:
        return report_request_exception(exc, {}, mechanism=mechanism, client=client)
    info: dict[str, Any] = {}
    user = None
    try:
        # Loading the user may query and log: whatever it logs is not reported.
        with reporting_path():
            user = view.user(load=True)
            info = view.info()
    except Exception:
        pass
    with new_scope():
        if user is not None and current_state().fields.user is None:  # set_user wins
            set_user(user)
        return report_request_exception(exc, info, mechanism=mechanism, client=client)
