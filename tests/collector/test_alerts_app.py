"""The alert engine in a running collector: stored events, health, pages, /status, /metrics."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import pytest
from tests.collector.alerting.receivers import http_receiver
from tests.collector.alerting_parts import (
    ListOutbox,
    Outcome,
    Rule,
    WebhookOutbox,
    stored,
)
from tests.collector.conftest import Target, call, envelope, make_event
from tests.collector.test_checkins import checkin_envelope
from tests.collector.test_monitors_page import Check as UptimeEntry
from tests.conftest import FakeClock, closed_port, wait_until

import selfreport
from selfreport.collector import app as app_module
from selfreport.collector.alerting.config import CollectorConfig, parse_config
from selfreport.collector.alerting.engine import AlertEngine, engine_from_config
from selfreport.collector.alerting.model import Notification
from selfreport.collector.alerting.outbox import DEFAULT_RETRY, Outbox
from selfreport.collector.health import CheckResult
from selfreport.collector.server import CollectorServer
from selfreport.collector.storage import Storage
from selfreport.collector.store import Store

MakeServer = Callable[..., CollectorServer]


def engine_factory(rules: Sequence[Rule], outbox: Any) -> Callable[[Store], AlertEngine]:
    def build(storage: Store) -> AlertEngine:
        return AlertEngine(rules, outbox, storage=storage, interval=0.05)

    return build


def test_a_rate_alert_through_a_real_webhook_shows_everywhere(make_server: MakeServer) -> None:
    rules = [Rule("spike", "rate", threshold=2, window=600, notify=("hook",)),
             Rule("new", "new_issue", notify=("hook",))]  # fmt: skip
    with http_receiver() as hook:
        outbox = WebhookOutbox({"hook": hook.url})
        server = make_server(alerts=engine_factory(rules, outbox))
        target = Target(server)
        for _ in range(3):
            assert target.send(envelope(make_event())).status == 200
        assert wait_until(lambda: hook.count() == 2)
        # A new issue for each event (make_event's ids differ, its exception is the same: one
        # issue), and the rate over its threshold after the third: one notification each.
        assert sorted(tuple(b.values()) for b in (r.json() for r in hook.requests)) == [
            ("new", "issue:1", "firing"), ("spike", "default", "firing"),
        ]  # fmt: skip
        status = call(server.port, "GET", "/api/0/status/").json()["alerts"]
        assert {r["name"]: r["state"] for r in status["rules"]} == {"spike": "firing", "new": "ok"}
        assert status["stats"]["firing"] == 1
        page = call(server.port, "GET", "/status").text
        assert "Alert rules" in page
        assert "spike" in page
        alerts = call(server.port, "GET", "/api/0/alerts/").json()
        assert [a["subject"] for a in alerts["firing"]] == ["default"]
        assert alerts["configured"] is True
        html = call(server.port, "GET", "/alerts")
        assert html.status == 200
        assert "1 firing" in html.text
        assert "3 events in 600s" in html.text
        metrics = call(server.port, "GET", "/metrics").text
        assert "selfreport_collector_alerts_firing 1.0" in metrics
        assert 'selfreport_collector_alert_events_total{outcome="notifications"} 2.0' in metrics


def test_the_alerts_page_without_rules(target: Target) -> None:
    html = target.get("/alerts")
    assert html.status == 200
    assert "No alert rules" in html.text
    assert target.get("/api/0/alerts/").json()["configured"] is False
    assert target.get("/api/0/status/").json()["alerts"] is None


def test_health_rules_read_the_collectors_checks(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "HEALTH_EVERY", 0.0)
    outbox = ListOutbox()
    server = make_server(alerts=engine_factory([Rule("health", "health", grace=0)], outbox))
    engine = server.collector.alerts
    assert engine is not None
    ticks = engine.counts["ticks"]
    assert wait_until(lambda: engine.counts["ticks"] > ticks + 2)
    assert outbox.sent == []  # a healthy collector: nothing

    async def broken() -> CheckResult:
        return CheckResult(False, "broken on purpose")

    server.collector.health.add("broken", broken)
    assert wait_until(lambda: len(outbox.sent) == 1)
    notification = outbox.sent[0][0]
    assert (notification.subject, notification.text) == ("check:broken", "broken on purpose")
    failing = call(server.port, "GET", "/metrics").text
    assert "selfreport_collector_alerts_firing 1.0" in failing
    server.stop()
    assert engine.counts["tick_failed"] == 0


class RaisingOutbox(ListOutbox):
    """An outbox whose every put raises, as a broken notifier path would."""

    def put(self, notification: Notification, notifier_names: Sequence[str]) -> None:
        super().put(notification, notifier_names)
        raise RuntimeError("the notifier exploded")


def test_alerts_on_the_internal_project_do_not_loop_when_sending_raises(
    make_server: MakeServer,
) -> None:
    """The collector's own reports are events too: an alert about them whose sending raises
    is counted and logged inside the reporting path, so it never becomes another report."""
    outbox = RaisingOutbox()
    rule = Rule("own", "rate", project="selfreport-internal", threshold=0, window=600)
    server = make_server(self_report=True, alerts=engine_factory([rule], outbox))
    engine = server.collector.alerts
    assert engine is not None
    internal = Target(server)
    internal.project = server.internal_project
    assert internal.send(envelope(make_event())).status == 200
    assert wait_until(lambda: engine.counts["put_failed"] == 1)
    ticks = engine.counts["ticks"]
    assert wait_until(lambda: engine.counts["ticks"] > ticks + 5)
    assert selfreport.flush(10)
    assert server.storage.event_count(server.internal_project.id) == 1
    assert len(outbox.sent) == 1  # fired once; the firing alert is not fired again
    assert engine.counts["put_failed"] == 1


def _config(url: str, rules: str) -> CollectorConfig:
    text = f'[[notifier]]\nname = "hook"\nkind = "webhook"\nurl = "{url}"\n\n{rules}'
    return parse_config(text, "alerts.toml", environ={})


def test_the_self_loop_with_the_real_outbox_and_a_webhook_answering_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's loop test: a webhook answering 500 and a `self` rule pointed at the same
    webhook. Every failed try is counted; the self alert sends nothing; the log stays short."""
    caplog.set_level(logging.DEBUG)
    rules = (
        '[[alert]]\nname = "spike"\nwhen = "rate"\nthreshold = 1\nwindow = "60s"\n'
        'notify = ["hook"]\n\n'
        '[[alert]]\nname = "me"\nwhen = "self"\nmetric = "notifier_failures"\nabove = 0\n'
        'notify = ["hook"]\nrenotify = "1s"\n'
    )
    clock = FakeClock(1_000_000.0)
    with http_receiver(500) as hook, Storage(tmp_path / "db") as storage:
        engine = engine_from_config(_config(hook.url, rules), storage, clock=clock)
        outbox = engine.outbox
        assert isinstance(outbox, Outbox)
        engine.on_stored(stored([Outcome()] * 5))
        for _ in range(40):  # long enough for both of the rate's notifications to be given up
            engine.tick()
            outbox.deliver_due()
            clock.advance(700)  # past the outbox's longest backoff
        stats = outbox.stats()
    tries = hook.count()
    assert tries == 2 * (DEFAULT_RETRY.total + 1)  # firing and resolved, each tried 9 times
    assert {r.json()["rule"] for r in hook.requests} == {"spike"}
    assert stats["notifiers"]["hook"]["failures"] == tries
    assert engine.counts["notifier_failures"] == tries
    assert stats["gave_up"] == 2
    assert engine.counts["notifications"] == 2
    assert engine.counts["not_sent_no_notifier"] == 1  # the one alert about "hook"
    assert len(caplog.records) <= 6


