"""The alert engine: each rule kind, the lifecycle, the storm, restarts, and the self-loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.collector.alerting.receivers import http_receiver
from tests.collector.alerting_parts import (
    INTERNAL,
    ListOutbox,
    Outcome,
    Rule,
    WebhookOutbox,
    stored,
)
from tests.conftest import FakeClock, wait_until

from selfreport.collector.alerting.engine import INSTANT_BUDGET, AlertEngine, Sources
from selfreport.collector.storage import Storage
from selfreport.collector.store import StorageError


def engine_of(*rules: Rule, **options: object) -> tuple[AlertEngine, ListOutbox, FakeClock]:
    outbox = ListOutbox()
    clock = FakeClock(1_000_000.0)
    engine = AlertEngine(list(rules), outbox, clock=clock, public_url="http://c:1", **options)  # type: ignore[arg-type]
    return engine, outbox, clock


def test_new_issue_fires_once_with_a_link_to_the_issue() -> None:
    engine, outbox, _ = engine_of(Rule("new", "new_issue"))
    engine.on_stored(stored([Outcome(issue_id=7, new_issue=True), Outcome(issue_id=7)]))
    engine.on_stored(stored([Outcome(issue_id=7)]))
    engine.tick()
    engine.tick()
    assert len(outbox.sent) == 1
    notification, names = outbox.sent[0]
    assert names == ["ops"]
    assert (notification.when, notification.state, notification.subject) == (
        "new_issue", "firing", "issue:7",
    )  # fmt: skip
    assert notification.url == "http://c:1/issues/7"
    assert notification.alert_key == "new:issue:7"
    assert "ValueError: boom" in notification.title
    assert engine.stats()["firing"] == 0  # instant: nothing stays firing


def test_regression_fires_for_each_regression_and_filters_level_and_project() -> None:
    engine, outbox, clock = engine_of(
        Rule("back", "regression", level="error"), Rule("other", "regression", project="x")
    )
    engine.on_stored(stored([Outcome(regressed=True, level="warning")]))
    engine.on_stored(stored([Outcome(regressed=True, level="fatal")]))
    engine.tick()
    clock.advance(10)
    engine.on_stored(stored([Outcome(regressed=True)]))
    engine.on_stored(stored([Outcome(regressed=True, stored=False)]))  # a duplicate event
    engine.tick()
    assert [(n.rule, n.state) for n, _ in outbox.sent] == [("back", "firing")] * 2


def test_a_storm_of_100000_events_is_one_notification_then_one_resolve() -> None:
    engine, outbox, clock = engine_of(
        Rule("spike", "rate", threshold=100, window=60), Rule("new", "new_issue")
    )
    first = True
    for _ in range(1000):
        engine.on_stored(stored([Outcome(new_issue=first)] + [Outcome()] * 99))
        first = False
        clock.advance(0.01)
        engine.tick()
    assert engine.counts["ticks"] == 1000
    assert sorted(outbox.states()) == [("default", "firing"), ("issue:1", "firing")]
    spike = next(n for n, _ in outbox.sent if n.rule == "spike")
    assert spike.count is not None
    assert spike.count > 100
    clock.advance(61)
    engine.tick()
    assert outbox.states()[-1] == ("default", "resolved")
    assert len(outbox.sent) == 3
    assert engine.stats()["firing"] == 0


def test_rate_renotifies_at_most_every_renotify_while_firing() -> None:
    engine, outbox, clock = engine_of(Rule("spike", "rate", threshold=1, window=60, renotify=300))
    for _ in range(120):  # ten minutes, an event every five seconds
        engine.on_stored(stored([Outcome()] * 2))
        engine.tick()
        clock.advance(5)
    assert outbox.states() == [("default", "firing")] * 2  # at 0 s and at 300 s


def test_rate_per_issue_has_a_subject_per_issue() -> None:
    engine, outbox, _ = engine_of(Rule("hot", "rate", threshold=2, window=60, per="issue"))
    engine.on_stored(stored([Outcome(issue_id=1)] * 3 + [Outcome(issue_id=2)] * 2))
    engine.tick()
    assert outbox.states() == [("default:issue:1", "firing")]
    assert "on issue 1" in outbox.sent[0][0].title


def test_rate_with_ratio_compares_with_the_baseline() -> None:
    rule = Rule("x5", "rate", threshold=5, window=60, ratio=5.0, baseline=600)
    engine, outbox, clock = engine_of(rule)
    engine.on_stored(stored([Outcome()] * 60))
    engine.tick()
    assert outbox.sent == []  # no baseline yet: a ratio cannot be told
    for _ in range(12):  # a steady 10 a minute for twelve minutes
        clock.advance(60)
        engine.on_stored(stored([Outcome()] * 10))
        engine.tick()
    assert outbox.sent == []  # above the threshold, but not five times the baseline
    engine.on_stored(stored([Outcome()] * 60))
    engine.tick()
    assert outbox.states() == [("default", "firing")]
    assert outbox.sent[0][0].details["ratio"] >= 5


def test_rate_alerts_do_not_resolve_before_a_window_after_a_restart(tmp_path: Path) -> None:
    rule = Rule("spike", "rate", threshold=1, window=60)
    with Storage(tmp_path / "db") as storage:
        engine, outbox, clock = engine_of(rule, storage=storage)
        engine.on_stored(stored([Outcome()] * 5))
        engine.tick()
        assert outbox.states() == [("default", "firing")]
        again, outbox2, clock2 = engine_of(rule, storage=storage)
        clock2.now = clock.now + 1
        again._load()
        again.tick()  # knows nothing of the last minute's events: keeps the alert
        assert outbox2.sent == []
        assert again.stats()["firing"] == 1
        clock2.advance(60)
        again.tick()
        assert outbox2.states() == [("default", "resolved")]
        assert storage.alerts(firing_only=True) == []
        assert [a.state for a in storage.alerts()] == ["resolved"]


def test_firing_alerts_survive_a_restart_and_are_not_fired_again(tmp_path: Path) -> None:
    rule = Rule("disk", "health", check="disk_space")
    results = {"disk_space": (False, "3 MB free"), "writer_alive": (False, "x")}
    sources = Sources(health=lambda: results)
    with Storage(tmp_path / "db") as storage:
        engine, outbox, _ = engine_of(rule, storage=storage, sources=sources)
        engine.tick()
        assert outbox.states() == [("check:disk_space", "firing")]
        again, outbox2, _ = engine_of(rule, storage=storage, sources=sources)
        again._load()
        again.tick()
        assert outbox2.sent == []
        results["disk_space"] = (True, "9 GB free")
        again.tick()
        assert outbox2.states() == [("check:disk_space", "resolved")]


def test_health_waits_for_the_grace_period() -> None:
    results = {"storage_writable": (False, "locked")}
    rule = Rule("health", "health", grace=30)
    engine, outbox, clock = engine_of(rule, sources=Sources(health=lambda: results))
    engine.tick()
    clock.advance(29)
    engine.tick()
    results["storage_writable"] = (True, "")  # a blip shorter than the grace: nothing
    engine.tick()
    results["storage_writable"] = (False, "locked")
    engine.tick()
    clock.advance(30)
    engine.tick()
    assert outbox.states() == [("check:storage_writable", "firing")]
    assert outbox.sent[0][0].text == "locked"


@dataclass
class Monitor:
    slug: str
    state: str
    project: str = "default"
    detail: str = ""

    @property
    def failing(self) -> bool:
        return self.state in ("missed", "timeout", "failed")


@dataclass
class Check:
    url: str
    consecutive_failures: int
    down: bool = False


def test_checkin_and_uptime_fire_and_resolve() -> None:
    monitors = [Monitor("nightly", "missed", detail="no check-in"), Monitor("hourly", "pending")]
    checks = [Check("http://a/health", 2), Check("http://b/health", 5), Check("http://c", 1, True)]
    engine, outbox, _ = engine_of(
        Rule("crons", "checkin"),
        Rule("one", "checkin", monitor="hourly"),
        Rule("up", "uptime", consecutive=3, url="http://b/health"),
        Rule("c", "uptime", url="http://c"),
        sources=Sources(monitors=lambda now: monitors, uptime=lambda: checks),
    )
    engine.tick()
    assert sorted(outbox.states()) == [
        ("monitor:nightly", "firing"), ("url:http://b/health", "firing"),
        ("url:http://c", "firing"),
    ]  # fmt: skip
    assert outbox.sent[0][0].text == "no check-in"
    monitors[0] = Monitor("nightly", "ok")
    checks[1] = Check("http://b/health", 0)
    checks[2] = Check("http://c", 0)
    engine.tick()
    assert sorted(outbox.states()[3:]) == [
        ("monitor:nightly", "resolved"), ("url:http://b/health", "resolved"),
        ("url:http://c", "resolved"),
    ]  # fmt: skip


def test_rules_without_their_source_stay_idle() -> None:
    rules = [Rule(k, k) for k in ("health", "checkin", "uptime")]
    engine, outbox, _ = engine_of(*rules, Rule("m", "self", metric="ingest_p99_ms"))
    engine.tick()
    assert outbox.sent == []
    assert engine.counts["tick_failed"] == 0


def test_self_counters_fire_on_growth_within_the_window() -> None:
    stats = {"dropped_reentrant": 5, "send_failed": 0, "dropped_queue_full": 0}
    rule = Rule("me", "self", window=60, notify=("ops",))
    engine, outbox, clock = engine_of(rule, sources=Sources(reporter_stats=lambda: stats))
    engine.tick()  # the first sample: no growth yet
    assert outbox.sent == []
    stats["dropped_reentrant"] = 7
    clock.advance(1)
    engine.tick()
    assert outbox.states() == [("metric:dropped_reentrant", "firing")]
    clock.advance(61)
    engine.tick()
    assert outbox.states()[-1] == ("metric:dropped_reentrant", "resolved")


def test_self_gauges_fire_above_their_value() -> None:
    forwarding = {"waiting": 10, "spool_size": 3}
    engine, outbox, _ = engine_of(
        Rule("backlog", "self", metric="forward_backlog", above=100),
        Rule("spool", "self", metric="spool_bytes", above=1),
        Rule("slow", "self", metric="ingest_p99_ms", above=50),
        sources=Sources(forwarding_stats=lambda: forwarding, ingest_p99_ms=lambda: 80.0),
    )
    engine.tick()
    forwarding["waiting"] = 101
    engine.tick()
    assert sorted(outbox.states()) == [
        ("metric:forward_backlog", "firing"), ("metric:ingest_p99_ms", "firing"),
        ("metric:spool_bytes", "firing"),
    ]  # fmt: skip


def test_a_failing_notifier_is_never_told_about_itself() -> None:
    engine, outbox, _ = engine_of(Rule("me", "self", notify=("ops", "pager")))
    outbox.failing_now["pager"] = "HTTP 500"
    engine.tick()
    engine.tick()
    assert [(n.subject, names) for n, names in outbox.sent] == [("notifier:pager", ["ops"])]
    outbox.failing_now.clear()
    engine.tick()
    assert outbox.states()[-1] == ("notifier:pager", "resolved")


def test_a_failing_notifier_alerts_once_however_long_it_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, outbox, clock = engine_of(Rule("me", "self", notify=("ops",), renotify=60))
    outbox.failing_now["ops"] = "HTTP 500"
    caplog.set_level(logging.WARNING, "selfreport")
    for _ in range(100):
        engine.tick()
        clock.advance(3600)
    assert outbox.sent == []  # its only notifier is the failing one: logged, shown, not sent
    assert engine.counts["not_sent_no_notifier"] == 1
    assert len([r for r in caplog.records if "no notifier" in r.getMessage()]) == 1
    assert engine.rule_states()[0]["state"] == "firing"


def test_the_self_loop_a_webhook_answering_500_and_a_self_rule_through_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Explicit loop test: every failure is counted, the self alert adds no notification."""
    caplog.set_level(logging.DEBUG, "selfreport")
    with http_receiver(500) as hook:
        outbox = WebhookOutbox({"hook": hook.url}, attempts=3)
        clock = FakeClock(1_000_000.0)
        engine = AlertEngine(
            [Rule("spike", "rate", threshold=1, window=60, notify=("hook",)),
             Rule("me", "self", notify=("hook",), renotify=1)],
            outbox, clock=clock,
        )  # fmt: skip
        outbox.on_notifier_failure = engine.on_notifier_failure
        engine.on_stored(stored([Outcome()] * 5))
        for _ in range(50):
            engine.tick()
            clock.advance(30)
    # The rate alert's two notifications (firing, resolved), each tried three times: that
    # is all the webhook ever saw, and all the failures counted.
    bodies = [request.json() for request in hook.requests]
    assert [(b["subject"], b["state"]) for b in bodies] == [("default", "firing")] * 3 + [
        ("default", "resolved")
    ] * 3
    assert outbox.failures == 6
    assert engine.counts["notifier_failures"] == 6
    assert engine.counts["notifications"] == 2  # none about "hook"
    assert engine.counts["not_sent_no_notifier"] == 1  # the one self alert, logged once
    assert len(caplog.records) <= 2


