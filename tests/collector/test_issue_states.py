"""Issue states over real HTTP: the issue page's buttons, the API, the list's filter, CSRF."""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable

import httpx
import pytest
from starlette.requests import Request
from tests.collector.test_auth import client, csrf_of, log_in, with_user

from selfreport.collector.auth import Identity
from selfreport.collector.server import CollectorServer
from selfreport.collector.web import _duration, _may_change_state

Event = dict[str, Any]
MakeServer = Callable[..., CollectorServer]


def one_issue(server: CollectorServer, make_event: Callable[..., Event]) -> int:
    project = server.default_project
    reply = httpx.post(
        f"http://127.0.0.1:{server.port}/api/{project.id}/store/",
        content=json.dumps(make_event()).encode(),
        headers={"X-Sentry-Auth": f"Sentry sentry_key={project.public_key}"},
        timeout=30,
    )
    assert reply.status_code == 200
    [issue] = server.storage.issues()
    return issue.id


def titles(page: str) -> list[str]:
    return re.findall(r'<a href="/issues/\d+">([^<]+)</a>', page)


def test_the_issue_pages_buttons_resolve_ignore_and_reopen(
    make_server: MakeServer, make_event: Callable[..., Event]
) -> None:
    server = make_server()
    issue_id = one_issue(server, make_event)
    with client(server) as http:
        page = http.get(f"/issues/{issue_id}").text
        assert "<svg" in page
        assert "Last 24 hours" in page
        assert "Last 14 days" in page
        for button in ("Resolve", "Ignore forever", "Ignore for 1h", "Ignore until 100 more"):
            assert f">{button}</button>" in page
        token = csrf_of(page, f'action="/issues/{issue_id}/status"')
        done = http.post(f"/issues/{issue_id}/status", data={"csrf": token, "action": "resolve"})
        assert done.status_code == 303
        assert done.headers["location"] == f"/issues/{issue_id}"
        page = http.get(f"/issues/{issue_id}").text
        assert "status-resolved" in page
        assert ">Reopen</button>" in page
        assert titles(http.get("/").text) == []  # the list shows unresolved issues by default
        assert "No unresolved issues" in http.get("/").text
        assert titles(http.get("/?status=resolved").text) == ["ValueError: bad input"]
        assert titles(http.get("/?status=all").text) == ["ValueError: bad input"]
        for action, shown in [("ignore_1h", "until 20"), ("ignore_100", "until 100 more events")]:
            http.post(f"/issues/{issue_id}/status", data={"csrf": token, "action": "reopen"})
            http.post(f"/issues/{issue_id}/status", data={"csrf": token, "action": action})
            assert shown in http.get(f"/issues/{issue_id}").text
        http.post(f"/issues/{issue_id}/status", data={"csrf": token, "action": "reopen"})
        http.post(f"/issues/{issue_id}/status", data={"csrf": token, "action": "ignore"})
        assert "forever" in http.get(f"/issues/{issue_id}").text
        assert titles(http.get("/?status=ignored").text) == ["ValueError: bad input"]
        # Refused: no token, a wrong one, no form, an unknown action, no such issue.
        assert (
            http.post(f"/issues/{issue_id}/status", data={"action": "resolve"}).status_code == 403
        )
        wrong = http.post(
            f"/issues/{issue_id}/status", data={"csrf": "0" * 64, "action": "resolve"}
        )
        assert wrong.status_code == 403
        assert http.post(f"/issues/{issue_id}/status", content=b"{}").status_code == 400
        bad = http.post(f"/issues/{issue_id}/status", data={"csrf": token, "action": "delete"})
        assert (bad.status_code, "action must be one of" in bad.text) == (400, True)
        missing = http.post("/issues/999/status", data={"csrf": token, "action": "resolve"})
        assert missing.status_code == 404
        assert http.get("/?status=bogus").status_code == 400


