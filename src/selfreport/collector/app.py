"""The collector's Starlette app: ingestion, health, metrics, JSON API and web pages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Union

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfreport._client import STAT_KEYS, Client
from selfreport._core.dsn import Dsn, parse_dsn
from selfreport._state import current_client
from selfreport.collector import auth as _auth
from selfreport.collector import web
from selfreport.integrations.asgi import SelfreportMiddleware

from .alerting.engine import AlertEngine
from .alerting.monitors import evaluate_monitors
from .alerting.uptime import UptimeProber
from .health import HealthChecks, default_checks, upstream_reachable
from .ingest import DEFAULT_MAX_BODY, IngestEndpoint, KeyCache, OnStored, Processor
from .limits import LogThrottle
from .metrics import CONTENT_TYPE, CollectorMetrics
from .store import Project, Store

if TYPE_CHECKING:
    from .alerting.config import CollectorConfig

__all__ = ["Collector", "CollectorApp", "add_alerts", "create_app"]

logger = logging.getLogger("selfreport.collector")


@dataclass
class Collector:
    """Everything the app's endpoints share; ``app.state.collector``.

    ``on_stored`` is where forwarding plugs in: each hook is called with a
    :class:`~selfreport.collector.ingest.StoredEnvelope` after its events were committed (in the
    request's task, so inside the reporting path for the collector's own reports). Hooks must
    not block: queue the work. ``health`` takes more checks (``health.add(name, check)``).
    """

    storage: Store
    metrics: CollectorMetrics
    health: HealthChecks
    keys: KeyCache
    reporter: Optional[Client] = None
    processors: list[Processor] = field(default_factory=list)
    on_stored: list[OnStored] = field(default_factory=list)
    internal_project: Optional[Project] = None
    # Who may read (pages, the JSON API, /metrics) and the URL DSNs are built from.
    auth: Optional[_auth.AuthPolicy] = None
    public_url: str = _auth.DEFAULT_PUBLIC_URL
    # Forwarding's counters (Forwarder.stats) for /metrics and /status, when forwarding.
    forwarding: Optional[Callable[[], dict[str, int]]] = None
    # The alert engine, when alert rules are configured.
    alerts: Optional[AlertEngine] = None
    # Alerting's configuration (`serve --config`, create_app's `config`): notifiers, rules,
    # uptime checks, as alerting.config.load_config read them.
    config: Optional[CollectorConfig] = None
    # Uptime probes: started and stopped with the app (its lifespan); on
    # the Monitors page, and ``uptime.status()`` for alerts.
    uptime: Optional[UptimeProber] = None

    def __post_init__(self) -> None:
        self.metrics.reporter_stats = self.reporter_stats
        self.metrics.forward_stats = self.forwarding_stats
        self.metrics.alert_stats = self.alerting_stats

    def reporter_stats(self) -> dict[str, int]:
        """The self-reporter's ``stats()`` (the given client's, else the global one's)."""
        client = current_client(self.reporter)
        return client.stats() if client is not None else dict.fromkeys(STAT_KEYS, 0)

    def forwarding_stats(self) -> Optional[dict[str, int]]:
        """Forwarding's counters, or None when the collector does not forward."""
        return None if self.forwarding is None else self.forwarding()

    def alerting_stats(self) -> Optional[dict[str, Any]]:
        """The alert engine's counters and failing notifiers, or None without alerts."""
        if self.alerts is None:
            return None
        return {**self.alerts.stats(), "failing": self.alerts.failing_notifiers()}


