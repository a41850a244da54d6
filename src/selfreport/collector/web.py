"""Server-rendered pages and the read-only JSON API; every value from an event is escaped."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from selfreport._core import untrusted_json

from .alerting.monitors import CheckIn, MonitorStatus, evaluate_monitors
from .alerting.uptime import UptimeStatus
from .auth import _form, identity_of, is_loopback, page_context
from .events import LEVELS, exception_values, frames_of, parse_id
from .store import ISSUE_STATUSES, AlertRecord, Event, Issue, Project, StorageError

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
        "status": _status_filter(request),
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
        status=None if filters["status"] == "all" else filters["status"],
    )


def issues_page(request: Request) -> Response:
    collector = _collector(request)
    filters = _filters(request)
    found = _find_issues(collector, filters)
    query = {
        k: v
        for k, v in filters.items()
        if v not in (None, "") and k != "page" and (k, v) != ("status", "unresolved")
    }
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
        charts=issue_charts(collector, issue.id),
        state_csrf=_state_csrf(request),
        state_changes=_may_change_state(request),
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
        "latency": metrics.latency_percentiles(),
        "latency_window_seconds": metrics.latencies["stored"].seconds,
        "internal_project": None
        if internal is None
        else {"id": internal.id, "name": internal.name},
        "alerts": _alert_status(collector),
    }


async def status_api(request: Request) -> Response:
    return JSONResponse(await status_data(request))


# --- JSON API (read-only) -------------------------------------------------------------------


def _fields_json(value: Any, skip: tuple[str, ...] = (), **rename: str) -> dict[str, Any]:
    """A dataclass's fields as a JSON object, in their order (``rename``: field -> key)."""
    return {
        rename.get(f.name, f.name): getattr(value, f.name)
        for f in dataclasses.fields(value)
        if f.name not in skip
    }


def _issue_json(issue: Issue) -> dict[str, Any]:
    return _fields_json(issue, times_seen="count")


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


# --- alerts ----------------------------------------------------------------------------------

# The Alerts page's history: this many alerts and deliveries at most.
ALERT_HISTORY = 100


def _alert_status(collector: Collector) -> Optional[dict[str, Any]]:
    """Each rule's state and the engine's counters (None: no alert rules)."""
    engine = collector.alerts
    if engine is None:
        return None
    return {
        "rules": engine.rule_states(),
        "stats": engine.stats(),
        "failing_notifiers": engine.failing_notifiers(),
    }


def _alert_json(alert: AlertRecord) -> dict[str, Any]:
    return _fields_json(alert, skip=("key",))


def _alerts_data(collector: Collector) -> dict[str, Any]:
    """Rules, what fires now, the alerts' history and (from the outbox) the deliveries'."""
    engine = collector.alerts
    history = collector.storage.alerts(limit=ALERT_HISTORY)
    deliveries: list[Any] = []
    outbox_history = getattr(engine.outbox, "history", None) if engine is not None else None
    if callable(outbox_history):
        deliveries = [_plain(row) for row in outbox_history(ALERT_HISTORY)]
    return {
        "configured": engine is not None,
        "engine": _alert_status(collector),
        "firing": [_alert_json(a) for a in history if a.state == "firing"],
        "history": [_alert_json(a) for a in history],
        "deliveries": deliveries,
    }


def _plain(row: Any) -> dict[str, Any]:
    """A delivery row (the outbox's entry) as JSON, without its payload (the notification)."""
    is_entry = dataclasses.is_dataclass(row) and not isinstance(row, type)
    fields = dataclasses.asdict(row) if is_entry else dict(row)
    fields.pop("payload", None)
    return fields


def alerts_page(request: Request) -> Response:
    return render(request, "alerts.html", **_alerts_data(_collector(request)))


def alerts_api(request: Request) -> Response:
    return JSONResponse(_alerts_data(_collector(request)))


# --- issue states and the events-over-time chart --------------------------------------------

