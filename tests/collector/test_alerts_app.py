"""The alert engine in a running collector: stored events, health, pages, /status, /metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import pytest
from tests.collector.alerting_parts import ListOutbox, Rule, WebhookOutbox, receiver
from tests.collector.conftest import Target, call, envelope, make_event
from tests.conftest import wait_until

import selfreport
from selfreport.collector import app as app_module
from selfreport.collector.alerting.engine import AlertEngine
from selfreport.collector.alerting.model import Notification
from selfreport.collector.health import CheckResult
from selfreport.collector.server import CollectorServer
from selfreport.collector.store import Store

MakeServer = Callable[..., CollectorServer]


def engine_factory(rules: Sequence[Rule], outbox: Any) -> Callable[[Store], AlertEngine]:
    def build(storage: Store) -> AlertEngine:
        return AlertEngine(rules, outbox, storage=storage, interval=0.05)

    return build


def test_a_rate_alert_through_a_real_webhook_shows_everywhere(make_server: MakeServer) -> None:
    rules = [Rule("spike", "rate", threshold=2, window=600, notify=("hook",)),
             Rule("new", "new_issue", notify=("hook",))]  # fmt: skip
    with receiver() as hook:
        outbox = WebhookOutbox({"hook": hook.url})
        server = make_server(alerts=engine_factory(rules, outbox))
        target = Target(server)
        for _ in range(3):
            assert target.send(envelope(make_event())).status == 200
        assert wait_until(lambda: len(hook.bodies) == 1)
        assert hook.bodies[0] == {"rule": "spike", "subject": "default", "state": "firing"}
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
        assert 'selfreport_collector_alert_events_total{outcome="notifications"} 1.0' in metrics


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