def test_new_issues_beyond_the_budget_are_summed_up_in_one_notification() -> None:
    engine, outbox, clock = engine_of(Rule("new", "new_issue"))
    engine.on_stored(stored([Outcome(issue_id=i, new_issue=True) for i in range(25)]))
    engine.tick()
    assert len(outbox.sent) == INSTANT_BUDGET
    clock.advance(61)
    engine.tick()
    assert len(outbox.sent) == INSTANT_BUDGET + 1
    summary = outbox.sent[-1][0]
    assert summary.count == 25 - INSTANT_BUDGET
    assert "held back" in summary.title


def test_the_thread_wakes_for_a_new_issue_and_closes(tmp_path: Path) -> None:
    outbox = ListOutbox()
    engine = AlertEngine([Rule("new", "new_issue")], outbox, interval=3600).start()
    assert engine.start() is engine
    try:
        engine.on_stored(stored([Outcome(new_issue=True)], INTERNAL))
        assert wait_until(lambda: len(outbox.sent) == 1)
    finally:
        engine.close()
    assert outbox.sent[0][0].project == "selfreport-internal"


class BrokenOutbox(ListOutbox):
    def put(self, notification: object, notifier_names: object) -> None:
        raise StorageError("disk I/O error")


class BrokenStore:
    def save_alert(self, alert: object) -> None:
        raise StorageError("database is locked")

    def alerts(self, *, firing_only: bool = False, limit: int = 200) -> list[object]:
        raise StorageError("database is locked")