_STATUS_FILTERS = (*ISSUE_STATUSES, "all")
_MAX_STATE_BODY = 4096
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_IGNORE_SECONDS = 10 * 365 * 86400.0
# The issue page's buttons: action -> (status, ignore_count, ignore for seconds).
_ACTIONS: dict[str, tuple[str, Optional[int], Optional[float]]] = {
    "resolve": ("resolved", None, None),
    "reopen": ("unresolved", None, None),
    "ignore": ("ignored", None, None),
    "ignore_1h": ("ignored", None, 3600.0),
    "ignore_100": ("ignored", 100, None),
}
# (title, bucket seconds, buckets): the last 24 hours by hour, the last 14 days by day.
CHARTS = (("Last 24 hours", 3600, 24), ("Last 14 days", 86400, 14))
_CHART_WIDTH, _CHART_HEIGHT = 480, 80


def _status_filter(request: Request) -> str:
    status = request.query_params.get("status", "unresolved")
    if status not in _STATUS_FILTERS:
        raise HTTPException(400, f"status must be one of {', '.join(_STATUS_FILTERS)}")
    return status


def issue_charts(collector: Collector, issue_id: int) -> list[dict[str, Any]]:
    """The issue page's charts: per chart its title, bars (x, y, width, height, count, when)
    and total, for a server-rendered SVG (the pages run no script)."""
    now = time.time()
    charts = []
    for title, bucket, count in CHARTS:
        # Buckets end at the next whole hour or day (UTC), so they read as hours and days.
        end = (now // bucket + 1) * bucket
        counts = collector.storage.issue_histogram(issue_id, end - bucket * count, bucket, end)
        charts.append(_chart(title, counts, end - bucket * count, bucket))
    return charts


def _chart(title: str, counts: list[int], since: float, bucket: float) -> dict[str, Any]:
    top = max(counts) or 1
    width = _CHART_WIDTH / len(counts)
    bars = []
    for index, count in enumerate(counts):
        height = round(count / top * (_CHART_HEIGHT - 2), 1) if count else 0.0
        bars.append(
            {
                "x": round(index * width + 1, 1),
                "y": round(_CHART_HEIGHT - height, 1),
                "width": round(max(1.0, width - 2), 1),
                "height": height,
                "count": count,
                "when": _when(since + index * bucket),
            }
        )
    return {
        "title": title,
        "bars": bars,
        "total": sum(counts),
        "top": max(counts),
        "width": _CHART_WIDTH,
        "height": _CHART_HEIGHT,
    }


def _csrf_seed(request: Request) -> str:
    """What a state change's CSRF token is made from: the session, else (no login, on a
    loopback collector) a constant: a foreign page still cannot read the token."""
    identity = identity_of(request)
    return identity.session if identity is not None and identity.session else "anonymous"


def _state_csrf(request: Request) -> Optional[str]:
    policy = _collector(request).auth
    return None if policy is None else policy.csrf_token(_csrf_seed(request))


def _may_change_state(request: Request) -> Optional[str]:
    """None if this request may change issue states, else why not. Without a login (``off``,
    or ``auto`` before the first user) only clients on this machine may."""
    identity = identity_of(request)
    if identity is not None and identity.via in ("open", "off"):
        host = request.client.host if request.client is not None else ""
        if not is_loopback(host):
            return "without a login, issue states change only from this machine"
    return None


def _csrf_ok(request: Request, token: Optional[str]) -> bool:
    policy = _collector(request).auth
    if policy is None:
        return True
    return policy.csrf_ok(_csrf_seed(request), token)


def _duration(value: object) -> float:
    """Seconds from a number or a text like ``30s``, ``5m``, ``1h``, ``2d``."""
    if isinstance(value, str) and value[-1:] in _DURATION_UNITS and value[:-1].isdigit():
        return float(value[:-1]) * _DURATION_UNITS[value[-1]]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError('ignore_for must be seconds or a duration like "30m", "1h", "2d"')


def _state_request(body: dict[str, Any]) -> tuple[str, Optional[int], Optional[float]]:
    """(status, ignore_count, ignore_until) from the API's JSON body; ValueError if bad."""
    unknown = sorted(set(body) - {"status", "ignore_count", "ignore_until", "ignore_for", "csrf"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    status = body.get("status")
    if not isinstance(status, str):
        raise ValueError(f"status must be one of {', '.join(ISSUE_STATUSES)}")
    count = body.get("ignore_count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
        raise ValueError("ignore_count must be a whole number")
    until = body.get("ignore_until")
    if until is not None and (not isinstance(until, (int, float)) or isinstance(until, bool)):
        raise ValueError("ignore_until must be a time (seconds since the epoch)")
    if body.get("ignore_for") is not None:
        if until is not None:
            raise ValueError("give ignore_until or ignore_for, not both")
        seconds = _duration(body["ignore_for"])
        if not 0 < seconds <= _MAX_IGNORE_SECONDS:
            raise ValueError("ignore_for must be more than 0 and at most 10 years")
        until = time.time() + seconds
    return status, count, None if until is None else float(until)


async def _json_body(request: Request) -> dict[str, Any]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_STATE_BODY:
            raise HTTPException(413, f"the body must be at most {_MAX_STATE_BODY} bytes")
    try:
        value = untrusted_json.loads(body, max_depth=4)  # a stranger's: bounded depth too
    except ValueError:
        raise HTTPException(400, "the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return value


async def _change_state(
    request: Request, status: str, count: Optional[int], until: Optional[float]
) -> Issue:
    """Apply a state change to the issue in the path; HTTPException when refused."""
    issue_id = _path_id(request, "issue_id")
    storage = _collector(request).storage
    try:
        issue = await run_in_threadpool(
            lambda: (
                None
                if issue_id is None
                else storage.set_issue_status(
                    issue_id, status, ignore_count=count, ignore_until=until
                )
            )
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    except StorageError as exc:
        raise HTTPException(503, f"the storage cannot take it now: {exc}") from None
    if issue is None:
        raise HTTPException(404, "no such issue")
    return issue


async def issue_status_api(request: Request) -> Response:
    """``POST /api/0/issues/{id}/status``: resolve, reopen or ignore (JSON)."""
    refused = _may_change_state(request)
    if refused is not None:
        raise HTTPException(403, refused)
    body = await _json_body(request)
    identity = identity_of(request)
    if identity is not None and identity.session is not None:
        token = request.headers.get("x-csrf-token") or body.get("csrf")
        if not _csrf_ok(request, token if isinstance(token, str) else None):
            raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token)")
    try:
        status, count, until = _state_request(body)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    issue = await _change_state(request, status, count, until)
    return JSONResponse(_issue_json(issue))


async def issue_status_form(request: Request) -> Response:
    """The issue page's buttons: change the state, then back to the page (303)."""
    refused = _may_change_state(request)
    if refused is not None:
        raise HTTPException(403, refused)
    form = await _form(request)
    if form is None:
        raise HTTPException(400, "expected a form (application/x-www-form-urlencoded)")
    if not _csrf_ok(request, form.get("csrf")):
        raise HTTPException(403, "the form expired: reload the page")
    action = _ACTIONS.get(form.get("action", ""))
    if action is None:
        raise HTTPException(400, f"action must be one of {', '.join(_ACTIONS)}")
    status, count, seconds = action
    until = None if seconds is None else time.time() + seconds
    issue = await _change_state(request, status, count, until)
    return RedirectResponse(f"/issues/{issue.id}", status_code=303)


# --- monitors: check-ins and uptime probes -------------------------------------------------

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
        Route("/issues/{issue_id}/status", issue_status_form, methods=["POST"]),
        Route("/api/0/issues/{issue_id}/status", issue_status_api, methods=["POST"]),
        Route("/issues/{issue_id}", issue_page, methods=["GET"]),
        Route("/projects", projects_page, methods=["GET"]),
        Route("/status", status_page, methods=["GET"]),
        Route("/api/0/issues/", issues_api, methods=["GET"]),
        Route("/api/0/issues/{issue_id}/", issue_api, methods=["GET"]),
        Route("/api/0/events/{project_id}/{event_id}/", event_api, methods=["GET"]),
        Route("/api/0/projects/", projects_api, methods=["GET"]),
        Route("/api/0/status/", status_api, methods=["GET"]),
        Route("/alerts", alerts_page, methods=["GET"]),
        Route("/api/0/alerts/", alerts_api, methods=["GET"]),
        Route("/monitors", monitors_page, methods=["GET"]),
        Route("/api/0/monitors/", monitors_api, methods=["GET"]),
    ]
