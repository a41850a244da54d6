"""Who may read: the Host check, sessions and API tokens, CSRF and Origin checks, the login page."""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional
from urllib.parse import parse_qs, quote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from selfreport._guard import reporting_path

from .accounts import DUMMY_HASH, MAX_PASSWORD, hash_password, hash_secret, needs_rehash
from .accounts import verify_password as _verify_password
from .store import Store

if TYPE_CHECKING:
    from .app import Collector

__all__ = [
    "LOGIN_MODES",
    "AuthMiddleware",
    "AuthPolicy",
    "Identity",
    "LoginThrottle",
    "allowed_hosts",
    "is_loopback",
    "routes",
]

logger = logging.getLogger("selfreport.collector")

LOGIN_MODES = ("auto", "required", "off")
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
SESSION_COOKIE = "selfreport_session"
LOGIN_COOKIE = "selfreport_login"
SESSION_SECONDS = 7 * 86400
LOGIN_FORM_SECONDS = 3600
MAX_FORM_BYTES = 16 * 1024
# Neither asks for a login nor checks Host: load balancers probe /health by address.
PUBLIC_PATHS = frozenset({"/health"})
LOGIN_PATHS = frozenset({"/login", "/logout"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# How many password hashes run at once: each takes 16 MiB and a core for ~50 ms.
HASHING_SLOTS = 2


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_public_url(url: str) -> str:
    """``url`` without its trailing slash; ValueError unless it is ``http(s)://host...``."""
    split = urlsplit(url.strip())
    if split.scheme not in ("http", "https") or not split.hostname:
        raise ValueError(f"must be http://HOST[:PORT] or https://..., not {url!r}")
    if split.query or split.fragment or split.username:
        raise ValueError(f"cannot have a query, fragment or user: {url!r}")
    return url.strip().rstrip("/")


def _split_host(value: str) -> tuple[str, Optional[str]]:
    """``name``, ``name:port``, ``[v6]``, ``[v6]:port`` -> (lowercase name, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        return name, port or None
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name.rstrip("."), port or None
    return value.rstrip("."), None  # a bare IPv6 address (in --allowed-host) or a name


def allowed_hosts(listen_host: str, public_url: str, extra: Iterable[str] = ()) -> list[str]:
    """What ``Host`` may name: loopback names, the listening address (with the machine's name
    when that is every interface), the public URL's host and ``extra``."""
    names = list(LOOPBACK_NAMES)
    if listen_host in ("", "0.0.0.0", "::"):
        names.append(socket.gethostname())
    else:
        names.append(listen_host)
    names.append(urlsplit(public_url).hostname or "")
    names.extend(extra)
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.strip().lower(), None)
    return [name for name in seen if name]


@dataclass(frozen=True)
class Identity:
    """Who a request is from: ``via`` is ``session``, ``token``, ``open`` (no user exists yet
    on a loopback collector) or ``off`` (``--insecure-no-auth``)."""

    via: str
    user: Optional[str] = None
    session: Optional[str] = None  # the session id (raw, from the cookie), for CSRF tokens


class LoginThrottle:
    """Failed logins in a sliding window, per client address and per user name.

    Past the limit, attempts are refused before any password is hashed until the oldest
    failure leaves the window. Memory is bounded: at most ``max_keys`` keys are tracked (the
    least recently failed are forgotten first), each with at most its limit of timestamps.
    """

    def __init__(
        self,
        *,
        per_address: int = 20,
        per_user: int = 10,
        window: float = 600.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_address = per_address
        self.per_user = per_user
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def _keys(self, address: str, user: str) -> list[tuple[str, int]]:
        return [(f"a:{address}", self.per_address), (f"u:{user}", self.per_user)]

    def retry_after(self, address: str, user: str) -> float:
        """Seconds until an attempt is allowed again; 0 when it is allowed now."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key, limit in self._keys(address, user):
                failures = self._failures.get(key)
                if failures is not None and len(failures) >= limit:
                    wait = max(wait, failures[0] + self.window - now)
        return max(0.0, wait)

    def failed(self, address: str, user: str) -> bool:
        """Count a failure; True when this one reached a limit (worth one log line)."""
        now = self._clock()
        reached = False
        with self._lock:
            for key, limit in self._keys(address, user):
                failures = self._failures.pop(key, None)
                if failures is None:
                    failures = collections.deque(maxlen=limit)
                while failures and failures[0] + self.window <= now:
                    failures.popleft()
                failures.append(now)
                reached = reached or len(failures) == limit
                self._failures[key] = failures  # most recent last
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        return reached

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._failures.pop(f"u:{user}", None)


@dataclass
class AuthPolicy:
    """How the collector decides who may read.

    Args:
        storage: where users, sessions and tokens are.
        mode: ``auto`` (a login once a user exists; open until then, which only a loopback
            collector allows), ``required`` (always a login) or ``off`` (no login at all).
        hosts: the names ``Host`` may carry (see :func:`allowed_hosts`; ``*`` allows any).
        public_url: the collector's URL as clients see it; ``https`` makes cookies ``Secure``.
        metrics_public: ``/metrics`` needs no login.
    """

    storage: Store
    mode: str = "auto"
    hosts: Sequence[str] = LOOPBACK_NAMES
    public_url: str = DEFAULT_PUBLIC_URL
    metrics_public: bool = False
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    _secret: Optional[bytes] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in LOGIN_MODES:
            raise ValueError(f"login mode must be one of {', '.join(LOGIN_MODES)}")
        self._any_host = "*" in self.hosts
        self._hosts = {_split_host(h) for h in self.hosts if h != "*"}
        split = urlsplit(self.public_url)
        self._public_origin = f"{split.scheme}://{split.netloc}".lower()
        self.secure_cookies = split.scheme == "https"
        self._hashing = threading.BoundedSemaphore(HASHING_SLOTS)

    # --- Host and Origin ---------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        """``Host`` names an allowed host (an entry without a port allows any port)."""
        if self._any_host:
            return True
        name, port = _split_host(host)
        return (name, None) in self._hosts or (port is not None and (name, port) in self._hosts)

    def same_origin(self, origin: Optional[str], host: str) -> bool:
        """A state-changing request's ``Origin`` (when a browser sent one) is this collector."""
        if origin is None:
            return True  # not a browser: the CSRF token still has to be right
        origin = origin.strip().lower()
        if origin == self._public_origin:
            return True
        split = urlsplit(origin)
        return split.scheme in ("http", "https") and split.netloc == host.strip().lower()

    # --- identities --------------------------------------------------------------------

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = self.storage.auth_secret()
        return self._secret

    def csrf_token(self, seed: str) -> str:
        """The CSRF token of a session (or of a login form's cookie): an HMAC of it."""
        return hmac.new(self.secret, b"csrf\0" + seed.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, seed: Optional[str], token: Optional[str]) -> bool:
        if not seed or not token:
            return False
        return hmac.compare_digest(self.csrf_token(seed), token)

    def identify(self, headers: Headers) -> tuple[Optional[Identity], bool]:
        """(who this is, whether a login is needed). Blocking: reads the database."""
        if self.mode == "off":
            return Identity("off"), False
        authorization = headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            name = self.storage.token_name(hash_secret(credentials.strip()))
            return (None if name is None else Identity("token", user=name)), True
        session = cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE)
        if session:
            user = self.storage.session_user(hash_secret(session))
            if user is not None:
                return Identity("session", user=user, session=session), True
        if self.mode == "auto" and not self.storage.has_users():
            return Identity("open"), False
        return None, True

    def verify_password(self, name: str, password: str) -> bool:
        """Check a login (as long for unknown users); upgrades hashes made weaker than now."""
        if len(password) > MAX_PASSWORD:
            return False
        stored = self.storage.password_hash(name)
        with self._hashing:
            ok = _verify_password(password, stored or DUMMY_HASH) and stored is not None
            if ok and stored is not None and needs_rehash(stored):
                self.storage.set_password(name, hash_password(password), end_sessions=False)
        return ok

    def start_session(self, user: str, replacing: Optional[str] = None) -> str:
        """A fresh session id at every login (no session fixation); ``replacing`` ends."""
        if replacing:
            self.storage.end_session(hash_secret(replacing))
        session = secrets.token_urlsafe(32)
        self.storage.create_session(hash_secret(session), user, time.time() + SESSION_SECONDS)
        return session

    def cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            httponly=True,
            samesite="lax",
            secure=self.secure_cookies,
        )