def test_a_configured_collector_notifies_through_its_outbox(
    make_server: MakeServer,
) -> None:
    rules = '[[alert]]\nname = "new"\nwhen = "new_issue"\nnotify = ["hook"]\n'
    with http_receiver(200) as hook:
        config = _config(hook.url, rules)
        server = make_server(config=config, public_url="http://x:1")
        target = Target(server)
        assert target.send(envelope(make_event())).status == 200
        assert wait_until(lambda: hook.count() == 1)
        body = hook.requests[0].json()
        assert (body["rule"], body["when"], body["url"]) == (
            "new",
            "new_issue",
            "http://x:1/issues/1",
        )
        alerts = wait_until(
            lambda: (
                (a := call(server.port, "GET", "/api/0/alerts/").json())["deliveries"]
                and a["deliveries"][0]["status"] == "delivered"
                and a
            )
        )
        assert alerts["deliveries"][0]["notifier"] == "hook"
        assert "payload" not in alerts["deliveries"][0]
        page = call(server.port, "GET", "/alerts").text
        assert "Deliveries" in page
        assert "delivered" in page
        engine = server.collector.alerts
        server.stop()
    assert engine is not None
    assert not engine.outbox.alive  # type: ignore[attr-defined]


def test_checkin_and_uptime_rules_in_a_running_collector(make_server: MakeServer) -> None:
    """A check-in with status error fires the checkin rule; a URL nobody answers fires the
    uptime rule (the prober's own status, through the app)."""
    outbox = ListOutbox()
    rules = [Rule("crons", "checkin"), Rule("up", "uptime")]
    down = f"http://127.0.0.1:{closed_port()}/health"
    server = make_server(
        alerts=engine_factory(rules, outbox),
        uptime=[UptimeEntry(down, name="gone", interval=1.0, timeout=1.0)],
    )
    target = Target(server)
    payload = {"monitor_slug": "nightly", "status": "error", "check_in_id": uuid.uuid4().hex}
    assert target.send(checkin_envelope(payload)).status == 200
    assert wait_until(lambda: len(outbox.states()) == 2)
    assert sorted(outbox.states()) == [("monitor:nightly", "firing"), (f"url:{down}", "firing")]


