"""The pages and the JSON API over real HTTP, and the event view on any input."""

from __future__ import annotations

import http.client
import json
import re
import time
import tracemalloc
import uuid
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfreport.collector.events import prepare_event
from selfreport.collector.web import MAX_LIMIT, SECURITY_HEADERS, _ago, _when, event_view

Event = dict[str, Any]


def fill(target: Any, make_event: Callable[..., Event]) -> dict[str, Event]:
    events = {
        "crash": make_event(environment="prod", release="2.0", tags={"region": "eu"}),
        "crash2": make_event(environment="prod"),
        "warn": make_event(exception=None, message="slow query", level="warning"),
        "log": make_event(
            exception=None,
            logentry={"message": "user %s", "formatted": "user 7"},
            breadcrumbs=[{"category": "db", "message": "SELECT", "data": {"rows": 2}}],
            request={"url": "http://x/y", "headers": [["Accept", "*/*"]]},
            user={"id": "7"},
            contexts={"os": {"name": "Linux"}, "bad": "not a dict"},
            sdk={"name": "sentry.python"},
            server_name="web-1",
            logger="app.users",
        ),
    }
    for event in events.values():
        assert target.send(json.dumps(event).encode(), kind="store").status == 200
    return events


def test_the_issue_list_filters_and_searches(target: Any, make_event: Callable[..., Event]):
    fill(target, make_event)
    page = target.get("/")
    assert page.status == 200
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name.lower()] == value
    titles = re.findall(r'<a href="/issues/\d+">([^<]+)</a>', page.text)
    assert titles == ["user 7", "slow query", "ValueError: bad input"]
    assert ">2</td>" in page.text  # the crash happened twice
    warn = target.get("/?level=warning")
    assert re.findall(r'<a href="/issues/\d+">([^<]+)</a>', warn.text) == ["slow query"]
    search = target.get("/?q=QUERY&sort=count")
    assert re.findall(r'<a href="/issues/\d+">([^<]+)</a>', search.text) == ["slow query"]
    env = target.get("/?environment=prod&project=1&level=bogus")
    assert re.findall(r'<a href="/issues/\d+">([^<]+)</a>', env.text) == ["ValueError: bad input"]
    none = target.get("/?q=nothing-matches")
    assert "No issues match these filters" in none.text


@pytest.mark.parametrize(
    "query",
    [
        "page=x",
        "page=0",
        "page=99999999999999999999999",  # was a 500: too large for SQLite
        "page=%D9%A1",  # an Arabic-Indic one, which int() takes
        "project=-1",
        "project=1_0",
    ],
)
def test_bad_page_parameters_are_a_400_with_a_message(target: Any, query: str) -> None:
    for path in ("/", "/api/0/issues/"):
        reply = target.get(f"{path}?{query}")
        assert reply.status == 400
        assert "must be a whole number from 1 to" in reply.text


def test_pagination(target: Any, make_event: Callable[..., Event]) -> None:
    storage = target.server.storage
    now = time.time()
    events = [
        prepare_event(make_event(exception=None, message=f"issue {n}"), received=now + n)
        for n in range(55)
    ]
    storage.store(target.project.id, events).result(10)
    first = target.get("/")
    assert first.text.count('<a href="/issues/') == 50
    assert "page=2" in first.text
    second = target.get("/?page=2")
    assert second.text.count('<a href="/issues/') == 5
    assert "page=1" in second.text
    api = target.get("/api/0/issues/?page=2").json()
    assert (len(api["issues"]), api["more"]) == (5, False)


def test_the_issue_page_shows_the_event(target: Any, make_event: Callable[..., Event]) -> None:
    events = fill(target, make_event)
    issues = {i.title: i for i in target.server.storage.issues()}
    crash = issues["ValueError: bad input"]
    page = target.get(f"/issues/{crash.id}")
    assert page.status == 200
    text = page.text
    assert "frame app" in text  # the in-app frame is highlighted
    assert "raise ValueError(&#39;bad input&#39;)" in text  # context line, escaped
    assert '<span class="line cur"><span class="ln">12</span>' in text
    assert "Recent events" in text
    chosen = target.get(f"/issues/{crash.id}?event={events['crash']['event_id']}")
    assert "region" in chosen.text  # that event's tags
    other = events["warn"]["event_id"]
    wrong = target.get(f"/issues/{crash.id}?event={other}")  # belongs to another issue
    assert events["crash2"]["event_id"] in wrong.text  # falls back to the latest
    log = target.get(f"/issues/{issues['user 7'].id}").text
    for shown in (
        "SELECT",
        "Accept",
        "web-1",
        "app.users",
        "Linux",
        "sentry.python",
        "Breadcrumbs",
    ):
        assert shown in log, shown
    missing = target.get("/issues/99999")
    assert missing.status == 404
    assert "No such issue" in missing.text
    assert target.get("/issues/abc").status == 404


def test_an_issue_whose_events_were_all_removed(target: Any, make_event: Callable[..., Event]):
    fill(target, make_event)
    storage = target.server.storage
    issue = storage.issues()[0]
    import sqlite3

    conn = sqlite3.connect(storage.path)
    conn.execute("DELETE FROM events WHERE issue_id = ?", (issue.id,))
    conn.commit()
    conn.close()
    assert "No stored event left" in target.get(f"/issues/{issue.id}").text