def create_app(
    storage: Store,
    *,
    reporter: Optional[Client] = None,
    processors: Sequence[Processor] = (),
    max_body: int = DEFAULT_MAX_BODY,
    upstream: Union[str, Dsn, None] = None,
    min_free_bytes: int = 100 * 2**20,
    close_storage: bool = False,
    login: str = "auto",
    public_url: Optional[str] = None,
    allowed_hosts: Optional[Sequence[str]] = None,
    metrics_public: bool = False,
    config: Optional[CollectorConfig] = None,
) -> CollectorApp:
    """Build the collector app on ``storage`` (whose writer thread it starts).

    Args:
        storage: the database.
        reporter: the collector's self-reporter (a client sending to the internal project);
            default: whatever global client :func:`selfreport.init` made. Requests carrying its
            reports are ingested inside the reporting path.
        processors: ``processor(event, project) -> event | None`` run on every event before it
            is stored (enrichment, filtering); one that raises fails the request with a 500,
            which is reported (once) to the internal project.
        max_body: the largest request body accepted, compressed or decompressed (bytes).
        upstream: when forwarding to an upstream DSN, ``/health`` checks it is reachable.
        min_free_bytes: ``/health`` fails below this much free disk space.
        close_storage: close ``storage`` when the app shuts down.
        login: ``auto`` (pages, the JSON API and ``/metrics`` need a login once a user
            exists), ``required`` or ``off``; ingestion and ``/health`` never do.
        public_url: the collector's URL as clients reach it: DSNs on pages are built from it
            (never from the request), and ``https`` makes cookies ``Secure``.
        allowed_hosts: the names a request's ``Host`` may carry (except for ingestion and
            ``/health``); default: loopback names and the public URL's host.
        metrics_public: ``/metrics`` needs no login.
    """
    storage.start()
    public_url = _auth.check_public_url(public_url or _auth.DEFAULT_PUBLIC_URL)
    policy = _policy(storage, login, public_url, allowed_hosts, metrics_public)
    keys = KeyCache(storage)
    keys.load()
    collector = Collector(
        storage=storage,
        metrics=CollectorMetrics(storage),
        health=_health_checks(storage, upstream, min_free_bytes),
        keys=keys,
        reporter=reporter,
        processors=list(processors),
        internal_project=next((p for p in storage.projects() if p.internal), None),
        auth=policy,
        public_url=public_url,
        config=config,
    )
    return CollectorApp(
        _site(collector, policy, close_storage),
        _ingest_endpoint(collector, "envelope", max_body),
        _ingest_endpoint(collector, "store", max_body),
        reporter,
    )


def _policy(
    storage: Store,
    login: str,
    public_url: str,
    allowed_hosts: Optional[Sequence[str]],
    metrics_public: bool,
) -> _auth.AuthPolicy:
    hosts = _auth.allowed_hosts("127.0.0.1", public_url) if allowed_hosts is None else allowed_hosts
    policy = _auth.AuthPolicy(
        storage, mode=login, hosts=hosts, public_url=public_url, metrics_public=metrics_public
    )
    policy.secret  # noqa: B018 - made now, not in the first request on the event loop
    return policy


def _health_checks(
    storage: Store, upstream: Union[str, Dsn, None], min_free_bytes: int
) -> HealthChecks:
    extra = []
    if upstream is not None:
        dsn = upstream if isinstance(upstream, Dsn) else parse_dsn(upstream)
        extra.append(("upstream_reachable", upstream_reachable(dsn)))
    return default_checks(storage, min_free_bytes=min_free_bytes, extra=extra)


# --- alerts ----------------------------------------------------------------------------------

# The health checks (one of which writes to the database) run for alert rules this often at most.
HEALTH_EVERY = 5.0


def add_alerts(app: CollectorApp, engine: AlertEngine) -> None:
    """Give ``app`` (before it starts) the alert engine: it gets every stored envelope, reads
    health, the self-reporter and forwarding, and is started and closed with the app."""
    collector = app.collector
    collector.alerts = engine
    collector.on_stored.append(engine.on_stored)
    engine.sources.reporter_stats = collector.reporter_stats
    engine.sources.forwarding_stats = collector.forwarding_stats
    engine.sources.ingest_p99_ms = lambda: collector.metrics.latency_percentiles()["stored"][
        "p99_ms"
    ]
    engine.sources.monitors = lambda now: evaluate_monitors(collector.storage.monitors(), now)


def _health_source(
    health: HealthChecks, loop: asyncio.AbstractEventLoop
) -> Callable[[], Mapping[str, tuple[bool, str]]]:
    """The checks behind /health, run on the app's loop from the engine's thread, at most
    every HEALTH_EVERY seconds (the results in between are the last ones)."""
    last: dict[str, tuple[bool, str]] = {}
    ran = [float("-inf")]

    def results() -> Mapping[str, tuple[bool, str]]:
        if time.monotonic() - ran[0] >= HEALTH_EVERY:
            future = asyncio.run_coroutine_threadsafe(health.run(), loop)
            _, checks = future.result(health.timeout + 5.0)
            last.clear()
            last.update({name: (c["ok"], str(c["detail"])) for name, c in checks.items()})
            ran[0] = time.monotonic()
        return dict(last)

    return results


def _ingest_endpoint(collector: Collector, kind: str, max_body: int) -> IngestEndpoint:
    return IngestEndpoint(
        collector.storage,
        collector.metrics,
        kind=kind,
        max_body=max_body,
        processors=collector.processors,
        on_stored=collector.on_stored,
        keys=collector.keys,
    )