def test_a_self_rule_on_ingest_latency_reads_the_pipeline_percentiles(
    make_server: MakeServer,
) -> None:
    outbox = ListOutbox()
    rule = Rule("slow", "self", metric="ingest_p99_ms", above=0.0)
    server = make_server(alerts=engine_factory([rule], outbox))
    assert Target(server).send(envelope(make_event())).status == 200
    assert wait_until(lambda: outbox.states() == [("metric:ingest_p99_ms", "firing")])


class ExplodingNotifier:
    """A notifier whose every send raises (a bug in it, not a refusal)."""

    name = "boom"
    kind = "webhook"
    timeout = 1.0

    def __init__(self) -> None:
        self.sends = 0

    def send(self, notification: Notification, timeout: float) -> None:
        self.sends += 1
        raise RuntimeError("the notifier exploded")


def test_a_new_issue_rule_on_the_internal_project_does_not_loop_when_the_notifier_raises(
    make_server: MakeServer,
) -> None:
    """The collector's own reports are events too; the notification about one is sent inside
    the reporting path, so the notifier raising never becomes another report."""
    notifier = ExplodingNotifier()
    rule = Rule("own", "new_issue", project="selfreport-internal", notify=("boom",))

    def build(storage: Store) -> AlertEngine:
        outbox = Outbox(storage, {"boom": notifier})
        engine = AlertEngine([rule], outbox, storage=storage, interval=0.05)
        outbox.on_notifier_failure = engine.on_notifier_failure
        return engine

    server = make_server(self_report=True, alerts=build)
    engine = server.collector.alerts
    assert engine is not None
    internal = Target(server)
    internal.project = server.internal_project
    assert internal.send(envelope(make_event())).status == 200
    assert wait_until(lambda: engine.counts["notifier_failures"] >= 1)
    assert selfreport.flush(10)
    assert server.storage.event_count(server.internal_project.id) == 1
    assert engine.counts["fired"] == 1  # one new issue: its own report of the failure is none
    assert notifier.sends >= 1


def test_serve_config_probes_its_uptime_entries_and_alerts(make_server: MakeServer) -> None:
    down = f"http://127.0.0.1:{closed_port()}/health"
    rules = (
        f'[[uptime]]\nurl = "{down}"\ninterval = "1s"\ntimeout = "1s"\n\n'
        '[[alert]]\nname = "down"\nwhen = "uptime"\nnotify = ["hook"]\n'
    )
    with http_receiver(200) as hook:
        server = make_server(config=_config(hook.url, rules))
        assert server.collector.uptime is not None
        assert wait_until(lambda: hook.count() == 1)
        body = hook.requests[0].json()
        assert (body["rule"], body["subject"], body["state"]) == ("down", f"url:{down}", "firing")
