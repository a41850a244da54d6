"""The values alerting passes between its parts: notifications, notifiers, delivery errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

__all__ = [
    "ALERT_KINDS",
    "NOTIFIER_KINDS",
    "Notification",
    "Notifier",
    "NotifyError",
]

# What a rule watches (``when`` in the configuration) and how a notifier delivers.
ALERT_KINDS = ("new_issue", "regression", "rate", "checkin", "uptime", "health", "self")
NOTIFIER_KINDS = ("webhook", "slack", "pagerduty", "email")


@dataclass(frozen=True)
class Notification:
    """One message about one alert: it fired, it is still firing (re-notified), or it resolved.

    ``alert_key`` is stable for a rule and subject while the alert lives (PagerDuty's
    ``dedup_key``); ``notification_id`` is unique per notification and per notifier delivery
    lets a receiver drop the (at most one) duplicate after a crash.
    """

    notification_id: str
    alert_key: str
    rule: str
    when: str  # one of ALERT_KINDS, or "test" for `selfreport alerts test`
    state: str  # "firing" | "resolved" | "test"
    title: str
    text: str
    subject: str  # what the alert is about: a project, an issue, a monitor slug, a URL, a check
    created: float  # wall-clock time.time() of this notification
    project: Optional[str] = None
    count: Optional[int] = None  # events (or failures) behind it, when that means something
    url: Optional[str] = None  # a link to the collector's page about the subject
    details: Mapping[str, Any] = field(default_factory=dict)


class NotifyError(Exception):
    """A notifier could not deliver; ``retryable`` says whether trying again may help."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        status: Optional[int] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class Notifier(Protocol):
    """Delivers notifications through one real protocol (webhook, Slack, PagerDuty, SMTP)."""

    name: str
    kind: str

    def send(self, notification: Notification, timeout: float) -> None:
        """Deliver once, within ``timeout`` seconds, or raise :class:`NotifyError`."""
        ...
