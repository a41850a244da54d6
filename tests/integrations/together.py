"""What the framework tests share: one crash's event, two users' requests crashing at once."""

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


def assert_one_crash_report(
    events: CapturedEvents, *, framework: str, url: str, route: str, endpoint: str
) -> None:
    """``GET /items/7/crash?password=hunter2&page=2`` as user ada with secret headers crashed
    the view (a LookupError): one event, scrubbed, with the route and user, and the
    framework's own log of it dropped as a duplicate."""
    events.flush()
    assert len(events) == 1
    event = events[0]
    assert event["exception"]["values"][-1]["type"] == "LookupError"
    assert event["exception"]["values"][-1]["mechanism"] == {"type": framework, "handled": False}
    request = event["request"]
    assert request["method"] == "GET"
    assert request["url"] == f"{url}/items/7/crash?password=[Filtered]&page=2"
    assert request["headers"]["authorization"] == "[Filtered]"
    assert request["headers"]["cookie"] == "[Filtered]"
    assert request["headers"]["x-test-user"] == "ada"
    assert event["transaction"] == route
    assert event["tags"]["route"] == route
    assert event["tags"]["endpoint"] == endpoint
    assert event["tags"]["item"] == "7"
    assert event["user"] == {"id": "3", "username": "ada"}  # no email by default
    # The framework logged the 500 with the same exception: dropped as a duplicate, counted.
    assert events.client.stats()["dropped_duplicate"] == 1
    assert events.client.stats()["captured"] == 1
