"""The four notifiers: a signed JSON webhook, Slack, PagerDuty Events API v2, email over SMTP."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import smtplib
import ssl
import time
import uuid
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, Callable, Mapping, Optional

from selfreport._delivery.retry import Outcome, classify, parse_retry_after
from selfreport._delivery.transport import Connector
from selfreport._version import __version__
from selfreport.collector.alerting.config import (
    DEFAULT_PAGERDUTY_URL,
    CollectorConfig,
    NotifierConfig,
    SmtpConfig,
)
from selfreport.collector.alerting.model import Notification, Notifier, NotifyError

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WEBHOOK_VERSION",
    "EmailNotifier",
    "PagerDutyNotifier",
    "SlackNotifier",
    "WebhookNotifier",
    "build_notifier",
    "build_notifiers",
    "email_message",
    "make_test_notification",
    "pagerduty_event",
    "sign",
    "slack_payload",
    "webhook_payload",
]

WEBHOOK_VERSION = 1
SIGNATURE_HEADER = "X-Selfreport-Signature"
TIMESTAMP_HEADER = "X-Selfreport-Timestamp"
USER_AGENT = f"selfreport/{__version__}"
_MAX_ANSWER = 65536  # of a receiver's answer body read, for the error message and keep-alive
_ANSWER_IN_ERROR = 200
# Slack's limits (block kit): a header's text, a section's text, a button's URL.
_SLACK_HEADER = 150
_SLACK_TEXT = 3000
_SLACK_URL = 3000
# PagerDuty's limits (Events API v2): summary 1024 characters, dedup_key 255.
_PD_SUMMARY = 1024
_PD_DEDUP_KEY = 255


def sign(secret: str, body: bytes) -> str:
    """The ``X-Selfreport-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def webhook_payload(notification: Notification) -> dict[str, Any]:
    """The webhook's JSON document, schema version :data:`WEBHOOK_VERSION` (docs/alerts.md)."""
    n = notification
    return {
        "version": WEBHOOK_VERSION,
        "notification_id": n.notification_id,
        "alert_key": n.alert_key,
        "rule": n.rule,
        "when": n.when,
        "state": n.state,
        "title": n.title,
        "text": n.text,
        "subject": n.subject,
        "project": n.project,
        "count": n.count,
        "url": n.url,
        "created": n.created,
        "details": dict(n.details),
    }


def make_test_notification(notifier: str, clock: Callable[[], float] = time.time) -> Notification:
    """What ``selfreport alerts test NAME`` sends: a notification that is clearly a test."""
    return Notification(
        notification_id=uuid.uuid4().hex,
        alert_key=f"test:{notifier}",
        rule="test",
        when="test",
        state="test",
        title=f"selfreport test notification through {notifier!r}",
        text="If you can read this, the notifier works. Nothing is wrong.",
        subject=notifier,
        created=clock(),
    )


def _json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), default=str).encode()


# -- HTTP ----------------------------------------------------------------------------------


class _HttpPoster:
    """POSTs JSON to one URL, a fresh connection each time (notifications are rare), and reads
    the answer the way every sender here does (``_delivery/retry.classify``)."""

    def __init__(self, url: str, ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self._connector, self.path = Connector.for_url(url, ssl_context)
        self.host = self._connector.host
        self.port = self._connector.port

    def post(self, body: bytes, headers: Mapping[str, str], timeout: float) -> tuple[int, bytes]:
        """Send; returns the status and body of a 2xx answer, raises :class:`NotifyError`."""
        all_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers}
        conn = self._connector.connect(max(timeout, 0.001))
        try:
            conn.request("POST", self.path, body=body, headers=all_headers)
            answer = conn.getresponse()
            content = answer.read(_MAX_ANSWER)
            retry_after = parse_retry_after(answer.getheader("Retry-After"))
            status = answer.status
        except (OSError, http.client.HTTPException) as exc:
            where = f"{self.host}:{self.port or ''}"
            raise NotifyError(f"no answer from {where}: {exc!r}", retryable=True) from None
        finally:
            conn.close()
        outcome = classify(status)
        if outcome is Outcome.SENT:
            return status, content
        said = content[:_ANSWER_IN_ERROR].decode("utf-8", "replace").strip()
        retryable = outcome is not Outcome.REFUSED or status == 408
        raise NotifyError(
            f"HTTP {status}" + (f": {said}" if said else ""),
            retryable=retryable,
            status=status,
            retry_after=retry_after,
        )


