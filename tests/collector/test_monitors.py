"""Check-in monitors' schedules and states, with the time given: crontab, interval, margins."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfreport.collector.alerting.monitors import (
    CheckIn,
    CheckInError,
    Monitor,
    MonitorConfig,
    MonitorConfigError,
    evaluate_monitor,
    evaluate_monitors,
    next_expected,
    parse_checkin,
    parse_monitor_config,
)


def at(*parts: int, zone: str = "UTC") -> float:
    tz = timezone.utc if zone == "UTC" else ZoneInfo(zone)
    return datetime(*parts, tzinfo=tz).timestamp()  # type: ignore[misc]


def monitor(config: Optional[dict[str, Any]], *checkins: CheckIn, slug: str = "nightly") -> Monitor:
    parsed = parse_monitor_config(config) if config is not None else None
    return Monitor("default", slug, parsed, 0.0, tuple(checkins))


def checkin(started: float, status: str = "ok", updated: Optional[float] = None) -> CheckIn:
    return CheckIn("c" + str(started), status, started, updated or started, None, None)


HOURLY = {"schedule": {"type": "crontab", "value": "0 * * * *"}, "checkin_margin": 5}


def test_sentry_shaped_config_is_read_with_sentry_defaults() -> None:
    config = parse_monitor_config({"schedule": {"type": "crontab", "value": "*/5  *  * * *"}})
    assert config == MonitorConfig("crontab", crontab="*/5 * * * *")
    assert config.checkin_margin == 1.0
    assert config.max_runtime == 30.0
    assert config.timezone == "UTC"
    assert config.describe() == "*/5 * * * *"
    every = parse_monitor_config(
        {
            "schedule": {"type": "interval", "value": 2, "unit": "hour"},
            "checkin_margin": 10,
            "max_runtime": 90,
            "timezone": "Europe/Riga",
            "failure_issue_threshold": 3,  # a newer key: ignored, not refused
        }
    )
    assert (every.interval, every.unit, every.checkin_margin, every.max_runtime) == (
        2,
        "hour",
        10.0,
        90.0,
    )
    assert every.describe() == "every 2 hours"
    assert parse_monitor_config(every.as_dict()) == every
    assert parse_monitor_config({"schedule": "@daily"}).crontab == "0 0 * * *"
    assert (
        "(Europe/Riga)"
        in parse_monitor_config({"schedule": "0 3 * * *", "timezone": "Europe/Riga"}).describe()
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "monitor_config must be an object"),
        ({}, "schedule must be an object"),
        ({"schedule": {"type": "weekly"}}, "schedule.type"),
        ({"schedule": {"type": "crontab", "value": "61 * * * *"}}, "schedule.value '61"),
        ({"schedule": {"type": "crontab", "value": 5}}, "crontab string"),
        ({"schedule": {"type": "interval", "value": 0, "unit": "hour"}}, "integer from 1"),
        ({"schedule": {"type": "interval", "value": True, "unit": "hour"}}, "integer from 1"),
        ({"schedule": {"type": "interval", "value": 1, "unit": "fortnight"}}, "unit must be"),
        ({"schedule": "* * * * *", "checkin_margin": "5"}, "checkin_margin must be a number"),
        ({"schedule": "* * * * *", "max_runtime": -1}, "max_runtime must be between"),
        ({"schedule": "* * * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"schedule": "* * * * *", "timezone": 3}, "time zone name"),
    ],
)
def test_malformed_config_says_which_key(raw: Any, message: str) -> None:
    with pytest.raises(MonitorConfigError, match=message.replace("(", r"\(")):
        parse_monitor_config(raw)


def test_crontab_next_tick_in_the_monitors_time_zone_across_dst() -> None:
    config = parse_monitor_config({"schedule": "30 2 * * *", "timezone": "Europe/Berlin"})
    # 2026-03-29 is the spring-forward night in Berlin: 02:30 does not exist that day.
    after = at(2026, 3, 28, 2, 30, zone="Europe/Berlin")
    due = next_expected(config, after)
    assert datetime.fromtimestamp(due, ZoneInfo("Europe/Berlin")).day in (29, 30)
    utc = parse_monitor_config({"schedule": "30 2 * * *"})
    assert next_expected(utc, at(2026, 3, 28, 2, 30)) == at(2026, 3, 29, 2, 30)


def test_an_early_check_in_counts_for_the_tick_it_precedes() -> None:
    config = parse_monitor_config(HOURLY)
    assert next_expected(config, at(2026, 1, 1, 9, 59, 50)) == at(2026, 1, 1, 11)
    assert next_expected(config, at(2026, 1, 1, 10, 0, 2)) == at(2026, 1, 1, 11)


def test_interval_units_including_calendar_months() -> None:
    def due(value: int, unit: str, after: float) -> float:
        config = parse_monitor_config(
            {"schedule": {"type": "interval", "value": value, "unit": unit}}
        )
        return next_expected(config, after)

    start = at(2026, 1, 31, 12)
    assert due(15, "minute", start) == start + 900
    assert due(2, "hour", start) == start + 7200
    assert due(1, "day", start) == start + 86400
    assert due(1, "week", start) == start + 7 * 86400
    assert due(1, "month", start) == at(2026, 2, 28, 12)  # the month's last day
    assert due(1, "year", start) == at(2027, 1, 31, 12)


def test_hourly_monitor_ok_then_missed_after_the_margin() -> None:
    job = monitor(HOURLY, checkin(at(2026, 1, 1, 10, 0, 3)))
    ok = evaluate_monitor(job, at(2026, 1, 1, 11, 4, 59))
    assert (ok.state, ok.next_expected, ok.failing) == ("ok", at(2026, 1, 1, 11), False)
    missed = evaluate_monitor(job, at(2026, 1, 1, 11, 5, 1))
    assert missed.state == "missed"
    assert missed.failing
    assert missed.since == at(2026, 1, 1, 11, 5)
    assert missed.next_expected == at(2026, 1, 1, 12)
    assert missed.detail == "no check-in for 2026-01-01 11:00 UTC (margin 5 min)"
    assert missed.subject == "default/nightly"
    much_later = evaluate_monitor(job, at(2026, 1, 8, 13, 30))
    assert much_later.state == "missed"
    assert much_later.next_expected == at(2026, 1, 8, 14)


def test_monitor_recovers_when_a_check_in_arrives() -> None:
    first = checkin(at(2026, 1, 1, 10))
    second = checkin(at(2026, 1, 1, 12, 0, 1))
    assert evaluate_monitor(monitor(HOURLY, first), at(2026, 1, 1, 12, 0, 30)).state == "missed"
    state = evaluate_monitor(monitor(HOURLY, second, first), at(2026, 1, 1, 12, 0, 30))
    assert state.state == "ok"
    assert state.last_checkin == second


def test_interval_monitor_missed_and_next_expected() -> None:
    config = {"schedule": {"type": "interval", "value": 10, "unit": "minute"}, "checkin_margin": 2}
    job = monitor(config, checkin(1000.0))
    assert evaluate_monitor(job, 1000.0 + 720).state == "ok"
    missed = evaluate_monitor(job, 1000.0 + 721)
    assert (missed.state, missed.since, missed.next_expected) == ("missed", 1720.0, 2200.0)
    monthly = monitor(
        {"schedule": {"type": "interval", "value": 1, "unit": "month"}}, checkin(at(2026, 1, 1))
    )
    late = evaluate_monitor(monthly, at(2026, 3, 15))
    assert late.state == "missed"
    assert late.next_expected == at(2026, 4, 1)


def test_timezone_shifts_the_deadline() -> None:
    riga = {"schedule": "0 3 * * *", "timezone": "Europe/Riga", "checkin_margin": 1}
    job = monitor(riga, checkin(at(2026, 1, 1, 3, 0, 5, zone="Europe/Riga")))
    # 03:00 in Riga (UTC+2 in winter) is 01:00 UTC: at 02:30 UTC the next day it is missed.
    assert evaluate_monitor(job, at(2026, 1, 2, 1, 0, 59)).state == "ok"
    assert evaluate_monitor(job, at(2026, 1, 2, 1, 1, 1)).state == "missed"


def test_in_progress_longer_than_max_runtime_is_a_timeout() -> None:
    config = {"schedule": {"type": "interval", "value": 1, "unit": "day"}, "max_runtime": 10}
    running = checkin(5000.0, "in_progress")
    assert evaluate_monitor(monitor(config, running), 5000.0 + 600).detail == "in progress"
    timeout = evaluate_monitor(monitor(config, running), 5000.0 + 601)
    assert (timeout.state, timeout.since) == ("timeout", 5600.0)
    assert timeout.failing
    # Without a config: no schedule, Sentry's default max_runtime of 30 minutes.
    bare = monitor(None, running)
    assert evaluate_monitor(bare, 5000.0 + 1800).state == "ok"
    assert evaluate_monitor(bare, 5000.0 + 1801).state == "timeout"
    assert evaluate_monitor(bare, 5000.0 + 1801).schedule is None


def test_error_check_in_is_failed_until_an_ok() -> None:
    failed = checkin(100.0, "error", 130.0)
    state = evaluate_monitor(monitor(HOURLY, failed), 200.0)
    assert (state.state, state.since, state.detail) == ("failed", 130.0, "check-in error")
    assert evaluate_monitor(monitor(HOURLY, checkin(300.0), failed), 400.0).state == "ok"


def test_missed_comes_before_failed_and_pending_without_check_ins() -> None:
    failed = checkin(at(2026, 1, 1, 10), "error")
    assert evaluate_monitor(monitor(HOURLY, failed), at(2026, 1, 1, 12)).state == "missed"
    states = evaluate_monitors([monitor(HOURLY), monitor(None, checkin(1.0))], 2.0)
    assert [s.state for s in states] == ["pending", "ok"]
    assert states[0].next_expected is None
    assert not states[0].failing


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "monitor_slug": _json | st.text(max_size=200),
        "status": _json | st.sampled_from(["ok", "error", "in_progress"]),
        "check_in_id": _json | st.uuids().map(str),
        "duration": _json,
        "environment": _json,
        "monitor_config": _json
        | st.fixed_dictionaries(
            {},
            optional={
                "schedule": _json | st.sampled_from(["* * * * *", "@daily", "61 * * * *"]),
                "checkin_margin": _json,
                "max_runtime": _json,
                "timezone": _json | st.sampled_from(["UTC", "Europe/Riga", "Nowhere/Else"]),
            },
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(_json | _fields)
def test_any_json_is_a_check_in_or_a_check_in_error(value: Any) -> None:
    """What a stranger sends is a 400 with a message, never another exception (a 500)."""
    try:
        item = parse_checkin(value)
    except CheckInError as exc:
        message = str(exc)
    else:
        message = ""
    if message:  # refused, saying why
        return
    assert item.status in ("ok", "error", "in_progress")
    assert len(item.check_in_id) == 32
    if item.config is not None:
        assert next_expected(item.config, 1_700_000_000.0) > 1_700_000_000.0
