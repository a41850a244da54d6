"""The notifiers against real receivers on loopback: HTTP for webhook/Slack/PagerDuty, aiosmtpd."""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
from pathlib import Path

import pytest
from tests.collector.alerting.receivers import http_receiver, self_signed, smtp_receiver

from selfreport.collector.alerting.config import NotifierConfig, SmtpConfig, parse_config
from selfreport.collector.alerting.model import Notification, NotifyError
from selfreport.collector.alerting.notifiers import (
    EmailNotifier,
    PagerDutyNotifier,
    SlackNotifier,
    WebhookNotifier,
    build_notifier,
    build_notifiers,
    make_test_notification,
    sign,
)

NOTE = Notification(
    notification_id="n-1",
    alert_key="rate:error spike:default",
    rule="error spike",
    when="rate",
    state="firing",
    title="120 events in 5m in default",
    text="More than 100 events <in> 5 minutes & more",
    subject="default",
    created=1_700_000_000.0,
    project="default",
    count=120,
    url="http://127.0.0.1:8000/issues/?project=default",
    details={"window": 300},
)
RESOLVED = Notification(
    notification_id="n-2",
    alert_key=NOTE.alert_key,
    rule=NOTE.rule,
    when="rate",
    state="resolved",
    title="resolved",
    text="",
    subject="default",
    created=1_700_000_100.0,
)


def test_webhook_posts_the_versioned_schema_signed() -> None:
    with http_receiver() as receiver:
        notifier = WebhookNotifier("ops", receiver.url, secret="s3cret", clock=lambda: 1234.9)
        notifier.send(NOTE, 5.0)
        (request,) = receiver.requests
    assert request.path == "/hook?x=1"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Selfreport-Timestamp"] == "1234"
    expected = hmac.new(b"s3cret", request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Selfreport-Signature"] == f"sha256={expected}"
    assert sign("s3cret", request.body) == f"sha256={expected}"
    assert request.json() == {
        "version": 1,
        "notification_id": "n-1",
        "alert_key": "rate:error spike:default",
        "rule": "error spike",
        "when": "rate",
        "state": "firing",
        "title": "120 events in 5m in default",
        "text": "More than 100 events <in> 5 minutes & more",
        "subject": "default",
        "project": "default",
        "count": 120,
        "url": "http://127.0.0.1:8000/issues/?project=default",
        "created": 1_700_000_000.0,
        "details": {"window": 300},
    }


def test_webhook_without_a_secret_is_not_signed() -> None:
    with http_receiver() as receiver:
        WebhookNotifier("ops", receiver.url).send(NOTE, 5.0)
        (request,) = receiver.requests
    assert "X-Selfreport-Signature" not in request.headers
    assert "X-Selfreport-Timestamp" not in request.headers


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (429, True), (408, True), (400, False), (404, False), (301, False)],
)
def test_answers_are_classified_like_every_sender(status: int, retryable: bool) -> None:
    with http_receiver() as receiver:
        receiver.answer(status, b"nope " * 100, Retry_After="7")
        with pytest.raises(NotifyError) as caught:
            WebhookNotifier("ops", receiver.url).send(NOTE, 5.0)
    error = caught.value
    assert error.status == status
    assert error.retryable is retryable
    assert str(error).startswith(f"HTTP {status}: nope")
    assert len(str(error)) < 260
    assert error.retry_after == 7.0


def test_no_answer_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(NotifyError, match=r"no answer from 127\.0\.0\.1") as caught:
            WebhookNotifier("ops", f"http://127.0.0.1:{port}/").send(NOTE, 5.0)
    assert caught.value.retryable
    assert caught.value.status is None


def test_slack_payload_has_fallback_text_and_blocks() -> None:
    with http_receiver() as receiver:
        SlackNotifier("chat", receiver.url).send(NOTE, 5.0)
        body = receiver.requests[0].json()
    assert body["text"] == "[FIRING] 120 events in 5m in default"
    header, section, actions = body["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": "120 events in 5m in default"},
    }
    assert section["text"]["text"] == "More than 100 events &lt;in&gt; 5 minutes &amp; more"
    fields = [f["text"] for f in section["fields"]]
    assert fields == [
        "*State*\nFIRING",
        "*Project*\ndefault",
        "*Count*\n120",
        "*Rule*\nerror spike",
    ]
    (button,) = actions["elements"]
    assert button["url"] == NOTE.url
    assert button["type"] == "button"


