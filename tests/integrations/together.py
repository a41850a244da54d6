"""Two users' requests crashing at once on a real server: what the framework tests share."""

from __future__ import annotations

import http.client
import threading

from selfreport.testing import CapturedEvents

USERS = ("alice", "bob")


def get(port: int, path: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def crash_together(port: int) -> dict[str, int]:
    """Each user's ``GET /together`` (a view tagging the request with ``who`` and raising),
    sent at once; the status each got."""
    statuses: dict[str, int] = {}

    def call(who: str) -> None:
        statuses[who] = get(
            port,
            f"/together?who={who}&password=p",
            {"X-Test-User": who, "Authorization": "Basic c2VjcmV0"},
        )

    callers = [threading.Thread(target=call, args=(who,)) for who in USERS]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    return statuses


def assert_each_event_is_its_own(events: CapturedEvents) -> None:
    """One event per user, each with only its own tags, user and request, credentials
    filtered, and the framework's log record of each crash counted as a duplicate."""
    events.flush()
    assert len(events) == len(USERS)
    for event in events:
        who = event["tags"]["who"]
        assert event["exception"]["values"][-1]["value"] == f"crash of {who}"
        assert event["user"]["username"] == who
        assert f"who={who}&password=[Filtered]" in event["request"]["url"]
        assert event["request"]["headers"]["authorization"] == "[Filtered]"
        assert event["transaction"] == "/together"
    assert events.client.stats()["dropped_duplicate"] == len(USERS)
