"""Server-rendered pages and the read-only JSON API; every value from an event is escaped."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import jinja2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .alerting.monitors import CheckIn, MonitorStatus, evaluate_monitors
from .alerting.uptime import UptimeStatus
from .auth import page_context
from .events import LEVELS, exception_values, frames_of, parse_id
from .store import Event, Issue, Project

if TYPE_CHECKING:
    from .app import Collector

__all__ = ["MAX_LIMIT", "event_view", "render", "routes"]

PAGE_SIZE = 50
# The most events one API response carries; they are streamed one at a time, never all loaded.
MAX_LIMIT = 100
_MAX_PAGE = 1_000_000
_MAX_ID = 10**18 - 1

# Defence in depth: the templates escape everything, and the pages need no script at all.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    # Nothing leaves for other sites; same-origin keeps the Origin header on the pages' own
    # forms (with no-referrer, browsers send "Origin: null", which is refused as foreign).
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
    autoescape=True,  # every {{ }} is HTML-escaped, in text and in quoted attributes
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago" if seconds >= 5 else "just now"


def _show(value: object) -> str:
    """Any JSON value as text (the template escapes it)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


_environment.filters.update(when=_when, ago=_ago, show=_show)


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    page = _environment.get_template(template).render(
        request_path=request.url.path, levels=LEVELS, **{**page_context(request), **context}
    )
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def _collector(request: Request) -> Collector:
    collector: Collector = request.app.state.collector
    return collector


def _query_int(request: Request, name: str, default: Optional[int], maximum: int) -> Optional[int]:
    """A whole-number query parameter from 1 to ``maximum``; anything else is a 400."""
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    value = parse_id(raw)
    if value is None or not 1 <= value <= maximum:
        raise HTTPException(400, f"{name} must be a whole number from 1 to {maximum}")
    return value


def _path_id(request: Request, name: str) -> Optional[int]:
    return parse_id(str(request.path_params.get(name, "")))


def _base_url(request: Request) -> str:
    """Where DSNs point: the configured public URL, never the request's Host (which a DNS
    rebinding page or a misconfigured proxy chooses)."""
    return _collector(request).public_url


# --- turning a stored event into what the issue page shows --------------------------------


