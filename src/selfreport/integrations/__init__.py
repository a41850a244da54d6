"""Integrations: web-framework middleware and other SDKs, each importing its library lazily."""

# - selfreport.integrations.asgi: SelfreportMiddleware for ASGI apps (Starlette, FastAPI, ...).
# - selfreport.integrations.wsgi: SelfreportWSGIMiddleware for WSGI apps (Flask, Django, ...).
# Both run requests carrying this process's own reports (selfreport.is_own_report) inside
# selfreport.reporting_path(), and report other requests' unhandled exceptions once, with the
# method, URL, route and headers (credentials filtered), before re-raising them.
# - selfreport.integrations.celery: install() reports failed tasks, and carries the reporting-path
#   mark through the broker in a task header (a task published in the path runs in it).

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, Optional, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from selfreport._capture.sensitive import FILTERED, is_sensitive_name

if TYPE_CHECKING:
    from selfreport._client import Client

__all__ = [
    "FILTERED",
    "RequestMiddleware",
    "filter_headers",
    "filter_url",
    "is_sensitive",
    "report_request_exception",
    "requires",
]

App = TypeVar("App")


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

    def _is_own(self, headers: dict[str, str]) -> bool:
        if self.client is not None:
            return self.client.is_own_report(headers)
        from selfreport import is_own_report

        return is_own_report(headers)
