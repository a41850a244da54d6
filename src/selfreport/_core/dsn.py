"""Parsing Sentry-format DSNs into the endpoint and auth header they stand for."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Optional
from urllib.parse import quote, unquote, urlsplit

from selfreport.exceptions import ConfigError

__all__ = ["Dsn", "parse_dsn"]

_PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Keys travel in the X-Sentry-Auth header: printable ASCII without the header's separators.
_KEY = re.compile(r"^[!#-+\--~]+$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Characters a URL path may carry as they are; anything else (non-ASCII) is percent-encoded.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


@dataclass(frozen=True)
class Dsn:
    """A parsed ``{scheme}://{public_key}[:{secret_key}]@{host}[:{port}][/{path}]/{project_id}``."""

    scheme: str
    public_key: str
    host: str
    project_id: str
    port: Optional[int] = None
    path: str = ""
    secret_key: Optional[str] = None

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def envelope_url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}/api/{self.project_id}/envelope/"

    @property
    def envelope_path(self) -> str:
        return f"{self.path}/api/{self.project_id}/envelope/"

    def auth_header(self, client: str, timestamp: Optional[float] = None) -> str:
        parts = [
            "Sentry sentry_version=7",
            f"sentry_client={client}",
            f"sentry_key={self.public_key}",
        ]
        if timestamp is not None:
            parts.append(f"sentry_timestamp={timestamp:.3f}")
        if self.secret_key:
            parts.append(f"sentry_secret={self.secret_key}")
        return ", ".join(parts)

    def public(self) -> Dsn:
        """This DSN without its (legacy) secret key."""
        return replace(self, secret_key=None) if self.secret_key else self

    def __str__(self) -> str:
        secret = f":{quote(self.secret_key, safe='')}" if self.secret_key else ""
        key = quote(self.public_key, safe="")
        return f"{self.scheme}://{key}{secret}@{self.netloc}{self.path}/{self.project_id}"


def parse_dsn(value: str) -> Dsn:
    """Parse ``value`` or raise :class:`ConfigError` naming what is wrong with it."""
    if not isinstance(value, str):
        raise ConfigError("dsn", f"expected a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ConfigError("dsn", "is empty")
    if any(ch.isspace() or ord(ch) < 32 or ch == "\x7f" for ch in text):
        raise ConfigError("dsn", "contains whitespace or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("dsn", f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        shown = parts.scheme or "(none)"
        raise ConfigError("dsn", f"scheme must be http or https, got {shown!r}")
    if "@" not in parts.netloc or not parts.username:
        raise ConfigError("dsn", "is missing the public key (expected scheme://KEY@host/PROJECT)")
    if not parts.hostname:
        raise ConfigError("dsn", "is missing the host")
    if parts.query or parts.fragment:
        raise ConfigError("dsn", "must not have a query string or fragment")
    path, _, project_id = parts.path.rstrip("/").rpartition("/")
    if not project_id:
        raise ConfigError("dsn", "is missing the project id (expected .../PROJECT at the end)")
    if not _PROJECT_ID.match(project_id):
        raise ConfigError("dsn", f"project id {project_id!r} has characters other than A-Z0-9_-")
    if port == 0:
        raise ConfigError("dsn", "port 0 is not a valid destination")
    public_key = unquote(parts.username)
    secret_key = unquote(parts.password) if parts.password else None
    for what, key in (("public key", public_key), ("secret key", secret_key)):
        if key is not None and not _KEY.match(key):
            raise ConfigError("dsn", f"{what} must be printable ASCII without spaces, ',' or '\"'")
    return Dsn(
        scheme=parts.scheme,
        public_key=public_key,
        secret_key=secret_key,
        host=_check_host(parts.hostname),
        port=port,
        path=quote(path, safe=_PATH_SAFE),
        project_id=project_id,
    )


def _check_host(host: str) -> str:
    if ":" in host:  # an IPv6 literal: urlsplit checks it itself only from Python 3.11 on
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError("dsn", f"host {host!r} is not a valid IPv6 address") from None
        return host
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ConfigError("dsn", f"host {host!r} is not a valid host name") from None
    if not _HOST_NAME.match(ascii_host):
        raise ConfigError("dsn", f"host {host!r} is not a valid host name")
    return host