def test_slack_cuts_to_its_limits_and_omits_what_is_missing() -> None:
    long = Notification("i", "k", "r", "self", "firing", "t" * 500, "", "s", 0.0)
    with http_receiver() as receiver:
        SlackNotifier("chat", receiver.url).send(long, 5.0)
        body = receiver.requests[0].json()
    header, section = body["blocks"]
    assert len(header["text"]["text"]) == 150
    assert header["text"]["text"].endswith("…")
    assert [f["text"] for f in section["fields"]] == ["*State*\nFIRING", "*Rule*\nr"]


def test_pagerduty_triggers_and_resolves_with_one_dedup_key() -> None:
    with http_receiver(202, b'{"status":"success"}') as receiver:
        notifier = PagerDutyNotifier("pager", "R0UTING", url=receiver.url, severity="critical")
        notifier.send(NOTE, 5.0)
        notifier.send(RESOLVED, 5.0)
        trigger, resolve = (r.json() for r in receiver.requests)
    assert trigger["routing_key"] == "R0UTING"
    assert trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == NOTE.alert_key
    payload = trigger["payload"]
    assert payload["summary"] == NOTE.title
    assert payload["source"] == "default"
    assert payload["severity"] == "critical"
    assert payload["timestamp"] == "2023-11-14T22:13:20+00:00"
    assert payload["group"] == "default"
    assert payload["class"] == "rate"
    assert payload["custom_details"]["count"] == 120
    assert payload["custom_details"]["window"] == 300
    assert trigger["links"] == [{"href": NOTE.url, "text": "Open in selfreport"}]
    assert resolve == {
        "routing_key": "R0UTING",
        "event_action": "resolve",
        "dedup_key": NOTE.alert_key,
    }


def test_pagerduty_long_keys_become_a_stable_digest() -> None:
    long = Notification("i", "uptime:" + "x" * 300, "r", "uptime", "firing", "t", "", "", 0.0)
    with http_receiver(202) as receiver:
        notifier = PagerDutyNotifier("pager", "k", url=receiver.url)
        notifier.send(long, 5.0)
        notifier.send(long, 5.0)
        first, second = (r.json() for r in receiver.requests)
    assert first["dedup_key"] == second["dedup_key"]
    assert first["dedup_key"].startswith("sha256:")
    assert len(first["dedup_key"]) <= 255
    assert first["payload"]["source"] == "selfreport"
    assert "group" not in first["payload"]
    assert "links" not in first


def test_pagerduty_refusal_is_not_retried() -> None:
    with http_receiver(400, b'{"status":"invalid event"}') as receiver:
        notifier = PagerDutyNotifier("pager", "k", url=receiver.url)
        with pytest.raises(NotifyError, match="HTTP 400") as caught:
            notifier.send(NOTE, 5.0)
    assert not caught.value.retryable


def smtp_config(port: int, **changes: object) -> SmtpConfig:
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "sender": "selfreport@example.com",
        "recipients": ("oncall@example.com", "lead@example.com"),
    }
    fields.update(changes)
    return SmtpConfig(**fields)  # type: ignore[arg-type]


def test_email_over_plain_smtp() -> None:
    with smtp_receiver() as receiver:
        EmailNotifier("mail", smtp_config(receiver.port)).send(NOTE, 10.0)
    ((sender, recipients),) = receiver.envelopes
    assert sender == "selfreport@example.com"
    assert recipients == ["oncall@example.com", "lead@example.com"]
    (message,) = receiver.messages
    assert message["Subject"] == "[selfreport] FIRING: 120 events in 5m in default"
    assert message["To"] == "oncall@example.com, lead@example.com"
    assert "n-1" in message["Message-ID"]
    assert message["X-Selfreport-Alert-Key"] == NOTE.alert_key
    body = message.get_payload(decode=True).decode()
    assert "More than 100 events <in> 5 minutes & more" in body
    assert "Count: 120" in body
    assert f"Link: {NOTE.url}" in body


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def contexts(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = certificate
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert), str(key))
    return server, ssl.create_default_context(cafile=str(cert))


def test_email_with_starttls_and_login(certificate: tuple[Path, Path]) -> None:
    server_tls, client_tls = contexts(certificate)
    with smtp_receiver(tls=server_tls, auth=("alerts", "pw")) as receiver:
        config = smtp_config(receiver.port, starttls=True, username="alerts", password="pw")
        EmailNotifier("mail", config, ssl_context=client_tls).send(NOTE, 10.0)
        assert len(receiver.messages) == 1
        assert receiver.logins == [(b"alerts", b"pw")]
        bad = smtp_config(receiver.port, starttls=True, username="alerts", password="wrong")
        with pytest.raises(NotifyError, match="SMTP 535") as caught:
            EmailNotifier("mail", bad, ssl_context=client_tls).send(NOTE, 10.0)
        assert not caught.value.retryable
        plain = EmailNotifier("mail", smtp_config(receiver.port))
        with pytest.raises(NotifyError, match="SMTP 530") as caught:
            plain.send(NOTE, 10.0)  # the server requires STARTTLS first
        assert not caught.value.retryable
    assert len(receiver.messages) == 1