class WebhookNotifier:
    """JSON POST of :func:`webhook_payload`, signed when a secret is set."""

    kind = "webhook"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        secret: Optional[str] = None,
        timeout: float = 10.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self._secret = secret
        self._clock = clock
        self._poster = _HttpPoster(url, ssl_context)

    def send(self, notification: Notification, timeout: float) -> None:
        body = _json(webhook_payload(notification))
        headers: dict[str, str] = {}
        if self._secret:
            headers[TIMESTAMP_HEADER] = str(int(self._clock()))
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        self._poster.post(body, headers, timeout)


def _slack_escape(text: str) -> str:
    # The three characters Slack's mrkdwn needs escaped; the rest is taken as written.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(notification: Notification) -> dict[str, Any]:
    """An incoming-webhook message: ``text`` for notifications and old clients, and ``blocks``."""
    n = notification
    state = n.state.upper()
    fields = [{"type": "mrkdwn", "text": f"*State*\n{_slack_escape(state)}"}]
    if n.project is not None:
        fields.append({"type": "mrkdwn", "text": f"*Project*\n{_slack_escape(n.project)}"})
    if n.count is not None:
        fields.append({"type": "mrkdwn", "text": f"*Count*\n{n.count}"})
    fields.append({"type": "mrkdwn", "text": f"*Rule*\n{_slack_escape(n.rule)[:1900]}"})
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(n.title, _SLACK_HEADER)}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _cut(_slack_escape(n.text or n.title), _SLACK_TEXT)},
            "fields": fields,
        },
    ]
    if n.url and len(n.url) <= _SLACK_URL:
        button = {"type": "button", "text": {"type": "plain_text", "text": "Open"}, "url": n.url}
        blocks.append({"type": "actions", "elements": [button]})
    return {"text": _cut(f"[{state}] {n.title}", _SLACK_TEXT), "blocks": blocks}


def _cut(text: str, limit: int) -> str:
    text = text.strip() or "-"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SlackNotifier:
    """Slack incoming webhook (block kit message with a ``text`` fallback)."""

    kind = "slack"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float = 10.0,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self._poster = _HttpPoster(url, ssl_context)

    def send(self, notification: Notification, timeout: float) -> None:
        self._poster.post(_json(slack_payload(notification)), {}, timeout)


def pagerduty_event(
    notification: Notification, routing_key: str, severity: str = "error"
) -> dict[str, Any]:
    """A PagerDuty Events API v2 event: ``trigger`` (firing, test) or ``resolve``."""
    n = notification
    dedup_key = n.alert_key
    if len(dedup_key) > _PD_DEDUP_KEY:  # long subjects (URLs): a stable digest instead
        dedup_key = "sha256:" + hashlib.sha256(dedup_key.encode("utf-8")).hexdigest()
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "resolve" if n.state == "resolved" else "trigger",
        "dedup_key": dedup_key,
    }
    if n.state == "resolved":
        return event  # PagerDuty needs only the key to resolve
    stamp = datetime.fromtimestamp(n.created, timezone.utc).isoformat()
    details = {"text": n.text, "rule": n.rule, "count": n.count, **dict(n.details)}
    event["payload"] = {
        "summary": _cut(n.title, _PD_SUMMARY),
        "source": n.subject or "selfreport",
        "severity": severity,
        "timestamp": stamp,
        "class": n.when,
        "custom_details": details,
    }
    if n.project is not None:
        event["payload"]["group"] = n.project
    event["client"] = "selfreport"
    if n.url:
        event["client_url"] = n.url
        event["links"] = [{"href": n.url, "text": "Open in selfreport"}]
    return event