def _refuse(status: int, detail: str, headers: Optional[dict[str, str]] = None) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


_API_PREFIXES = ("/api/", "/metrics")


class AuthMiddleware:
    """Checks ``Host`` and ``Origin``, then asks for a session or a token.

    Ingestion never gets here (the collector's app routes it first); ``/health`` passes
    untouched.
    """

    def __init__(self, app: ASGIApp, policy: AuthPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        policy = self.policy
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not policy.host_allowed(host):
            # DNS rebinding: a page on evil.example whose name now points here would read us.
            detail = f"Host {host[:100]!r} is not allowed (see --allowed-host)"
            await PlainTextResponse(detail, status_code=400)(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS and not policy.same_origin(
            headers.get("origin"), host
        ):
            await _refuse(403, "cross-origin request refused")(scope, receive, send)
            return
        if path == "/metrics" and policy.metrics_public:
            await self.app(scope, receive, send)
            return
        identity, required = await run_in_threadpool(policy.identify, headers)
        if identity is None and required and path not in LOGIN_PATHS:
            await self._ask_for_login(scope, headers)(scope, receive, send)
            return
        scope["selfreport.identity"] = identity
        await self.app(scope, receive, send)

    def _ask_for_login(self, scope: Scope, headers: Headers) -> Response:
        path: str = scope["path"]
        wants_json = "json" in headers.get("accept", "") and "html" not in headers.get("accept", "")
        if path.startswith(_API_PREFIXES) or wants_json or scope["method"] not in SAFE_METHODS:
            return _refuse(
                401,
                "log in, or send an API token: Authorization: Bearer TOKEN",
                {"WWW-Authenticate": 'Bearer realm="selfreport"'},
            )
        query = scope.get("query_string", b"").decode("latin-1")
        wanted = path + ("?" + query if query else "")
        return RedirectResponse(f"/login?next={quote(wanted, safe='')}", status_code=303)


# --- the login page -------------------------------------------------------------------------


def page_context(request: Request) -> dict[str, object]:
    """What every page shows about the login: who, the logout form's token, a banner."""
    identity = identity_of(request)
    collector: Collector = request.app.state.collector
    policy = collector.auth
    if identity is None or policy is None:
        return {"auth_user": None, "logout_csrf": None, "auth_banner": None}
    return {
        "auth_user": identity.user,
        "logout_csrf": None if identity.session is None else policy.csrf_token(identity.session),
        "auth_banner": identity.via if identity.via in ("open", "off") else None,
    }


def _policy(request: Request) -> AuthPolicy:
    collector: Collector = request.app.state.collector
    assert collector.auth is not None
    return collector.auth


def identity_of(request: Request) -> Optional[Identity]:
    identity: Optional[Identity] = request.scope.get("selfreport.identity")
    return identity


def _next(value: Optional[str]) -> str:
    """Only a path on this collector: never ``//evil.example`` or ``https://...``."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    return value


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


def _login_page(
    request: Request, *, status: int = 200, error: str = "", name: str = "", seed: str = ""
) -> Response:
    from .web import render

    policy = _policy(request)
    seed = seed or secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        status,
        csrf=policy.csrf_token(seed),
        next=_next(request.query_params.get("next")),
        error=error,
        name=name,
        has_users=policy.mode != "auto" or policy.storage.has_users(),
    )
    response.headers["Cache-Control"] = "no-store"
    policy.cookie(response, LOGIN_COOKIE, seed, LOGIN_FORM_SECONDS)
    return response


async def _form(request: Request) -> Optional[dict[str, str]]:
    """A small urlencoded form (None if it is not one or is too big)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return None
    return {key: values[0] for key, values in fields.items()}


async def login_page(request: Request) -> Response:
    return await run_in_threadpool(_login_page, request)


async def login(request: Request) -> Response:
    policy = _policy(request)
    form = await _form(request)
    if form is None:
        return _refuse(400, "expected a form (application/x-www-form-urlencoded)")
    seed = request.cookies.get(LOGIN_COOKIE)
    if not policy.csrf_ok(seed, form.get("csrf")):
        return await run_in_threadpool(
            lambda: _login_page(request, status=403, error="The form expired: please log in again.")
        )
    name = form.get("name", "")[:64]
    password = form.get("password", "")
    address = _client(request)
    wait = policy.throttle.retry_after(address, name)
    if wait > 0:
        response = await run_in_threadpool(
            lambda: _login_page(
                request,
                status=429,
                error="Too many failed logins: try again later.",
                name=name,
                seed=seed or "",
            )
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    if not await run_in_threadpool(policy.verify_password, name, password):
        if policy.throttle.failed(address, name):
            with reporting_path():
                logger.warning("too many failed logins for %r or from %s: throttled", name, address)
        with reporting_path():
            logger.warning("failed login for %r from %s", name, address)
        return await run_in_threadpool(
            lambda: _login_page(
                request, status=401, error="Wrong name or password.", name=name, seed=seed or ""
            )
        )
    policy.throttle.succeeded(name)
    session = await run_in_threadpool(
        policy.start_session, name, request.cookies.get(SESSION_COOKIE)
    )
    with reporting_path():
        logger.info("%r logged in from %s", name, address)
    response = RedirectResponse(_next(form.get("next")), status_code=303)
    policy.cookie(response, SESSION_COOKIE, session, SESSION_SECONDS)
    policy.cookie(response, LOGIN_COOKIE, "", 0)
    return response


async def logout(request: Request) -> Response:
    policy = _policy(request)
    form = await _form(request)
    identity = identity_of(request)
    if identity is None or identity.session is None:
        return RedirectResponse("/login", status_code=303)
    if form is None or not policy.csrf_ok(identity.session, form.get("csrf")):
        return _refuse(403, "missing or wrong CSRF token")
    await run_in_threadpool(policy.storage.end_session, hash_secret(identity.session))
    response = RedirectResponse("/login", status_code=303)
    policy.cookie(response, SESSION_COOKIE, "", 0)
    return response


def routes() -> list[Route]:
    return [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
