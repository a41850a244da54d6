"""Check-ins into the collector: stored per monitor (real SQLite), through a real server, from
real sentry-sdk and selfreport clients; other item types counted as dropped."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import sentry_sdk
from tests.collector.conftest import Target

import selfreport
from selfreport.collector.alerting.monitors import (
    CheckInError,
    CheckInItem,
    evaluate_monitors,
    parse_checkin,
    parse_monitor_config,
)
from selfreport.collector.server import CollectorServer
from selfreport.collector.storage import Storage

HOURLY = {"schedule": {"type": "crontab", "value": "0 * * * *"}, "checkin_margin": 5}


def item(slug: str = "nightly", status: str = "ok", **fields: Any) -> CheckInItem:
    fields.setdefault("check_in_id", uuid.uuid4().hex)
    return CheckInItem(slug=slug, status=status, **fields)


def record(storage: Storage, project_id: int, checkin: CheckInItem, at: float) -> bool:
    storage.start()  # idempotent: the writer takes check-ins
    return asyncio.run(storage.checkin_async(project_id, checkin, at))


def checkin_envelope(*checkins: dict[str, Any], extra: bytes = b"") -> bytes:
    lines = [b"{}"]
    for payload in checkins:
        body = json.dumps(payload).encode()
        lines += [json.dumps({"type": "check_in", "length": len(body)}).encode(), body]
    return b"\n".join(lines) + b"\n" + extra


def metric(target: Target, name: str, label: str) -> float:
    text = target.get("/metrics").text
    prefix = f"selfreport_collector_{name}_total{{{label}}} "
    found = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(found[0][len(prefix) :]) if found else 0.0


# --- parsing ---------------------------------------------------------------------------------


def test_parse_checkin_as_sentry_sdk_sends_it() -> None:
    dashed = str(uuid.uuid4())
    parsed = parse_checkin(
        {
            "check_in_id": dashed.upper(),
            "monitor_slug": "nightly",
            "status": "ok",
            "duration": 2,
            "environment": "prod",
            "release": "1.0",  # not kept: a monitor is not per release
            "monitor_config": HOURLY,
        }
    )
    assert parsed.check_in_id == dashed.replace("-", "")
    assert (parsed.slug, parsed.status, parsed.duration, parsed.environment) == (
        "nightly",
        "ok",
        2.0,
        "prod",
    )
    assert parsed.config == parse_monitor_config(HOURLY)
    assert len(parse_checkin({"monitor_slug": "x", "status": "in_progress"}).check_in_id) == 32


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "must be a JSON object"),
        ({"status": "ok"}, "monitor_slug is missing"),
        ({"monitor_slug": "x" * 129, "status": "ok"}, "monitor_slug must be a string of 1 to 128"),
        ({"monitor_slug": "x", "status": "missed"}, "status must be one of"),
        ({"monitor_slug": "x", "status": "ok", "check_in_id": "nope"}, "check_in_id must be"),
        ({"monitor_slug": "x", "status": "ok", "check_in_id": "-" * 36}, "check_in_id must be"),
        ({"monitor_slug": "x", "status": "ok", "duration": -1}, "duration must be"),
        ({"monitor_slug": "x", "status": "ok", "duration": True}, "duration must be"),
        ({"monitor_slug": "x", "status": "ok", "environment": ""}, "environment must be"),
        ({"monitor_slug": "x", "status": "ok", "monitor_config": {}}, "schedule must be"),
    ],
)
def test_malformed_checkins_say_which_field(payload: Any, message: str) -> None:
    with pytest.raises(CheckInError, match=message):
        parse_checkin(payload)


# --- storage ---------------------------------------------------------------------------------


def test_first_checkin_makes_the_monitor_and_one_id_is_one_checkin(storage: Storage) -> None:
    project = storage.projects()[0]
    started = item(status="in_progress", config=parse_monitor_config(HOURLY))
    assert record(storage, project.id, started, 100.0)
    (monitor,) = storage.monitors()
    assert (monitor.project, monitor.slug, monitor.created) == (project.name, "nightly", 100.0)
    assert monitor.config == parse_monitor_config(HOURLY)
    closing = item(check_in_id=started.check_in_id, duration=4.5, environment="prod")
    assert record(storage, project.id, closing, 105.0)
    # A late in_progress for the same id does not reopen it.
    assert record(storage, project.id, started, 106.0)
    (checkin,) = storage.monitors()[0].checkins
    assert (checkin.status, checkin.started, checkin.updated) == ("ok", 100.0, 106.0)
    assert (checkin.duration, checkin.environment) == (4.5, "prod")
    assert storage.monitors(project_id=project.id + 100) == []


def test_config_is_replaced_by_a_later_one_and_kept_without(storage: Storage) -> None:
    project_id = storage.projects()[0].id
    record(storage, project_id, item(config=parse_monitor_config(HOURLY)), 1.0)
    record(storage, project_id, item(), 2.0)
    assert storage.monitors()[0].config == parse_monitor_config(HOURLY)
    daily = parse_monitor_config({"schedule": "@daily", "timezone": "Europe/Riga"})
    record(storage, project_id, item(config=daily), 3.0)
    assert storage.monitors()[0].config == daily


def test_only_the_newest_checkins_are_kept_and_read_newest_first(storage: Storage) -> None:
    storage.checkins_per_monitor = 3
    project_id = storage.projects()[0].id
    for at in range(10):
        record(storage, project_id, item(), float(at))
    record(storage, project_id, item("other"), 50.0)
    nightly = storage.monitors(checkins=10)[0]
    assert [c.started for c in nightly.checkins] == [9.0, 8.0, 7.0]
    assert [c.started for c in storage.monitors()[0].checkins] == [9.0]
    with closing(sqlite3.connect(storage.path)) as conn, conn:
        assert conn.execute("SELECT count(*) FROM checkins").fetchone()[0] == 4


def test_monitors_per_project_are_bounded(storage: Storage) -> None:
    storage.max_monitors_per_project = 2
    default, internal = storage.projects()
    assert record(storage, default.id, item("a"), 1.0)
    assert record(storage, default.id, item("b"), 1.0)
    assert not record(storage, default.id, item("c"), 1.0)
    assert record(storage, default.id, item("a"), 2.0)  # known monitors still take check-ins
    assert record(storage, internal.id, item("c"), 1.0)  # the limit is per project
    assert sorted(m.slug for m in storage.monitors()) == ["a", "b", "c"]


def test_an_older_database_gets_the_monitor_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    Storage(path).close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE checkins")
        conn.execute("DROP TABLE monitors")
    reopened = Storage(path)
    try:
        reopened.ensure_defaults()
        assert reopened.monitors() == []
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE meta SET value = value")  # still writable, same schema
    finally:
        reopened.close()


def test_a_stored_config_no_longer_readable_is_none(storage: Storage) -> None:
    project_id = storage.projects()[0].id
    record(storage, project_id, item(config=parse_monitor_config(HOURLY)), 1.0)
    with closing(sqlite3.connect(storage.path)) as conn, conn:
        conn.execute("UPDATE monitors SET config = '{\"schedule\": 5}'")
    assert storage.monitors()[0].config is None


# --- ingestion through a real server ---------------------------------------------------------


def test_envelope_with_only_a_checkin_is_stored(target: Target) -> None:
    check_in_id = uuid.uuid4().hex
    payload = {"check_in_id": check_in_id, "monitor_slug": "backup", "status": "in_progress"}
    reply = target.send(checkin_envelope({**payload, "monitor_config": HOURLY}))
    assert reply.status == 200, reply.text
    reply = target.send(checkin_envelope({**payload, "status": "error", "duration": 3}))
    assert reply.status == 200, reply.text
    (monitor,) = target.server.storage.monitors()
    assert monitor.slug == "backup"
    assert monitor.checkins[0].status == "error"
    assert target.server.storage.event_count() == 0
    assert metric(target, "checkins", 'outcome="stored"') == 2
    (state,) = evaluate_monitors(target.server.storage.monitors(), monitor.checkins[0].updated)
    assert state.state == "failed"


def test_a_malformed_checkin_is_400_and_nothing_of_the_envelope_is_stored(
    target: Target, make_event: Callable[..., dict[str, Any]]
) -> None:
    good = {"monitor_slug": "a", "status": "ok"}
    bad = {"monitor_slug": "b", "status": "ok", "monitor_config": {"schedule": "99 * * * *"}}
    reply = target.send(checkin_envelope(good, bad))
    assert reply.status == 400
    assert "item 2 (check_in): monitor_config.schedule.value '99 * * * *'" in reply.json()["detail"]
    assert target.server.storage.monitors() == []
    reply = target.send(b'{}\n{"type":"check_in","length":3}\n{x}\n')
    assert reply.status == 400
    assert "item 1 (check_in) is not valid JSON" in reply.json()["detail"]
    deep = b"[" * 200 + b"]" * 200
    reply = target.send(b'{}\n{"type":"check_in","length":%d}\n%s\n' % (len(deep), deep))
    assert reply.status == 400


def test_a_bad_event_beside_a_checkin_stores_neither(target: Target) -> None:
    checkin = checkin_envelope({"monitor_slug": "a", "status": "ok"})
    body = checkin + b'{"type":"event","length":2}\n[]\n'
    reply = target.send(body)
    assert reply.status == 400
    assert "item 2 (event) must be a JSON object" in reply.json()["detail"]
    assert target.server.storage.monitors() == []


def test_the_monitor_limit_is_counted(make_server: Callable[..., CollectorServer]) -> None:
    target = Target(make_server())
    target.server.storage.max_monitors_per_project = 1  # type: ignore[attr-defined]
    assert target.send(checkin_envelope({"monitor_slug": "a", "status": "ok"})).status == 200
    assert target.send(checkin_envelope({"monitor_slug": "b", "status": "ok"})).status == 200
    assert [m.slug for m in target.server.storage.monitors()] == ["a"]
    assert metric(target, "checkins", 'outcome="monitor_limit"') == 1


def test_other_item_types_are_counted_as_dropped_by_type(target: Target) -> None:
    body = b'{"event_id":"' + b"a" * 32 + b'"}\n'
    body += b'{"type":"session","length":2}\n{}\n'
    body += b'{"type":"attachment","length":5,"filename":"x.txt"}\nhello\n'
    body += b'{"type":"something_new_2031"}\n{"what":1}\n'
    body += b'{"type":"session","length":2}\n{}\n'
    reply = target.send(body)
    assert reply.status == 200, reply.text
    assert metric(target, "items_dropped", 'type="session"') == 2
    assert metric(target, "items_dropped", 'type="attachment"') == 1
    assert metric(target, "items_dropped", 'type="other"') == 1


def test_full_write_queue_is_503_for_checkins(target: Target) -> None:
    storage = target.server.storage
    storage.max_queue = 0  # type: ignore[misc]
    try:
        reply = target.send(checkin_envelope({"monitor_slug": "a", "status": "ok"}))
    finally:
        storage.max_queue = 10_000  # type: ignore[misc]
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"


def test_stopped_storage_is_503_for_checkins(target: Target) -> None:
    target.server.storage.close()
    reply = target.send(checkin_envelope({"monitor_slug": "a", "status": "ok"}))
    assert reply.status == 503
    assert reply.headers["retry-after"] == "5"


# --- real clients ----------------------------------------------------------------------------


def dsn(target: Target) -> str:
    return target.project.dsn(f"http://127.0.0.1:{target.port}")


def test_sentry_sdk_capture_checkin_and_monitor_against_the_collector(target: Target) -> None:
    sentry_sdk.init(dsn(target), default_integrations=False, environment="prod")
    try:
        check_in_id: Optional[str] = sentry_sdk.crons.capture_checkin(
            "sentry-job", status="in_progress", monitor_config=HOURLY
        )
        sentry_sdk.crons.capture_checkin("sentry-job", check_in_id=check_in_id, status="ok")
        with sentry_sdk.monitor("sentry-cm"):
            pass
        sentry_sdk.flush(10)
    finally:
        sentry_sdk.get_client().close()
    monitors = {m.slug: m for m in target.server.storage.monitors()}
    assert set(monitors) == {"sentry-cm", "sentry-job"}
    job = monitors["sentry-job"]
    assert job.config == parse_monitor_config(HOURLY)
    assert (job.checkins[0].check_in_id, job.checkins[0].status) == (check_in_id, "ok")
    assert job.checkins[0].environment == "prod"
    assert monitors["sentry-cm"].checkins[0].status == "ok"


def test_selfreport_checkin_and_monitor_against_the_collector(target: Target) -> None:
    selfreport.init(dsn(target), install_hooks=False, logging_level=None)
    try:
        with selfreport.monitor("selfreport-job", monitor_config=HOURLY):
            pass
        selfreport.checkin("heartbeat", "ok")
        assert selfreport.flush(10)
        stats = selfreport.stats()
    finally:
        selfreport.close()
    assert (stats["checkins"], stats["sent"], stats["send_failed"]) == (3, 3, 0)
    monitors = {m.slug: m for m in target.server.storage.monitors(checkins=5)}
    assert [c.status for c in monitors["selfreport-job"].checkins] == ["ok"]
    assert monitors["selfreport-job"].checkins[0].duration is not None
    assert monitors["heartbeat"].config is None