class PagerDutyNotifier:
    """PagerDuty Events API v2; ``dedup_key`` is the alert key, so a resolve closes the incident."""

    kind = "pagerduty"

    def __init__(
        self,
        name: str,
        routing_key: str,
        *,
        url: str = DEFAULT_PAGERDUTY_URL,
        severity: str = "error",
        timeout: float = 10.0,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self._routing_key = routing_key
        self._severity = severity
        self._poster = _HttpPoster(url, ssl_context)

    def send(self, notification: Notification, timeout: float) -> None:
        event = pagerduty_event(notification, self._routing_key, self._severity)
        self._poster.post(_json(event), {}, timeout)


# -- Email ---------------------------------------------------------------------------------


def email_message(notification: Notification, smtp: SmtpConfig) -> EmailMessage:
    """One plain-text message; its Message-ID carries the notification id, so a receiver (or a
    mail filter) can drop the duplicate a crash may cause."""
    n = notification
    message = EmailMessage()
    subject = f"[selfreport] {n.state.upper()}: {n.title}"
    message["Subject"] = " ".join(subject.split())[:250]
    message["From"] = smtp.sender
    message["To"] = ", ".join(smtp.recipients)
    message["Date"] = format_datetime(datetime.fromtimestamp(n.created, timezone.utc))
    domain = smtp.sender.rpartition("@")[2] or "selfreport.invalid"
    message["Message-ID"] = make_msgid(idstring=n.notification_id[:64], domain=domain)
    message["X-Selfreport-Alert-Key"] = " ".join(n.alert_key.split())[:500]
    lines = [n.text or n.title, ""]
    for label, value in (("Rule", n.rule), ("Project", n.project), ("Count", n.count)):
        if value is not None:
            lines.append(f"{label}: {value}")
    lines.append(f"Subject: {n.subject}")
    if n.url:
        lines.append(f"Link: {n.url}")
    message.set_content("\n".join(lines) + "\n")
    return message


class EmailNotifier:
    """SMTP (plain, STARTTLS or SMTPS, optional login), one message per notification."""

    kind = "email"

    def __init__(
        self,
        name: str,
        smtp: SmtpConfig,
        *,
        timeout: float = 10.0,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.smtp = smtp
        self._ssl_context = ssl_context

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _connect(self, timeout: float) -> smtplib.SMTP:
        s = self.smtp
        if s.ssl:
            return smtplib.SMTP_SSL(s.host, s.port, timeout=timeout, context=self._context())
        server = smtplib.SMTP(s.host, s.port, timeout=timeout)
        if s.starttls:
            try:
                server.starttls(context=self._context())
            except BaseException:
                server.close()
                raise
        return server

    def send(self, notification: Notification, timeout: float) -> None:
        message = email_message(notification, self.smtp)
        try:
            server = self._connect(max(timeout, 0.001))
            try:
                if self.smtp.username is not None and self.smtp.password is not None:
                    server.login(self.smtp.username, self.smtp.password)
                server.send_message(message)
                try:
                    server.quit()
                except (OSError, smtplib.SMTPException):
                    pass  # sent already: a failed goodbye must not make it sent twice
            finally:
                server.close()
        except smtplib.SMTPResponseException as exc:
            raise _smtp_error(exc.smtp_code, exc.smtp_error) from None
        except smtplib.SMTPRecipientsRefused as exc:
            code, said = next(iter(exc.recipients.values()), (550, b"refused"))
            raise _smtp_error(code, said) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise NotifyError(f"SMTP: {exc}", retryable=False) from None
        except (OSError, smtplib.SMTPException) as exc:
            where = f"{self.smtp.host}:{self.smtp.port}"
            raise NotifyError(f"SMTP {where}: {exc!r}", retryable=True) from None


def _smtp_error(code: int, said: Any) -> NotifyError:
    text = said.decode("utf-8", "replace") if isinstance(said, bytes) else str(said)
    # 4xx: try again later (RFC 5321 4.2.1); 5xx and anything else: it will not work as is.
    return NotifyError(f"SMTP {code}: {text[:_ANSWER_IN_ERROR]}", retryable=400 <= code < 500)


# -- From the configuration ----------------------------------------------------------------


def build_notifier(config: NotifierConfig) -> Notifier:
    """The notifier a ``[[notifier]]`` describes (already checked by the configuration)."""
    if config.kind == "email":
        assert config.smtp is not None
        return EmailNotifier(config.name, config.smtp, timeout=config.timeout)
    assert config.url is not None
    if config.kind == "webhook":
        return WebhookNotifier(
            config.name, config.url, secret=config.secret, timeout=config.timeout
        )
    if config.kind == "slack":
        return SlackNotifier(config.name, config.url, timeout=config.timeout)
    assert config.routing_key is not None
    return PagerDutyNotifier(
        config.name,
        config.routing_key,
        url=config.url,
        severity=config.severity,
        timeout=config.timeout,
    )


def build_notifiers(config: CollectorConfig) -> dict[str, Notifier]:
    """Every notifier of ``config``, by name."""
    return {n.name: build_notifier(n) for n in config.notifiers}
