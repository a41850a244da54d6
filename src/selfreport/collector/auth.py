"""Who may read: the Host check, sessions and API tokens, CSRF and Origin checks, the login page."""

from __future__ import annotations

import asyncio
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

from selfreport._core.guard import reporting_path

from .accounts import DUMMY_HASH, MAX_PASSWORD, hash_password, hash_secret, needs_rehash
from .accounts import verify_password as _verify_password
from .limits import LogThrottle
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
# How many more logins may wait for a slot (on the event loop, not in a worker thread);
# beyond that a login gets 503 at once (each one waiting is an attempt its throttle counted).
HASHING_QUEUE = 64
_DEFAULT_PORTS = {"http": 80, "https": 443}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, lowercase and without the scheme's default port
    (which browsers never put in ``Origin``); ``""`` when it has none or a bad port."""
    split = urlsplit(url.strip())
    try:
        port = split.port
    except ValueError:
        return ""
    scheme = split.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not split.hostname:
        return ""
    netloc = split.netloc.rpartition("@")[2].lower()
    if port is not None and port == _DEFAULT_PORTS[scheme]:
        netloc = netloc.rpartition(":")[0]
    return f"{scheme}://{netloc}"


def check_public_url(url: str) -> str:
    """``url`` without its trailing slash nor the scheme's default port (``:443`` on https);
    ValueError unless it is ``http(s)://host[:port]...``."""
    split = urlsplit(url.strip())
    origin = _origin(url)
    if not origin:
        raise ValueError(f"must be http://HOST[:PORT] or https://..., not {url!r}")
    if split.query or split.fragment or split.username or split.password is not None:
        raise ValueError(f"cannot have a query, fragment or user: {url!r}")
    return (origin + split.path).rstrip("/")


def _split_host(value: str) -> tuple[str, Optional[str]]:
    """``name``, ``name:port``, ``[v6]``, ``[v6]:port`` -> (lowercase name, port or None).

    ValueError when what follows the name is not a port (``localhost:80@evil.example``).
    """
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"not a host: {value[:100]!r}")
        port: Optional[str] = rest[1:]
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
        name = name.rstrip(".")
    else:
        return value.rstrip("."), None  # a bare IPv6 address (in --allowed-host) or a name
    if port and not (port.isascii() and port.isdigit()):
        raise ValueError(f"not a port: {port[:100]!r}")
    return name, port or None


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