def _pairs(value: object) -> list[tuple[str, str]]:
    """Tags and similar: a dict, or a list of [key, value] pairs, as text pairs."""
    if isinstance(value, dict):
        return [(str(k), _show(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [
            (_show(p[0]), _show(p[1]))
            for p in value
            if isinstance(p, (list, tuple)) and len(p) == 2
        ]
    return []


def _frame_view(frame: dict[str, Any]) -> dict[str, Any]:
    lineno = frame.get("lineno")
    lineno = lineno if isinstance(lineno, int) and not isinstance(lineno, bool) else None
    lines: list[tuple[Optional[int], str, bool]] = []
    pre = frame.get("pre_context")
    post = frame.get("post_context")
    current = frame.get("context_line")
    if isinstance(current, str):
        pre_lines = [_show(x) for x in pre] if isinstance(pre, list) else []
        post_lines = [_show(x) for x in post] if isinstance(post, list) else []
        start = lineno - len(pre_lines) if lineno is not None else None
        for offset, text in enumerate([*pre_lines, current, *post_lines]):
            number = start + offset if start is not None else None
            lines.append((number, text, offset == len(pre_lines)))
    variables = frame.get("vars")
    return {
        "where": _show(
            frame.get("filename") or frame.get("abs_path") or frame.get("module") or "?"
        ),
        "function": _show(frame.get("function") or "?"),
        "lineno": lineno,
        "in_app": frame.get("in_app") is True,
        "lines": lines,
        "vars": _pairs(variables) if isinstance(variables, dict) else [],
    }


def event_view(payload: str) -> dict[str, Any]:
    """The parts of an event the issue page shows, as plain text values (escaped on output)."""
    try:
        event = json.loads(payload)
    except ValueError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    message = event.get("logentry") or event.get("message")
    if isinstance(message, dict):
        message = message.get("formatted") or message.get("message")
    extra = event.get("extra")
    extra = extra if isinstance(extra, dict) else {}
    request = event.get("request")
    if not isinstance(request, dict):  # selfreport's middleware puts it in extra
        request = extra.get("request")
        request = request if isinstance(request, dict) else None
    contexts = event.get("contexts")
    return {
        "message": _show(message) if message else "",
        # the most recent first, as Sentry shows them
        "exceptions": [_exception_view(value) for value in reversed(exception_values(event))],
        "tags": _pairs(event.get("tags")),
        "breadcrumbs": _breadcrumbs_view(event.get("breadcrumbs")),
        "request": _pairs(request) if request else [],
        "request_headers": _pairs(request.get("headers")) if request else [],
        "user": _pairs(event.get("user")),
        "contexts": [
            (str(name), _pairs(ctx)) for name, ctx in contexts.items() if isinstance(ctx, dict)
        ]
        if isinstance(contexts, dict)
        else [],
        "extra": _pairs(extra),
        "sdk": _pairs(event.get("sdk")),
        "logger": _show(event.get("logger") or ""),
        "platform": _show(event.get("platform") or ""),
        "server_name": _show(event.get("server_name") or ""),
        "raw": json.dumps(event, indent=2, ensure_ascii=False, sort_keys=True),
    }


def _exception_view(value: dict[str, Any]) -> dict[str, Any]:
    mechanism = value.get("mechanism")
    return {
        "type": _show(value.get("type") or "Error"),
        "value": _show(value.get("value") or ""),
        "module": _show(value.get("module") or ""),
        "mechanism": _pairs(mechanism) if isinstance(mechanism, dict) else [],
        # innermost frame first: where it was raised, at the top
        "frames": [_frame_view(f) for f in reversed(frames_of(value))],
    }


def _breadcrumbs_view(breadcrumbs: object) -> list[dict[str, str]]:
    if isinstance(breadcrumbs, dict):
        breadcrumbs = breadcrumbs.get("values")
    return [
        {
            "time": _show(crumb.get("timestamp", "")),
            "category": _show(crumb.get("category") or crumb.get("type") or ""),
            "level": _show(crumb.get("level") or ""),
            "message": _show(crumb.get("message") or ""),
            "data": _show(crumb["data"]) if crumb.get("data") else "",
        }
        for crumb in (breadcrumbs if isinstance(breadcrumbs, list) else [])
        if isinstance(crumb, dict)
    ]


# --- pages ----------------------------------------------------------------------------------


def _filters(request: Request) -> dict[str, Any]:
    params = request.query_params
    level = params.get("level", "")
    sort = params.get("sort", "last_seen")
    return {
        "q": params.get("q", "")[:200],
        "project": _query_int(request, "project", None, _MAX_ID),
        "level": level if level in LEVELS else "",
        "environment": params.get("environment", "")[:64],
        "sort": sort if sort in ("last_seen", "first_seen", "count") else "last_seen",
        "page": _query_int(request, "page", 1, _MAX_PAGE),
    }


def _find_issues(collector: Collector, filters: dict[str, Any]) -> list[Issue]:
    return collector.storage.issues(
        project_id=filters["project"],
        query=filters["q"],
        level=filters["level"],
        environment=filters["environment"],
        sort=filters["sort"],
        limit=PAGE_SIZE + 1,
        offset=(filters["page"] - 1) * PAGE_SIZE,
    )


def issues_page(request: Request) -> Response:
    collector = _collector(request)
    filters = _filters(request)
    found = _find_issues(collector, filters)
    query = {k: v for k, v in filters.items() if v not in (None, "") and k != "page"}
    return render(
        request,
        "issues.html",
        issues=found[:PAGE_SIZE],
        more=len(found) > PAGE_SIZE,
        filters=filters,
        query=query,
        projects=collector.storage.projects(),
        environments=collector.storage.environments(),
    )


def issue_page(request: Request) -> Response:
    collector = _collector(request)
    issue_id = _path_id(request, "issue_id")
    issue = collector.storage.issue(issue_id) if issue_id is not None else None
    if issue is None:
        return render(request, "missing.html", 404, what="issue")
    # The list needs no payloads: only the chosen event's (up to the body limit) is loaded.
    events = collector.storage.events(issue.id, limit=PAGE_SIZE, payloads=False)
    chosen_id = request.query_params.get("event") or (events[0].event_id if events else "")
    chosen: Optional[Event] = None
    if chosen_id:
        chosen = collector.storage.event(issue.project_id, chosen_id[:64])
        if chosen is not None and chosen.issue_id != issue.id:
            chosen = None
    if chosen is None and events and chosen_id != events[0].event_id:
        chosen = collector.storage.event(issue.project_id, events[0].event_id)
    return render(
        request,
        "issue.html",
        issue=issue,
        events=events,
        event=chosen,
        view=event_view(chosen.payload) if chosen is not None else None,
    )


def projects_page(request: Request) -> Response:
    collector = _collector(request)
    base = _base_url(request)
    rows = [
        (p, p.dsn(base), collector.storage.event_count(p.id)) for p in collector.storage.projects()
    ]
    return render(request, "projects.html", rows=rows)


async def status_page(request: Request) -> Response:
    data = await status_data(request)
    return render(request, "status.html", **data)


async def status_data(request: Request) -> dict[str, Any]:
    collector = _collector(request)
    healthy, checks = await collector.health.run()
    metrics = collector.metrics
    storage = collector.storage
    internal = collector.internal_project
    stats = collector.reporter_stats()
    window = metrics.window
    recent = window.average_processing()
    overall = metrics.average_processing()
    return {
        "healthy": healthy,
        "checks": checks,
        "ingest_rate": round(window.rate(), 2),
        "window_seconds": window.seconds,
        "processing_ms_recent": None if recent is None else round(recent * 1e3, 3),
        "processing_ms_overall": None if overall is None else round(overall * 1e3, 3),
        "queue": storage.queue_size,
        "queue_max": storage.max_queue,
        "database_bytes": storage.size_bytes(),
        "uptime_seconds": round(time.time() - metrics.started, 1),
        **metrics.totals(),
        "rejected": metrics.rejected_by_reason(),
        "reporter": stats,
        "forwarding": collector.forwarding_stats(),
        "internal_project": None
        if internal is None
        else {"id": internal.id, "name": internal.name},
    }


async def status_api(request: Request) -> Response:
    return JSONResponse(await status_data(request))


# --- JSON API (read-only) -------------------------------------------------------------------


def _issue_json(issue: Issue) -> dict[str, Any]:
    return {
        "id": issue.id,
        "project_id": issue.project_id,
        "project": issue.project,
        "title": issue.title,
        "culprit": issue.culprit,
        "level": issue.level,
        "environment": issue.environment,
        "release": issue.release,
        "first_seen": issue.first_seen,
        "last_seen": issue.last_seen,
        "count": issue.times_seen,
        "last_event_id": issue.last_event_id,
    }


def _event_json(event: Event) -> str:
    """An event as JSON text; its stored payload (valid JSON) is spliced in, not re-parsed."""
    fields = {
        "event_id": event.event_id,
        "project_id": event.project_id,
        "issue_id": event.issue_id,
        "received": event.received,
        "level": event.level,
        "environment": event.environment,
        "release": event.release,
    }
    return f'{json.dumps(fields)[:-1]}, "event": {event.payload}}}'


def _project_json(project: Project, base: str, count: int) -> dict[str, Any]:
    return {
        "id": project.id,
        "name": project.name,
        "internal": project.internal,
        "dsn": project.dsn(base),
        "events": count,
    }


def issues_api(request: Request) -> Response:
    filters = _filters(request)
    found = _find_issues(_collector(request), filters)
    return JSONResponse(
        {"issues": [_issue_json(i) for i in found[:PAGE_SIZE]], "more": len(found) > PAGE_SIZE}
    )


def issue_api(request: Request) -> Response:
    storage = _collector(request).storage
    issue_id = _path_id(request, "issue_id")
    issue = storage.issue(issue_id) if issue_id is not None else None
    if issue is None:
        return JSONResponse({"detail": "no such issue"}, status_code=404)
    limit = _query_int(request, "limit", PAGE_SIZE, MAX_LIMIT) or PAGE_SIZE
    listed = storage.events(issue.id, limit=limit, payloads=False)

    def stream() -> Iterator[str]:
        # One payload in memory at a time (each up to the body limit), written as it is read.
        yield f'{json.dumps(_issue_json(issue))[:-1]}, "events": ['
        separator = ""
        for item in listed:
            event = storage.event(item.project_id, item.event_id)
            if event is not None:  # else removed by retention since it was listed
                yield separator + _event_json(event)
                separator = ", "
        yield "]}"

    return StreamingResponse(stream(), media_type="application/json")


def event_api(request: Request) -> Response:
    storage = _collector(request).storage
    project_id = _path_id(request, "project_id")
    event_id = str(request.path_params.get("event_id", "")).lower()[:64]
    event = storage.event(project_id, event_id) if project_id is not None else None
    if event is None:
        return JSONResponse({"detail": "no such event"}, status_code=404)
    return Response(_event_json(event), media_type="application/json")


def projects_api(request: Request) -> Response:
    storage = _collector(request).storage
    base = _base_url(request)
    return JSONResponse(
        {
            "projects": [
                _project_json(p, base, storage.event_count(p.id)) for p in storage.projects()
            ]
        }
    )


# --- monitors: check-ins and uptime probes (issue 13, part C) ------------------------------

_RECENT_CHECKINS = 10


def _checkin_json(checkin: Optional[CheckIn]) -> Optional[dict[str, Any]]:
    if checkin is None:
        return None
    return {
        "check_in_id": checkin.check_in_id,
        "status": checkin.status,
        "started": checkin.started,
        "updated": checkin.updated,
        "duration": checkin.duration,
        "environment": checkin.environment,
    }


def _monitor_json(state: MonitorStatus, recent: Sequence[CheckIn]) -> dict[str, Any]:
    return {
        "project": state.project,
        "slug": state.slug,
        "state": state.state,
        "failing": state.failing,
        "since": state.since,
        "detail": state.detail,
        "schedule": state.schedule,
        "next_expected": state.next_expected,
        "last_checkin": _checkin_json(state.last_checkin),
        "recent": [_checkin_json(checkin) for checkin in recent],
    }


def _uptime_json(state: UptimeStatus) -> dict[str, Any]:
    last = state.last
    return {
        "name": state.name,
        "url": state.url,
        "up": state.up,
        "down": state.down,
        "consecutive_failures": state.consecutive_failures,
        "threshold": state.threshold,
        "interval": state.interval,
        "since": state.since,
        "last_probe": None if last is None else last.at,
        "status": None if last is None else last.status,
        "latency_ms": None if last is None else round(last.latency * 1000, 1),
        "error": None if last is None else last.error,
    }


def _monitor_rows(request: Request) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    collector = _collector(request)
    monitors = collector.storage.monitors(checkins=_RECENT_CHECKINS)
    states = evaluate_monitors(monitors, time.time())
    rows = [_monitor_json(s, m.checkins) for s, m in zip(states, monitors)]
    probes = [] if collector.uptime is None else collector.uptime.status()
    return rows, [_uptime_json(state) for state in probes]


def monitors_page(request: Request) -> Response:
    monitors, uptime = _monitor_rows(request)
    return render(request, "monitors.html", monitors=monitors, uptime=uptime)


def monitors_api(request: Request) -> Response:
    monitors, uptime = _monitor_rows(request)
    return JSONResponse({"monitors": monitors, "uptime": uptime})


def routes() -> list[Route]:
    return [
        Route("/", issues_page, methods=["GET"]),
        Route("/issues/{issue_id}", issue_page, methods=["GET"]),
        Route("/projects", projects_page, methods=["GET"]),
        Route("/status", status_page, methods=["GET"]),
        Route("/api/0/issues/", issues_api, methods=["GET"]),
        Route("/api/0/issues/{issue_id}/", issue_api, methods=["GET"]),
        Route("/api/0/events/{project_id}/{event_id}/", event_api, methods=["GET"]),
        Route("/api/0/projects/", projects_api, methods=["GET"]),
        Route("/api/0/status/", status_api, methods=["GET"]),
        Route("/monitors", monitors_page, methods=["GET"]),
        Route("/api/0/monitors/", monitors_api, methods=["GET"]),
    ]