def test_projects_and_status_pages(target: Any, make_event: Callable[..., Event]) -> None:
    fill(target, make_event)
    projects = target.get("/projects").text
    dsn = target.server.dsn()
    assert dsn in projects
    assert "(the collector's own errors)" in projects
    status = target.get("/status")
    assert status.status == 200
    assert 'http-equiv="refresh"' in status.text
    for shown in ("storage_writable", "dropped_reentrant", "Ingest rate", "selfreport-internal"):
        assert shown in status.text
    assert target.send(b"{", kind="store").status == 400
    assert "malformed" in target.get("/status").text


def test_the_json_api(target: Any, make_event: Callable[..., Event]) -> None:
    events = fill(target, make_event)
    issues = target.get("/api/0/issues/?q=bad").json()["issues"]
    assert [i["title"] for i in issues] == ["ValueError: bad input"]
    assert issues[0]["count"] == 2
    detail = target.get(f"/api/0/issues/{issues[0]['id']}/?limit=1").json()
    assert len(detail["events"]) == 1
    assert detail["events"][0]["event"]["exception"]["values"][0]["type"] == "ValueError"
    assert target.get("/api/0/issues/12345/").status == 404
    event_id = events["warn"]["event_id"]
    found = target.get(f"/api/0/events/{target.project.id}/{event_id.upper()}/").json()
    assert found["event"]["message"] == "slow query"
    assert target.get(f"/api/0/events/{target.project.id}/{'0' * 32}/").status == 404
    projects = target.get("/api/0/projects/").json()["projects"]
    assert [(p["name"], p["internal"], p["events"]) for p in projects] == [
        ("default", False, 4),
        ("selfreport-internal", True, 0),
    ]
    assert projects[0]["dsn"] == target.server.dsn()
    status = target.get("/api/0/status/").json()
    assert status["healthy"] is True
    assert status["stored"] == 4
    assert status["processing_ms_overall"] > 0
    assert status["internal_project"] == {"id": 2, "name": "selfreport-internal"}
    assert status["reporter"]["sent"] == 0


@pytest.mark.parametrize("limit", ["0", "101", "100000", "abc", "%D9%A1", "-1"])
def test_the_api_limit_is_capped(target: Any, make_event: Callable[..., Event], limit: str):
    fill(target, make_event)
    issue = target.get("/api/0/issues/?q=bad").json()["issues"][0]
    reply = target.get(f"/api/0/issues/{issue['id']}/?limit={limit}")
    assert reply.status == 400  # was: any limit, every payload in memory at once
    assert reply.json()["detail"] == f"limit must be a whole number from 1 to {MAX_LIMIT}"
    full = target.get(f"/api/0/issues/{issue['id']}/?limit={MAX_LIMIT}").json()
    assert len(full["events"]) == 2


def test_api_responses_hold_one_payload_in_memory_at_a_time(
    target: Any, make_event: Callable[..., Event]
) -> None:
    # About 800 KB each after the collector's trimming (100 breadcrumbs of 8,000 characters).
    big = make_event(exception=None, message="big")
    big["breadcrumbs"] = {"values": [{"message": "x" * 8000} for _ in range(100)]}
    for _ in range(24):
        big["event_id"] = uuid.uuid4().hex
        assert target.send(json.dumps(big).encode(), kind="store").status == 200
    issue = target.get("/api/0/issues/?q=big").json()["issues"][0]
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=30)
    received = 0
    tracemalloc.start()
    try:
        conn.request("GET", f"/api/0/issues/{issue['id']}/?limit={MAX_LIMIT}")
        response = conn.getresponse()
        while chunk := response.read(65536):  # read and dropped: only the server's memory counts
            received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        conn.close()
    assert response.status == 200
    assert received > 24 * 800_000
    assert peak < 12 * 2**20  # was over 100 MiB: every payload parsed, then the whole reply


def test_time_formatting() -> None:
    now = time.time()
    assert _ago(None) == _when(None) == "-"
    assert _ago(now) == "just now"
    assert _ago(now - 30) == "30 s ago"
    assert _ago(now - 300) == "5 min ago"
    assert _ago(now - 7300) == "2 h ago"
    assert _ago(now - 3 * 86400) == "3 d ago"
    assert _when(0) == "1970-01-01 00:00:00 UTC"


def test_event_view_of_odd_events() -> None:
    assert event_view("not json")["exceptions"] == []
    assert event_view("[1, 2]")["message"] == ""
    view = event_view(
        json.dumps(
            {
                "message": {"message": "templ %s"},
                "breadcrumbs": {"values": [{"message": "m"}, "not a crumb"]},
                "tags": [["a", "b"], ["broken"], "x"],
                "exception": [{"type": "E", "stacktrace": {"frames": [{"lineno": True}, "x"]}}],
                "extra": {"request": {"method": "PUT"}},
            }
        )
    )
    assert view["message"] == "templ %s"
    assert view["tags"] == [("a", "b")]
    assert view["request"] == [("method", "PUT")]
    assert view["exceptions"][0]["frames"][0]["lineno"] is None
    assert [c["message"] for c in view["breadcrumbs"]] == ["m"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=15,
)
view_keys = st.sampled_from(
    [
        "exception",
        "logentry",
        "message",
        "breadcrumbs",
        "tags",
        "request",
        "user",
        "contexts",
        "extra",
        "sdk",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(view_keys, json_values, max_size=6))
def test_event_view_never_raises(event: Event) -> None:
    view = event_view(json.dumps(event))
    assert isinstance(view["raw"], str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in view["tags"])