def test_outbox_and_storage_failures_are_counted_not_raised() -> None:
    storage = BrokenStore()
    clock = FakeClock()
    engine = AlertEngine(
        [Rule("new", "new_issue")],
        BrokenOutbox(),
        storage=storage,
        clock=clock,  # type: ignore[arg-type]
    ).start()
    engine.close()
    engine.on_stored(stored([Outcome(new_issue=True)]))
    engine.tick()
    assert engine.counts["put_failed"] == 1
    assert engine.counts["save_failed"] == 1


def test_a_failing_source_is_counted_and_the_engine_goes_on() -> None:
    def broken() -> dict[str, tuple[bool, str]]:
        raise RuntimeError("no")

    engine = AlertEngine([Rule("h", "health")], ListOutbox(), sources=Sources(health=broken))
    engine.interval = 0.01
    engine.start()
    try:
        assert wait_until(lambda: engine.counts["tick_failed"] >= 2)
    finally:
        engine.close()


def test_alerts_of_rules_no_longer_configured_resolve_quietly(tmp_path: Path) -> None:
    with Storage(tmp_path / "db") as storage:
        results = {"a": (False, "")}
        engine, _, _ = engine_of(
            Rule("h", "health"), storage=storage, sources=Sources(health=lambda: results)
        )
        engine.tick()
        again, outbox, _ = engine_of(storage=storage)
        again._load()
        again.tick()
        assert outbox.sent == []
        assert storage.alerts(firing_only=True) == []