def test_email_starttls_checks_the_certificate(certificate: tuple[Path, Path]) -> None:
    server_tls, _ = contexts(certificate)
    with smtp_receiver(tls=server_tls) as receiver:
        notifier = EmailNotifier("mail", smtp_config(receiver.port, starttls=True))
        with pytest.raises(NotifyError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            notifier.send(NOTE, 10.0)  # the system's CAs do not know our self-signed one
        assert caught.value.retryable
    assert receiver.messages == []


def test_email_over_smtps(certificate: tuple[Path, Path]) -> None:
    server_tls, client_tls = contexts(certificate)
    with smtp_receiver(tls=server_tls, implicit_tls=True) as receiver:
        config = smtp_config(receiver.port, ssl=True)
        EmailNotifier("mail", config, ssl_context=client_tls).send(RESOLVED, 10.0)
    (message,) = receiver.messages
    assert message["Subject"] == "[selfreport] RESOLVED: resolved"


def test_email_temporary_refusal_is_retryable() -> None:
    with smtp_receiver() as receiver:
        receiver.refuse = "450 mailbox busy"
        with pytest.raises(NotifyError, match="SMTP 450: mailbox busy") as caught:
            EmailNotifier("mail", smtp_config(receiver.port)).send(NOTE, 10.0)
        assert caught.value.retryable
        receiver.refuse = "550 no such user"
        with pytest.raises(NotifyError, match="SMTP 550") as caught:
            EmailNotifier("mail", smtp_config(receiver.port)).send(NOTE, 10.0)
        assert not caught.value.retryable


def test_email_without_a_server_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(NotifyError, match=r"SMTP 127\.0\.0\.1") as caught:
            EmailNotifier("mail", smtp_config(port)).send(NOTE, 5.0)
    assert caught.value.retryable


def test_email_starttls_not_offered_is_not_retried() -> None:
    with smtp_receiver() as receiver:
        notifier = EmailNotifier("mail", smtp_config(receiver.port, starttls=True))
        with pytest.raises(NotifyError, match="STARTTLS") as caught:
            notifier.send(NOTE, 10.0)
    assert not caught.value.retryable


def test_build_notifiers_from_a_configuration() -> None:
    text = """
[[notifier]]
name = "ops"
kind = "webhook"
url = "http://127.0.0.1:1/hook"
secret_env = "S"
timeout = 3
[[notifier]]
name = "chat"
kind = "slack"
url = "https://127.0.0.1:1/slack"
[[notifier]]
name = "pager"
kind = "pagerduty"
routing_key_env = "K"
[[notifier]]
name = "mail"
kind = "email"
host = "127.0.0.1"
sender = "a@example.com"
recipients = ["b@example.com"]
"""
    built = build_notifiers(parse_config(text, "a.toml", {"S": "s", "K": "k"}))
    assert {name: n.kind for name, n in built.items()} == {
        "ops": "webhook",
        "chat": "slack",
        "pager": "pagerduty",
        "mail": "email",
    }
    assert isinstance(built["ops"], WebhookNotifier)
    assert built["ops"].timeout == 3.0
    with pytest.raises(ValueError, match="not an http"):
        build_notifier(NotifierConfig("x", "webhook", url="ftp://x"))


def test_https_uses_the_system_trust_store(certificate: tuple[Path, Path]) -> None:
    # No HTTPS receiver needed: the refusal of an unknown certificate shows the check is on.
    server_tls, _ = contexts(certificate)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    import threading

    def accept_once() -> None:
        conn, _ = listener.accept()
        try:
            with server_tls.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=accept_once)
    thread.start()
    try:
        with pytest.raises(NotifyError, match="CERTIFICATE_VERIFY_FAILED"):
            SlackNotifier("chat", f"https://127.0.0.1:{port}/x").send(NOTE, 10.0)
    finally:
        thread.join(10)
        listener.close()


def test_the_test_notification_says_it_is_one() -> None:
    note = make_test_notification("ops", clock=lambda: 5.0)
    assert (note.when, note.state, note.alert_key, note.created) == (
        "test",
        "test",
        "test:ops",
        5.0,
    )
    assert "ops" in note.title
