"""Parts the alert engine's tests share: rules, outcomes, stored envelopes, outboxes."""

from __future__ import annotations

import http.client
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from selfreport.collector.alerting.config import AlertRule
from selfreport.collector.alerting.model import Notification
from selfreport.collector.ingest import StoredEnvelope
from selfreport.collector.store import EventOutcome, Project


def Rule(name: str, when: str, **fields: Any) -> AlertRule:
    """The configuration's ``AlertRule``, told to the notifier ``ops`` unless said otherwise."""
    fields.setdefault("notify", ("ops",))
    fields["notify"] = tuple(fields["notify"])
    return AlertRule(name, when, **fields)


def Outcome(
    stored: bool = True,
    issue_id: int = 1,
    new_issue: bool = False,
    regressed: bool = False,
    issue_title: str = "ValueError: boom",
    level: str = "error",
    ignored: bool = False,
) -> EventOutcome:
    """An ``EventOutcome`` of a stored event on issue 1, unless said otherwise."""
    return EventOutcome(stored, issue_id, new_issue, regressed, issue_title, level, ignored)


PROJECT = Project(1, "default", False, "k" * 32, 0.0)
INTERNAL = Project(2, "selfreport-internal", True, "i" * 32, 0.0)


def stored(outcomes: Sequence[EventOutcome], project: Project = PROJECT) -> StoredEnvelope:
    """A StoredEnvelope as ingestion hands it to on_stored hooks, with its outcomes."""
    flags = [o.stored for o in outcomes]
    return StoredEnvelope(project, [], flags, b"", False, {}, list(outcomes))


@dataclass
class ListOutbox:
    """An outbox keeping what it is given, in memory (for the engine's logic alone)."""

    sent: list[tuple[Notification, list[str]]] = field(default_factory=list)
    failing_now: dict[str, str] = field(default_factory=dict)

    def put(self, notification: Notification, notifier_names: Sequence[str]) -> None:
        self.sent.append((notification, list(notifier_names)))

    def failing(self) -> dict[str, str]:
        return dict(self.failing_now)

    def states(self) -> list[tuple[str, str]]:
        return [(n.subject, n.state) for n, _ in self.sent]


class WebhookOutbox:
    """The smallest real outbox: POSTs each notification at once to the named webhooks (a URL
    per name) and reports failures the way the real outbox does (``on_notifier_failure``)."""

    def __init__(self, urls: dict[str, str], attempts: int = 3) -> None:
        self.urls = urls
        self.attempts = attempts
        self.delivered = 0
        self.failures = 0
        self.failing_now: dict[str, str] = {}
        self.on_notifier_failure: Any = None

    def put(self, notification: Notification, notifier_names: Sequence[str]) -> None:
        body = json.dumps({"rule": notification.rule, "subject": notification.subject,
                           "state": notification.state}).encode()  # fmt: skip
        for name in notifier_names:
            self._deliver(name, body)

    def _deliver(self, name: str, body: bytes) -> None:
        url = urlsplit(self.urls[name])
        for _ in range(self.attempts):
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
            try:
                conn.request("POST", url.path, body, {"Content-Type": "application/json"})
                status = conn.getresponse().status
            finally:
                conn.close()
            if status < 300:
                self.delivered += 1
                self.failing_now.pop(name, None)
                return
            self.failures += 1
            self.failing_now[name] = f"HTTP {status}"
            if self.on_notifier_failure is not None:
                self.on_notifier_failure(name, f"HTTP {status}")

    def failing(self) -> dict[str, str]:
        return dict(self.failing_now)