def test_the_api_changes_and_filters_states(
    make_server: MakeServer, make_event: Callable[..., Event]
) -> None:
    server = make_server()
    issue_id = one_issue(server, make_event)
    path = f"/api/0/issues/{issue_id}/status"
    with client(server) as http:
        resolved = http.post(path, json={"status": "resolved"})
        assert resolved.status_code == 200
        assert resolved.json()["status"] == "resolved"
        assert resolved.json()["resolved_at"] is not None
        assert http.get("/api/0/issues/").json()["issues"] == []
        assert [i["id"] for i in http.get("/api/0/issues/?status=resolved").json()["issues"]] == [
            issue_id
        ]
        # An event on the resolved issue reopens it (a regression).
        one_issue(server, make_event)
        assert http.get(f"/api/0/issues/{issue_id}/").json()["status"] == "unresolved"
        before = time.time()
        later = http.post(path, json={"status": "ignored", "ignore_for": "2h"}).json()
        assert before + 7200 <= later["ignore_until"] <= time.time() + 7200
        seconds = http.post(path, json={"status": "ignored", "ignore_for": 60}).json()
        assert seconds["ignore_until"] <= time.time() + 60
        counted = http.post(path, json={"status": "ignored", "ignore_count": 5}).json()
        assert (counted["ignore_count"], counted["ignore_until"]) == (5, None)
        until = http.post(path, json={"status": "ignored", "ignore_until": 4_000_000_000}).json()
        assert until["ignore_until"] == 4_000_000_000
        for body, message in [
            ({"status": "gone"}, "status must be one of"),
            ({}, "status must be one of"),
            ({"status": "ignored", "ignore_count": "5"}, "ignore_count must be a whole number"),
            ({"status": "ignored", "ignore_count": 0}, "ignore_count must be"),
            ({"status": "ignored", "ignore_until": "soon"}, "ignore_until must be a time"),
            ({"status": "ignored", "ignore_for": "soon"}, "ignore_for must be seconds"),
            ({"status": "ignored", "ignore_for": -1}, "more than 0"),
            ({"status": "ignored", "ignore_for": "1h", "ignore_until": 1}, "not both"),
            ({"status": "resolved", "ignore_count": 3}, "with status 'ignored' only"),
            ({"status": "resolved", "why": "fixed"}, "unknown field 'why'"),
        ]:
            reply = http.post(path, json=body)
            assert reply.status_code == 400, body
            assert message in reply.json()["detail"], body
        for content in (b"[1]", b"{", b"x" * 5000, b"[" * 4000, b'{"a": [[[[[1]]]]]}'):
            assert http.post(path, content=content).status_code in (400, 413)
        assert http.post("/api/0/issues/999/status", json={"status": "resolved"}).status_code == 404
        assert http.post("/api/0/issues/x/status", json={"status": "resolved"}).status_code == 404
        assert http.get("/api/0/issues/?status=nope").status_code == 400


def test_with_a_login_the_api_needs_csrf_for_sessions_not_for_tokens(
    make_server: MakeServer,
    make_event: Callable[..., Event],
    api_token: Callable[..., dict[str, str]],
) -> None:
    server = make_server()
    issue_id = one_issue(server, make_event)
    with_user(server)
    bearer = api_token(server, "ci")
    path = f"/api/0/issues/{issue_id}/status"
    with client(server) as anonymous:
        assert anonymous.post(path, json={"status": "resolved"}).status_code == 401
        page = anonymous.post(f"/issues/{issue_id}/status", data={"action": "resolve"})
        assert page.status_code == 401
    with client(server) as http:
        assert http.post(path, json={"status": "resolved"}, headers=bearer).status_code == 200
        assert log_in(http).status_code == 303
        refused = http.post(path, json={"status": "unresolved"})
        assert refused.status_code == 403
        assert "CSRF" in refused.json()["detail"]
        page = http.get(f"/issues/{issue_id}").text
        token = csrf_of(page, f'action="/issues/{issue_id}/status"')
        ok = http.post(path, json={"status": "unresolved"}, headers={"X-CSRF-Token": token})
        assert ok.json()["status"] == "unresolved"
        in_body = http.post(path, json={"status": "resolved", "csrf": token})
        assert in_body.json()["status"] == "resolved"
        foreign = http.post(
            f"/issues/{issue_id}/status",
            data={"csrf": token, "action": "reopen"},
            headers={"Origin": "http://evil.example"},
        )
        assert foreign.status_code == 403
        assert server.storage.issue(issue_id).status == "resolved"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("via", "host", "allowed"),
    [
        ("off", "127.0.0.1", True),
        ("off", "::1", True),
        ("off", "10.0.0.7", False),
        ("open", "192.168.1.2", False),
        ("session", "10.0.0.7", True),
        ("token", "10.0.0.7", True),
    ],
)
def test_without_a_login_only_this_machine_changes_states(
    via: str, host: str, allowed: bool
) -> None:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/issues/1/status",
        "headers": [],
        "client": (host, 50000),
        "selfreport.identity": Identity(via),
    }
    refused = _may_change_state(Request(scope))
    assert (refused is None) == allowed
    if not allowed:
        assert refused == "without a login, issue states change only from this machine"


def test_durations() -> None:
    assert [_duration(v) for v in ("30s", "5m", "1h", "2d", 90, 1.5)] == [
        30.0,
        300.0,
        3600.0,
        172800.0,
        90.0,
        1.5,
    ]
    for bad in ("", "h", "1w", "-1h", "1.5h", True, None):
        with pytest.raises(ValueError, match="ignore_for"):
            _duration(bad)