@dataclass(eq=False)
class LoginThrottle:
    """Failed logins in a sliding window, per client address and per user name.

    An attempt is counted as a failure the moment it is let through (:meth:`reserve`), before
    its password is hashed, so concurrent attempts cannot all pass a check made before any
    of them failed; a success takes it back. Past the limit, attempts are refused without
    hashing anything until the oldest failure leaves the window. Memory is bounded: at most
    ``max_keys`` keys are tracked (the least recently failed are forgotten first), each with
    at most its limit of timestamps.
    """

    per_address: int = 20
    per_user: int = 10
    window: float = 600.0
    max_keys: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _failures: collections.OrderedDict[str, collections.deque[float]] = field(
        default_factory=collections.OrderedDict, init=False, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _keys(self, address: str, user: str) -> list[tuple[str, int]]:
        return [(f"a:{address}", self.per_address), (f"u:{user}", self.per_user)]

    def reserve(self, address: str, user: str) -> float:
        """Let an attempt through and count it as failed (0), or refuse it: the seconds until
        one is allowed again (and nothing is counted)."""
        now = self.clock()
        with self._lock:
            keys = self._keys(address, user)
            wait = 0.0
            for key, limit in keys:
                failures = self._failures.get(key)
                if failures is None:
                    continue
                while failures and failures[0] + self.window <= now:
                    failures.popleft()
                if len(failures) >= limit:
                    wait = max(wait, failures[0] + self.window - now)
            if wait > 0:
                return wait
            for key, limit in keys:
                failures = self._failures.pop(key, None)
                if failures is None:
                    failures = collections.deque(maxlen=limit)
                failures.append(now)
                self._failures[key] = failures  # most recent last
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        return 0.0

    def release(self, address: str, user: str) -> None:
        """Take back a reserved attempt that was never tried (its password was not hashed)."""
        with self._lock:
            for key, _ in self._keys(address, user):
                failures = self._failures.get(key)
                if failures:
                    failures.pop()

    def succeeded(self, address: str, user: str) -> None:
        """A reserved attempt logged in: the user's failures are forgotten, and the address
        gets this attempt back."""
        with self._lock:
            self._failures.pop(f"u:{user}", None)
            failures = self._failures.get(f"a:{address}")
            if failures:
                failures.pop()


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
    # Failed logins are a line any stranger can cause: at most one a second (and a count).
    failures_log: LogThrottle = field(default_factory=LogThrottle)
    _secret: Optional[bytes] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in LOGIN_MODES:
            raise ValueError(f"login mode must be one of {', '.join(LOGIN_MODES)}")
        self._any_host = "*" in self.hosts
        self._hosts = set()
        for host in self.hosts:
            if host != "*":
                try:
                    self._hosts.add(_split_host(host))
                except ValueError as exc:
                    raise ValueError(f"bad allowed host {host!r}: {exc}") from None
        self._public_origin = _origin(self.public_url)
        self.secure_cookies = urlsplit(self.public_url).scheme == "https"
        # Made on the event loop at first use (on 3.9 a semaphore binds to a loop when made).
        self._hashing: Optional[asyncio.Semaphore] = None
        self._hashing_waiters = 0
        self.password_checks = 0  # passwords hashed to check a login (a test counts them)

    # --- Host and Origin ---------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        """``Host`` names an allowed host (an entry without a port allows any port)."""
        if self._any_host:
            return True
        try:
            name, port = _split_host(host)
        except ValueError:
            return False
        return (name, None) in self._hosts or (port is not None and (name, port) in self._hosts)

    def same_origin(self, origin: Optional[str], host: str) -> bool:
        """A state-changing request's ``Origin`` (when a browser sent one) is this collector."""
        if origin is None:
            return True  # not a browser: the CSRF token still has to be right
        origin = _origin(origin)
        if not origin:
            return False
        if origin == self._public_origin:
            return True
        # Directly, not through the proxy: Host is what the browser put in the URL (a
        # default port in one and not the other is still the same origin).
        return origin == _origin(f"{urlsplit(origin).scheme}://{host.strip()}")

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
        """Check a login (as long for unknown users); upgrades hashes made weaker than now.
        Blocking: hashes; see :meth:`check_password` for the bound on how many at once."""
        if len(password) > MAX_PASSWORD:
            return False
        stored = self.storage.password_hash(name)
        ok = _verify_password(password, stored or DUMMY_HASH) and stored is not None
        if ok and stored is not None and needs_rehash(stored):
            self.storage.set_password(name, hash_password(password), end_sessions=False)
        return ok

    async def check_password(self, name: str, password: str) -> Optional[bool]:
        """:meth:`verify_password` in a worker thread, at most ``HASHING_SLOTS`` at once.

        Logins wait for a slot on the event loop, never in a worker thread: those serve every
        page's :meth:`identify`, and a login flood must not take them all. None when
        ``HASHING_QUEUE`` logins are waiting already (the collector is busy: try later).
        """
        if self._hashing is None:
            self._hashing = asyncio.Semaphore(HASHING_SLOTS)
        if self._hashing_waiters >= HASHING_QUEUE:
            return None
        self._hashing_waiters += 1
        try:
            await self._hashing.acquire()
        finally:
            self._hashing_waiters -= 1
        try:
            if len(password) <= MAX_PASSWORD:
                self.password_checks += 1
            return await run_in_threadpool(self.verify_password, name, password)
        finally:
            self._hashing.release()

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


async def _retry_later(
    request: Request, status: int, error: str, wait: float, name: str, seed: Optional[str]
) -> Response:
    response = await run_in_threadpool(
        lambda: _login_page(request, status=status, error=error, name=name, seed=seed or "")
    )
    response.headers["Retry-After"] = str(int(wait) + 1)
    return response


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
    wait = policy.throttle.reserve(address, name)
    if wait > 0:
        policy.failures_log.log(
            logger,
            logging.WARNING,
            "too many failed logins for %r or from %s: throttled",
            name,
            address,
        )
        return await _retry_later(
            request, 429, "Too many failed logins: try again later.", wait, name, seed
        )
    ok = await policy.check_password(name, password)
    if ok is None:
        policy.throttle.release(address, name)
        return await _retry_later(
            request, 503, "Too many logins at once: try again shortly.", 1, name, seed
        )
    if not ok:
        policy.failures_log.log(
            logger, logging.WARNING, "failed login for %r from %s", name, address
        )
        return await run_in_threadpool(
            lambda: _login_page(
                request, status=401, error="Wrong name or password.", name=name, seed=seed or ""
            )
        )
    policy.throttle.succeeded(address, name)
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