def test_a_full_inbox_drops_the_oldest_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    from selfreport.collector.alerting import engine as module

    monkeypatch.setattr(module, "MAX_INBOX", 3)
    engine, _, _ = engine_of(Rule("spike", "rate", threshold=1, window=60))
    for _ in range(5):
        engine.on_stored(stored([Outcome()]))
    assert engine.stats()["inbox"] == 3
    assert engine.counts["inbox_dropped"] == 2


def test_rule_states_name_what_fires() -> None:
    results = {"disk_space": (False, "low")}
    engine, _, _ = engine_of(Rule("h", "health"), Rule("n", "new_issue"),
                             sources=Sources(health=lambda: results))  # fmt: skip
    engine.tick()
    states = {s["name"]: s for s in engine.rule_states()}
    assert states["h"]["state"] == "firing"
    assert states["n"]["state"] == "ok"
    assert states["h"]["firing"][0]["subject"] == "check:disk_space"


def test_a_notifier_failures_rule_watches_only_notifiers() -> None:
    stats = {"dropped_reentrant": 0}
    engine, outbox, clock = engine_of(
        Rule("n", "self", metric="notifier_failures", notify=("ops", "pager")),
        sources=Sources(reporter_stats=lambda: stats),
    )
    engine.tick()
    stats["dropped_reentrant"] = 9
    engine.on_notifier_failure("ops", RuntimeError("HTTP 500"))
    outbox.failing_now["ops"] = "HTTP 500"
    clock.advance(1)
    engine.tick()
    assert [(n.subject, names) for n, names in outbox.sent] == [("notifier:ops", ["pager"])]
    assert engine.notifier_failures == {"ops": "HTTP 500"}
    engine.on_notifier_recovery("ops")
    assert engine.notifier_failures == {}


def test_events_on_ignored_issues_count_for_no_rule() -> None:
    engine, outbox, _ = engine_of(Rule("spike", "rate", threshold=1, window=60))
    engine.on_stored(stored([Outcome(ignored=True)] * 5 + [Outcome()]))
    engine.tick()
    assert outbox.sent == []