def _site(collector: Collector, policy: _auth.AuthPolicy, close_storage: bool) -> Starlette:
    """Starlette, for everything but ingestion: health, metrics, logins, pages, the JSON API."""
    storage = collector.storage

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        uptime = collector.uptime
        if uptime is not None:
            uptime.start()
        if collector.alerts is not None:
            collector.alerts.sources.health = _health_source(collector.health, loop)
            if uptime is not None:
                collector.alerts.sources.uptime = uptime.status
            collector.alerts.start()
        try:
            yield
        finally:
            if collector.alerts is not None:  # in a thread: its last tick may need this loop
                await loop.run_in_executor(None, collector.alerts.close)
            if uptime is not None:
                uptime.close(timeout=2.0)
            if close_storage:
                storage.close()

    site = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *_auth.routes(),
            *web.routes(),
        ],
        middleware=[
            Middleware(SelfreportMiddleware, client=collector.reporter),
            Middleware(_auth.AuthMiddleware, policy=policy),
        ],
        exception_handlers={Exception: _internal_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    site.router.redirect_slashes = False
    site.state.collector = collector
    return site


# /api/{project_id}/envelope/ and /api/{project_id}/store/, trailing slash optional
_INGEST_PATH = re.compile(r"^/api/([^/]+)/(envelope|store)/?$")


class CollectorApp:
    """The collector's ASGI app. Ingestion, the hot path, goes straight to its endpoint (in the
    self-reporting middleware, behind a last-resort 500); everything else goes to Starlette."""

    def __init__(
        self,
        site: Starlette,
        envelope: IngestEndpoint,
        store: IngestEndpoint,
        reporter: Optional[Client],
    ) -> None:
        self.site = site
        self.state = site.state
        self._ingest = {
            "envelope": SelfreportMiddleware(envelope, client=reporter),
            "store": SelfreportMiddleware(store, client=reporter),
        }
        # What Starlette's router would put in the scope: reports of failures name the route.
        # Whatever requests make fail, and whoever sends them: one log line a second at most.
        self._errors = LogThrottle()
        self._routes = {
            "envelope": _IngestRoute("/api/{project_id}/envelope/", envelope),
            "store": _IngestRoute("/api/{project_id}/store/", store),
        }

    @property
    def collector(self) -> Collector:
        collector: Collector = self.state.collector
        return collector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = _INGEST_PATH.match(scope["path"])
            if match is not None:
                kind = match.group(2)
                route = self._routes[kind]
                scope["path_params"] = {"project_id": match.group(1)}
                scope["route"], scope["endpoint"] = route, route.endpoint
                await _answer_500_on_error(self._ingest[kind], scope, receive, send, self._errors)
                return
        await _answer_500_on_error(self.site, scope, receive, send, self._errors)


class _IngestRoute(NamedTuple):
    path: str
    endpoint: IngestEndpoint


async def _answer_500_on_error(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, errors: LogThrottle
) -> None:
    """Like Starlette's ServerErrorMiddleware: a 500 if nothing was sent yet; then one log line
    a second at most (the middleware inside has reported the error with its traceback)."""
    started = False

    async def tracking_send(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except Exception:
        if not started:
            body = json.dumps({"detail": _INTERNAL_ERROR}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        error = sys.exc_info()[1]
        errors.log(
            logger,
            logging.ERROR,
            "%s %s failed: %s",
            scope.get("method", ""),
            str(scope.get("path", ""))[:200],
            _describe(error),
        )


def _describe(error: Optional[BaseException]) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:299] + "\u2026"


def collector_of(request: Request) -> Collector:
    collector: Collector = request.app.state.collector
    return collector


async def health(request: Request) -> Response:
    ok, checks = await collector_of(request).health.run()
    return JSONResponse(
        {"status": "ok" if ok else "fail", "checks": checks},
        status_code=200 if ok else 503,
        headers={"Cache-Control": "no-store"},
    )


async def metrics(request: Request) -> Response:
    body = collector_of(request).metrics.render()
    return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})


_INTERNAL_ERROR = "internal error (the collector reports its own errors to its internal project)"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Refusals (400 for a bad parameter, 404, 405) with their message: JSON for the API."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )
    return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    if request.url.path.startswith("/api/") or "json" in request.headers.get("accept", ""):
        return JSONResponse({"detail": _INTERNAL_ERROR}, status_code=500)
    page = f"<!doctype html><title>500</title><h1>Internal error</h1><p>{_INTERNAL_ERROR}</p>"
    return HTMLResponse(page, status_code=500)
