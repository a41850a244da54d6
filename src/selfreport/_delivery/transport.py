"""Sentry envelopes over HTTP: auth, gzip, timeouts and the origin mark."""

from __future__ import annotations

import gzip
import http.client
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Protocol
from urllib.parse import urlsplit

from selfreport._core.dsn import Dsn
from selfreport._version import __version__
from selfreport.exceptions import ConfigError

__all__ = [
    "ORIGIN_HEADER",
    "Connector",
    "HttpTransport",
    "Response",
    "SendsEnvelopes",
    "Transport",
    "as_transport",
    "is_marked_origin",
    "origin_value",
    "register_origin",
]

# Every request a selfreport client sends carries this header, naming the DSN project it reports
# to, so the receiving service can tell its own reports from others' (see is_own_report).
ORIGIN_HEADER = "X-Selfreport-Origin"
_ORIGIN_LOWER = ORIGIN_HEADER.lower()
USER_AGENT = f"selfreport/{__version__}"
_MAX_RESPONSE = 65536
# What reusing a connection the server has closed in the meantime raises (RemoteDisconnected is
# a ConnectionResetError); timeouts are not among them.
_STALE_CONNECTION = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class Connector:
    """Opens HTTP(S) connections to one host: the one place every sender of selfreport (the
    transport, notifiers, uptime probes) makes them. The TLS context is made on first use and
    kept, since loading the CA store is slow."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: Optional[int] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"not an http(s) address: {scheme}://{host}")
        self.scheme = scheme
        self.host = host
        self.port = port
        self._ssl_context = ssl_context

    @classmethod
    def for_url(
        cls, url: str, ssl_context: Optional[ssl.SSLContext] = None
    ) -> tuple[Connector, str]:
        """A connector for ``url``'s host, and the path (with the query) to request there."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, parts.port, ssl_context), path

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        """A new connection (not yet open: it connects on its first request)."""
        if self.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self._ssl_context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def origin_value(dsn: Dsn) -> str:
    return f"{dsn.project_id}:{dsn.public_key}"


# Origins of other senders in this process that mark their requests the same way (the sentry-sdk
# integration registers its DSN here), so is_own_report() recognises their reports too.
_extra_origins: set[str] = set()


def register_origin(dsn: Dsn) -> str:
    """Count requests marked with ``dsn``'s origin as this process's own; returns the value."""
    value = origin_value(dsn)
    _extra_origins.add(value)
    return value


def is_marked_origin(headers: Mapping[str, str], own: Optional[str]) -> bool:
    """Whether ``headers`` carry the origin mark of ``own`` or of a registered sender."""
    try:
        for key, value in headers.items():
            if isinstance(key, str) and key.lower() == _ORIGIN_LOWER:
                mark = str(value).strip()
                return mark == own or mark in _extra_origins
    except Exception:
        return False
    return False


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


class Transport:
    """What delivers one serialized envelope; raises OSError on connection trouble.

    Subclasses implement :meth:`send`; the rest are no-ops to override when there is something
    to do. Any other object with a ``send(body, timeout)`` method is accepted as a transport too,
    through :func:`as_transport`.
    """

    def send(self, body: bytes, timeout: float) -> Response:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (after the last send)."""

    def interrupt(self) -> None:
        """Unblock a send in progress on another thread (a bounded close)."""

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them."""


class SendsEnvelopes(Protocol):
    """A custom transport: anything with ``send``; ``close``, ``interrupt`` and
    ``reset_after_fork`` (or ``forget_after_fork``) are used when it has them."""

    def send(self, body: bytes, timeout: float) -> Response: ...


class _Adapter(Transport):
    """A duck-typed transport, its optional methods looked up once."""

    def __init__(self, wrapped: SendsEnvelopes) -> None:
        self.wrapped = wrapped
        nothing: Callable[[], None] = lambda: None  # noqa: E731
        for name, aliases in _OPTIONAL.items():
            found = [getattr(wrapped, alias, None) for alias in aliases]
            method = next((m for m in found if callable(m)), nothing)
            setattr(self, name, method)

    def send(self, body: bytes, timeout: float) -> Response:
        return self.wrapped.send(body, timeout)

    def __repr__(self) -> str:
        return f"Transport({self.wrapped!r})"


_OPTIONAL = {
    "close": ("close",),
    "interrupt": ("interrupt",),
    "reset_after_fork": ("reset_after_fork", "forget_after_fork"),
}


def as_transport(transport: object) -> Transport:
    """``transport`` as a :class:`Transport`: as it is, or adapted once if it only has ``send``.

    Raises ConfigError when it has no ``send`` method."""
    if isinstance(transport, Transport):
        return transport
    if not callable(getattr(transport, "send", None)):
        raise ConfigError("transport", "must have a send(body, timeout) method")
    return _Adapter(transport)  # type: ignore[arg-type]


class HttpTransport(Transport):
    """Keep-alive HTTP(S) to the DSN's envelope endpoint, via the standard library only."""

    def __init__(
        self,
        dsn: Dsn,
        *,
        compress: bool = True,
        ssl_context: Optional[ssl.SSLContext] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dsn = dsn
        self.compress = compress
        self._connector = Connector(dsn.scheme, dsn.host, dsn.port, ssl_context)
        self._clock = clock
        self._conn: Optional[http.client.HTTPConnection] = None
        self._origin = origin_value(dsn)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = self._connector.connect(timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def send(self, body: bytes, timeout: float) -> Response:
        headers = {
            "Content-Type": "application/x-sentry-envelope",
            "User-Agent": USER_AGENT,
            "X-Sentry-Auth": self.dsn.auth_header(USER_AGENT, self._clock()),
            ORIGIN_HEADER: self._origin,
        }
        if self.compress and len(body) > 1024:
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        timeout = max(timeout, 0.001)
        reused = self._conn is not None and self._conn.sock is not None
        try:
            return self._post(body, headers, timeout)
        except _STALE_CONNECTION:
            if not reused:
                raise
            # The server closed the idle keep-alive connection before our request reached it:
            # not a failure of the collector, so try once more at once on a fresh connection.
            return self._post(body, headers, timeout)

    def _post(self, body: bytes, headers: dict[str, str], timeout: float) -> Response:
        conn = self._connection(timeout)
        try:
            conn.request("POST", self.dsn.envelope_path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(_MAX_RESPONSE)  # drain so the connection can be reused
            result = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()})
            if resp.will_close or not resp.isclosed():
                resp.close()  # the server closes, or answered more than we read: start afresh
                self.close()
            return result
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            if isinstance(exc, OSError):
                raise
            raise ConnectionError(f"bad HTTP response: {exc!r}") from exc

    def interrupt(self) -> None:
        """Unblock a send in progress on another thread (used by a bounded close)."""
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:  # pragma: no cover - closing a broken socket
                pass

    def reset_after_fork(self) -> None:
        """Drop the parent's connection: close only this process's copy of the socket (no
        shutdown, no TLS close_notify), so the parent's connection is untouched."""
        conn, self._conn = self._conn, None
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.close()
            except OSError:  # pragma: no cover - an already broken descriptor
                pass
