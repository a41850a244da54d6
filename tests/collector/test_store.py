"""The Store contract: what every storage backend of the collector must do, used through the
protocol only (today's one backend: SQLite). A new backend adds itself to BACKENDS."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from selfreport.collector.alerting.monitors import CheckInItem, parse_monitor_config
from selfreport.collector.events import PreparedEvent, prepare_event
from selfreport.collector.storage import SqliteStorage
from selfreport.collector.store import (
    INTERNAL_PROJECT,
    AlertRecord,
    ApiToken,
    OutboxEntry,
    StorageError,
    Store,
    User,
)

NOW = time.time()


def _sqlite(directory: Path, **options: Any) -> Store:
    # The writer's own retention by count and age waits an hour (these tests call
    # apply_retention), not one pass at start: what it deletes is then what the test says.
    store = SqliteStorage(directory / "selfreport.db", retention_interval=3600, **options)
    store.last_retention = options.get("clock", time.time)()
    return store


# name -> factory(directory, **options): a Store not started yet, keeping its data in
# ``directory``. Options every backend takes: max_events_per_project, max_age_days,
# max_storage_bytes, clock.
BACKENDS: dict[str, Callable[..., Store]] = {"sqlite": _sqlite}

OpenStore = Callable[..., Store]


@pytest.fixture(params=sorted(BACKENDS))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens stores of the backend under test (in a directory of their own unless given
    one); every one is closed afterwards."""
    opened: list[Store] = []

    def open_(directory: Optional[Path] = None, **options: Any) -> Store:
        store = BACKENDS[request.param](directory or tmp_path / f"store{len(opened)}", **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: OpenStore) -> Store:
    """A started store with its default and internal projects (ids 1 and 2)."""
    store = open_store()
    store.ensure_defaults()
    return store.start()


def event(received: float = 1000.0, **fields: Any) -> PreparedEvent:
    """A small event (a ValueError unless told otherwise), ``received`` seconds from now."""
    payload: dict[str, Any] = {
        "event_id": uuid.uuid4().hex,
        "level": "error",
        "exception": {
            "values": [
                {
                    "type": "ValueError",
                    "value": "bad input",
                    "stacktrace": {
                        "frames": [{"module": "app.views", "function": "handle", "in_app": True}]
                    },
                }
            ]
        },
    }
    payload.update(fields)
    return prepare_event(payload, received=NOW + received)


def message(text: str, received: float = 1000.0, **fields: Any) -> PreparedEvent:
    return event(received, exception=None, message=text, **fields)


# --- projects and keys --------------------------------------------------------------------------


def test_projects_and_their_keys(open_store: OpenStore) -> None:
    store = open_store()
    assert store.created
    default, internal = store.ensure_defaults()
    assert store.ensure_defaults() == (default, internal)  # idempotent
    assert (default.name, default.internal) == ("default", False)
    assert (internal.name, internal.internal) == (INTERNAL_PROJECT, True)
    shop = store.create_project("  shop ")
    assert shop.name == "shop"
    assert not shop.internal
    assert len({default.public_key, internal.public_key, shop.public_key}) == 3
    assert store.projects() == [default, internal, shop]
    assert store.keys() == {p.public_key: p.id for p in (default, internal, shop)}
    assert shop.dsn("http://127.0.0.1:8000/") == f"http://{shop.public_key}@127.0.0.1:8000/3"
    with pytest.raises(ValueError, match="already exists"):
        store.create_project("shop")
    for bad in ("", "   ", "x" * 101, "tab\there"):
        with pytest.raises(ValueError, match="1 to 100 printable"):
            store.create_project(bad)


@pytest.mark.asyncio
async def test_what_was_acknowledged_is_there_after_reopening(
    open_store: OpenStore, tmp_path: Path
) -> None:
    first = open_store(tmp_path / "kept")
    projects = first.ensure_defaults()
    stored = event()
    first.start()
    assert await first.store_async(1, [stored]) == [True]
    first.close()
    again = open_store(tmp_path / "kept")
    assert not again.created
    assert again.ensure_defaults() == projects
    found = again.event(1, stored.event_id)
    assert found is not None
    assert json.loads(found.payload)["event_id"] == stored.event_id


# --- storing: grouping, dedupe, reads -----------------------------------------------------------


@pytest.mark.asyncio
async def test_events_group_into_issues(store: Store) -> None:
    first = event(1000.0, environment="prod", release="1.0")
    second = event(2000.0, environment="staging", level="warning")
    other = message("disk almost full", 1500.0)
    assert await store.store_async(1, [first, second]) == [True, True]
    assert await store.store_async(1, [other]) == [True]
    by_title = {i.title: i for i in store.issues(project_id=1)}
    grouped = by_title["ValueError: bad input"]
    assert grouped.project == "default"
    assert grouped.times_seen == 2
    assert (grouped.first_seen, grouped.last_seen) == (NOW + 1000.0, NOW + 2000.0)
    assert (grouped.level, grouped.environment, grouped.release) == ("warning", "staging", "1.0")
    assert grouped.culprit == "app.views in handle"
    assert grouped.last_event_id == second.event_id
    assert store.issue(grouped.id) == grouped
    assert store.issue(9999) is None
    listed = store.events(grouped.id)
    assert [e.event_id for e in listed] == [second.event_id, first.event_id]  # newest first
    assert json.loads(listed[0].payload)["event_id"] == second.event_id
    assert [e.payload for e in store.events(grouped.id, payloads=False)] == ["", ""]
    assert len(store.events(grouped.id, limit=1)) == 1
    found = store.event(1, first.event_id)
    assert found is not None
    assert (found.issue_id, found.environment, found.release) == (grouped.id, "prod", "1.0")
    assert store.event(2, first.event_id) is None  # event ids are per project
    assert store.event(1, uuid.uuid4().hex) is None
    assert (store.event_count(), store.event_count(1), store.event_count(2)) == (3, 3, 0)
    assert store.environments() == ["prod", "staging"]


@pytest.mark.asyncio
async def test_events_are_deduplicated_by_event_id_per_project(store: Store) -> None:
    once = event()
    assert await store.store_async(1, [once]) == [True]
    assert await store.store_async(1, [once, once]) == [False, False]
    assert await store.store_async(2, [once]) == [True]
    assert [i.times_seen for i in store.issues(project_id=1)] == [1]
    assert store.event_count() == 2


@pytest.mark.asyncio
async def test_repeats_folded_by_the_sdk_count_in_the_issue(store: Store) -> None:
    await store.store_async(1, [event(extra={"selfreport_repeats": 41})])
    assert store.issues()[0].times_seen == 42


@pytest.mark.asyncio
async def test_issues_are_filtered_searched_sorted_and_paged(store: Store) -> None:
    await store.store_async(1, [event(1.0, environment="prod")])
    await store.store_async(1, [message("50% off_sale", 2.0, level="info")])
    await store.store_async(2, [message("quota exceeded", 3.0, level="warning")])
    await store.store_async(1, [event(4.0)])  # the ValueError again: seen last, and most

    def titles(**filters: Any) -> list[str]:
        return [i.title for i in store.issues(**filters)]

    assert titles() == ["ValueError: bad input", "quota exceeded", "50% off_sale"]
    assert titles(sort="first_seen") == ["quota exceeded", "50% off_sale", "ValueError: bad input"]
    assert titles(sort="count")[0] == "ValueError: bad input"
    assert titles(project_id=2) == ["quota exceeded"]
    assert titles(level="info") == ["50% off_sale"]
    assert titles(environment="prod") == ["ValueError: bad input"]
    assert titles(query="QUOTA") == ["quota exceeded"]  # case-insensitive, like the pages
    assert titles(query="%") == ["50% off_sale"]  # wildcards are matched literally
    assert titles(query="_") == ["50% off_sale"]
    assert titles(query="app.views") == ["ValueError: bad input"]  # the culprit too
    assert titles(limit=1, offset=1) == ["quota exceeded"]
    assert titles(limit=0) == []
    assert titles(project_id=2, level="info") == []


# --- state for health, metrics and the status page ---------------------------------------------


@pytest.mark.asyncio
async def test_the_writer_state_and_the_probe(open_store: OpenStore) -> None:
    store = open_store()
    store.ensure_defaults()
    with pytest.raises(StorageError):  # not started: no writer takes it
        await store.store_async(1, [event()])
    assert not store.writer_alive
    store.start()
    assert store.start() is store  # idempotent
    assert isinstance(store.probe().result(10), float)
    assert store.writer_alive
    assert (store.writer_restarts, store.writer_last_error, store.writer_failing) == (0, None, 0)
    assert store.writer_last_error_at is None
    assert store.queue_size == 0 < store.max_queue
    assert store.deleted_for_space == 0
    assert store.max_storage_bytes is None
    assert store.warning is None
    assert store.path.parent.is_dir()  # its folder: where free disk space is measured
    assert store.size_bytes() > 0


@pytest.mark.asyncio
async def test_close_finishes_and_then_refuses(open_store: OpenStore) -> None:
    store = open_store()
    store.ensure_defaults()
    store.start()
    pending = asyncio.ensure_future(store.store_async(1, [event()]))
    await asyncio.sleep(0)  # the write is queued
    store.close()
    assert await pending == [True]  # queued before close: finished, not lost
    store.close()  # idempotent
    with pytest.raises(StorageError):
        await store.store_async(1, [event()])
    with pytest.raises(StorageError):
        store.probe()
    with pytest.raises(StorageError):
        store.issues()
    with pytest.raises(StorageError):
        store.start()


# --- users, sessions and API tokens (auth.py and accounts.py) ----------------------------------


def test_users_and_passwords(store: Store) -> None:
    assert not store.has_users()
    assert store.users() == []
    bob = store.add_user("bob", "hash-1")
    assert isinstance(bob, User)
    assert bob.name == "bob"
    store.add_user("alice", "hash-2")
    with pytest.raises(ValueError, match="already exists"):
        store.add_user("bob", "hash-3")
    assert store.has_users()
    assert [u.name for u in store.users()] == ["alice", "bob"]
    assert store.password_hash("bob") == "hash-1"
    assert store.password_hash("nobody") is None
    assert store.set_password("bob", "hash-4")
    assert store.password_hash("bob") == "hash-4"
    assert not store.set_password("nobody", "hash-5")
    assert store.remove_user("alice")
    assert not store.remove_user("alice")
    assert [u.name for u in store.users()] == ["bob"]


def test_sessions_live_until_they_expire_end_or_the_password_changes(store: Store) -> None:
    store.add_user("bob", "hash-1")
    later = time.time() + 3600
    store.create_session("s1", "bob", later)
    store.create_session("s2", "bob", later)
    store.create_session("old", "bob", time.time() - 1)
    assert (store.session_user("s1"), store.session_user("s2")) == ("bob", "bob")
    assert store.session_user("old") is None  # expired
    assert store.session_user("nope") is None
    assert store.end_session("s1")
    assert not store.end_session("s1")
    assert store.session_user("s1") is None
    assert store.set_password("bob", "hash-2", end_sessions=False)  # a rehash on login
    assert store.session_user("s2") == "bob"
    assert store.set_password("bob", "hash-3")
    assert store.session_user("s2") is None
    store.create_session("s3", "bob", later)
    assert store.remove_user("bob")
    assert store.session_user("s3") is None


def test_api_tokens_and_the_secret_that_signs_forms(store: Store) -> None:
    assert store.tokens() == []
    ci = store.add_token("ci", "token-hash-1")
    assert isinstance(ci, ApiToken)
    assert ci.name == "ci"
    store.add_token("backup", "token-hash-2")
    with pytest.raises(ValueError, match="already exists"):
        store.add_token("ci", "token-hash-3")
    assert [t.name for t in store.tokens()] == ["backup", "ci"]
    assert store.token_name("token-hash-1") == "ci"
    assert store.token_name("unknown") is None
    assert store.revoke_token("ci")
    assert not store.revoke_token("ci")
    assert store.token_name("token-hash-1") is None
    secret = store.auth_secret()
    assert len(secret) >= 16
    assert store.auth_secret() == secret


# --- forwarding: a cursor over stored events ---------------------------------------------------


@pytest.mark.asyncio
async def test_the_forwarding_cursor(store: Store) -> None:
    await store.store_async(1, [event()])
    cursor = store.forwarding_start()
    assert store.events_to_forward(cursor, 10) == ([], cursor)  # what came before stays
    later = [event(), event()]
    await store.store_async(1, later)
    await store.store_async(2, [message("internal")])
    rows, upto = store.events_to_forward(cursor, 10)
    assert len(rows) == 3
    assert upto == rows[-1][0]
    assert [json.loads(payload)["event_id"] for _, payload in rows[:2]] == [
        e.event_id for e in later
    ]
    assert [row_id for row_id, _ in rows] == sorted(row_id for row_id, _ in rows)
    first_two, upto_two = store.events_to_forward(cursor, 2)
    assert (first_two, upto_two) == (rows[:2], rows[1][0])
    only_internal, upto_internal = store.events_to_forward(cursor, 10, project_id=2)
    assert (only_internal, upto_internal) == ([rows[2]], rows[2][0])
    assert store.forwarding_state(cursor)["waiting"] == 3
    store.save_forward_cursor(rows[1][0]).result(10)
    store.save_forward_cursor(rows[0][0]).result(10)  # never back
    assert store.forwarding_start() == rows[1][0]
    state = store.forwarding_state(rows[1][0], project_id=1)
    assert state == {"cursor": rows[1][0], "waiting": 0, "dropped_retention": 0}


@pytest.mark.asyncio
async def test_forwarding_starts_afresh_after_a_run_without_it_or_to_another_upstream(
    store: Store,
) -> None:
    cursor = store.forwarding_start(upstream="https://a.example/api/1/envelope/")
    await store.store_async(1, [event()])
    assert store.forwarding_start(upstream="https://a.example/api/1/envelope/") == cursor
    store.forwarding_off()  # a run without forwarding: the backlog is not sent later
    await store.store_async(1, [event()])
    newest = store.forwarding_start(upstream="https://a.example/api/1/envelope/")
    assert newest > cursor
    assert store.events_to_forward(newest, 10)[0] == []
    await store.store_async(1, [event()])
    assert store.forwarding_start(upstream="https://b.example/api/1/envelope/") > newest


@pytest.mark.asyncio
async def test_retention_counts_what_it_deleted_before_it_was_forwarded(
    open_store: OpenStore,
) -> None:
    store = open_store(max_events_per_project=2)
    store.ensure_defaults()
    store.start()
    cursor = store.forwarding_start(project_id=1)
    await store.store_async(1, [event(1000.0 + n) for n in range(4)])
    rows, _ = store.events_to_forward(cursor, 1, project_id=1)
    store.save_forward_cursor(rows[0][0]).result(10)  # the first went on, the second did not
    assert store.apply_retention() == 2
    assert store.forwarding_state(rows[0][0], project_id=1) == {
        "cursor": rows[0][0],
        "waiting": 2,
        "dropped_retention": 1,
    }


# --- retention ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_retention_by_count_keeps_the_newest_of_each_project(open_store: OpenStore) -> None:
    store = open_store(max_events_per_project=3)
    store.ensure_defaults()
    store.start()
    for n in range(5):
        await store.store_async(1, [event(1000.0 + n)])
    await store.store_async(2, [event()])
    assert store.apply_retention() == 2
    assert (store.event_count(1), store.event_count(2)) == (3, 1)
    kept = store.events(store.issues(project_id=1)[0].id)
    assert [e.received - NOW for e in kept] == [1004.0, 1003.0, 1002.0]
    assert store.apply_retention() == 0


@pytest.mark.asyncio
async def test_retention_by_age_removes_old_events_and_their_issues(open_store: OpenStore) -> None:
    now = [NOW]
    store = open_store(max_age_days=30, clock=lambda: now[0])
    store.ensure_defaults()
    store.start()
    await store.store_async(1, [message("old news", -40 * 86400.0), event(-86400.0)])
    assert store.apply_retention(limit=10) == 1
    assert [i.title for i in store.issues()] == ["ValueError: bad input"]
    now[0] += 30 * 86400.0
    assert store.apply_retention() == 1
    assert store.issues() == []
    assert store.event_count() == 0


@pytest.mark.asyncio
async def test_retention_by_size_keeps_the_store_under_its_limit(open_store: OpenStore) -> None:
    limit = 4 * 2**20
    store = open_store(max_storage_bytes=limit)
    store.ensure_defaults()
    store.start()
    assert store.max_storage_bytes == limit

    def big(n: int) -> PreparedEvent:  # prepare_event would trim a payload this big
        return dataclasses.replace(event(float(n)), payload=json.dumps({"n": n, "x": "x" * 10**5}))

    events = [big(n) for n in range(120)]  # 12 MB
    for start in range(0, 120, 10):
        assert await store.store_async(1, events[start : start + 10]) == [True] * 10
    assert store.deleted_for_space > 60
    assert store.event_count() + store.deleted_for_space == 120
    assert store.event(1, events[-1].event_id) is not None  # the newest stay
    assert store.event(1, events[0].event_id) is None  # the oldest went first
    store.close()
    assert store.size_bytes() <= limit


# --- check-in monitors --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_checkins_make_monitors_with_their_newest_checkins(store: Store) -> None:
    hourly = parse_monitor_config({"schedule": "0 * * * *"})
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    assert await store.checkin_async(1, CheckInItem("job", first, "in_progress", config=hourly), 10)
    assert await store.checkin_async(1, CheckInItem("job", first, "ok", duration=1.5), 12.0)
    assert await store.checkin_async(1, CheckInItem("job", second, "error"), 20.0)
    assert await store.checkin_async(2, CheckInItem("internal", first, "ok"), 11.0)
    job, internal = store.monitors(checkins=5)
    assert (job.project, job.slug, job.config, job.created) == ("default", "job", hourly, 10.0)
    assert [(c.check_in_id, c.status, c.started) for c in job.checkins] == [
        (second, "error", 20.0),
        (first, "ok", 10.0),
    ]
    assert job.checkins[1].duration == 1.5
    assert (internal.project, internal.config) == (INTERNAL_PROJECT, None)
    assert [m.slug for m in store.monitors(project_id=2)] == ["internal"]
    (only,) = store.monitors(project_id=1, checkins=5)
    assert [c.check_in_id for c in only.checkins] == [second, first]
    assert len(store.monitors()[0].checkins) == 1


def test_every_member_of_the_protocol_has_a_contract_test_here() -> None:
    """A member added to Store without a test in this module fails here."""
    source = Path(__file__).read_text(encoding="utf-8")
    members = [name for name in vars(Store) if not name.startswith("_")]
    assert len(members) > 40
    assert [name for name in members if f".{name}" not in source] == []


# --- alerts -----------------------------------------------------------------------------------


def _alert(key: str, state: str, fired_at: float) -> AlertRecord:
    return AlertRecord(key, "rule", "rate", key, state, f"title {key}", "default", 3,
                       fired_at, fired_at, None, 1)  # fmt: skip


def test_alerts_are_saved_replaced_and_old_ones_pruned(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfreport.collector import storage as module

    monkeypatch.setattr(module, "MAX_ALERTS", 3)
    store.save_alert(_alert("a", "firing", 1.0))
    for n in range(5):
        store.save_alert(_alert(f"old{n}", "resolved", 10.0 + n))
    assert [a.key for a in store.alerts(firing_only=True)] == ["a"]
    # The firing one is kept however old; of the rest, the newest three.
    assert [a.key for a in store.alerts()] == ["old4", "old3", "old2", "a"]
    store.save_alert(dataclasses.replace(_alert("a", "resolved", 1.0), resolved_at=20.0))
    assert store.alerts(firing_only=True) == []
    assert store.alerts(limit=1)[0].key == "old4"


# --- alerting: the notification outbox -------------------------------------------------------


def outbox_entry(notification_id: str, notifier: str = "ops", when: float = 100.0) -> OutboxEntry:
    return OutboxEntry(
        0, notification_id, notifier, "rate:r:p", "r", "firing", "t", "{}", "pending", when, 0, when
    )


def test_the_outbox_keeps_rows_until_marked_and_bounds_itself(open_store: OpenStore) -> None:
    store = open_store(clock=lambda: 500.0).start()
    assert store.outbox_next_try() is None
    dropped = store.outbox_put([outbox_entry("a"), outbox_entry("a", "mail")], 3, 10)
    assert dropped == []
    store.outbox_put([outbox_entry("a")], 3, 10)  # the same notification again: ignored
    assert store.outbox_counts() == {"pending": 2}
    assert store.outbox_next_try() == 100.0
    assert store.outbox_due(99.0, 10) == []
    first, second = store.outbox_due(100.0, 10)
    assert (first.notifier, second.notifier, first.status) == ("ops", "mail", "pending")
    store.outbox_mark(first.id, "pending", attempts=1, next_try=200.0, error="HTTP 500")
    assert [e.notifier for e in store.outbox_due(150.0, 10)] == ["mail"]
    store.outbox_mark(second.id, "delivered", attempts=1, next_try=100.0)
    dropped = store.outbox_put([outbox_entry(n, when=300.0) for n in "bcd"], 3, 10)
    assert [e.notification_id for e in dropped] == ["a"]  # the oldest pending went
    assert store.outbox_counts() == {"pending": 3, "delivered": 1, "dropped": 1}
    newest = store.outbox_history(2)
    assert [e.notification_id for e in newest] == ["d", "c"]
    history = store.outbox_history()
    dropped_row = next(e for e in history if e.status == "dropped")
    assert (dropped_row.last_error, dropped_row.done_at) == ("outbox full", 500.0)
    store.outbox_put([], 3, 1)  # keeps only the newest finished row
    assert store.outbox_counts() == {"pending": 3, "delivered": 1}


def test_the_outbox_survives_reopening(open_store: OpenStore, tmp_path: Path) -> None:
    store = open_store(tmp_path / "db").start()
    store.outbox_put([outbox_entry("a")], 10, 10)
    store.close()
    again = open_store(tmp_path / "db").start()
    (entry,) = again.outbox_due(1000.0, 10)
    assert entry.notification_id == "a"
    again.outbox_mark(entry.id, "failed", attempts=5, next_try=0.0, error="gave up")
    (entry,) = again.outbox_history()
    assert (entry.status, entry.attempts, entry.last_error) == ("failed", 5, "gave up")
    assert entry.done_at is not None


# --- issue states, outcomes, the chart, pipeline latency --------------------------------------


@pytest.mark.asyncio
async def test_outcomes_say_new_issue_duplicate_and_regression(store: Store) -> None:
    first, again = event(1.0), event(2.0)
    [new] = await store.store_outcomes_async(1, [first])
    assert (new.stored, new.new_issue, new.regressed, new.ignored) == (True, True, False, False)
    assert (new.issue_title, new.level) == ("ValueError: bad input", "error")
    issue_id = new.issue_id
    outcomes = await store.store_outcomes_async(1, [again, first])
    assert [(o.stored, o.issue_id, o.new_issue, o.regressed) for o in outcomes] == [
        (True, issue_id, False, False),
        (False, issue_id, False, False),  # a duplicate changes nothing
    ]
    resolved = store.set_issue_status(issue_id, "resolved")
    assert resolved is not None
    assert resolved.status == "resolved"
    assert resolved.resolved_at is not None
    assert [i.id for i in store.issues(status="resolved")] == [issue_id]
    assert store.issues(status="unresolved") == []
    [back, after] = await store.store_outcomes_async(1, [event(3.0), event(4.0)])
    assert (back.regressed, back.new_issue, after.regressed) == (True, False, False)
    reopened = store.issue(issue_id)
    assert reopened is not None
    assert (reopened.status, reopened.resolved_at, reopened.times_seen) == ("unresolved", None, 4)
    assert await store.store_async(1, [event(5.0)]) == [True]  # the old answer still works


@pytest.mark.asyncio
async def test_ignored_forever_for_n_events_or_until_a_time(store: Store) -> None:
    [first] = await store.store_outcomes_async(1, [event(1.0)])
    issue_id = first.issue_id
    ignored = store.set_issue_status(issue_id, "ignored")
    assert ignored is not None
    assert (ignored.status, ignored.ignore_count, ignored.ignore_until) == ("ignored", None, None)
    [quiet] = await store.store_outcomes_async(1, [event(2.0)])
    assert (quiet.ignored, quiet.regressed) == (True, False)
    # Until 3 more events (repeats folded by the SDK count).
    counted = store.set_issue_status(issue_id, "ignored", ignore_count=3)
    assert counted is not None
    assert counted.ignore_count == 3
    one, two = await store.store_outcomes_async(1, [event(3.0), event(4.0, extra=None)])
    assert (one.ignored, two.ignored) == (True, True)
    [third] = await store.store_outcomes_async(1, [event(5.0)])
    assert (third.ignored, third.regressed) == (False, False)  # back, but no regression
    assert [i.id for i in store.issues(status="unresolved")] == [issue_id]
    store.set_issue_status(issue_id, "ignored", ignore_count=2)
    [folded] = await store.store_outcomes_async(1, [event(6.0, extra={"selfreport_repeats": 1})])
    assert not folded.ignored  # 1 + 1 repeat: two events
    # Until a time: events received before it stay ignored, the first after it reopens.
    store.set_issue_status(issue_id, "ignored", ignore_until=NOW + 1500)
    [before] = await store.store_outcomes_async(1, [event(1400.0)])
    assert before.ignored
    [past] = await store.store_outcomes_async(1, [event(1600.0)])
    assert (past.ignored, past.regressed) == (False, False)
    # A time that passed without events: the issue reads as unresolved already.
    store.set_issue_status(issue_id, "ignored", ignore_until=time.time() - 1)
    lapsed = store.issue(issue_id)
    assert lapsed is not None
    assert (lapsed.status, lapsed.ignore_until) == ("unresolved", None)
    assert [i.id for i in store.issues(status="unresolved")] == [issue_id]
    assert store.issues(status="ignored") == []
    reopened = store.set_issue_status(issue_id, "unresolved")
    assert reopened is not None
    assert reopened.status == "unresolved"


def test_bad_issue_states_are_refused(store: Store) -> None:
    assert store.set_issue_status(999, "resolved") is None
    for status, options, message in [
        ("fixed", {}, "status must be one of"),
        ("resolved", {"ignore_count": 3}, "go with status 'ignored' only"),
        ("ignored", {"ignore_count": 3, "ignore_until": NOW}, "not both"),
        ("ignored", {"ignore_count": 0}, "ignore_count must be"),
        ("ignored", {"ignore_count": True}, "ignore_count must be"),
        ("ignored", {"ignore_until": float("nan")}, "ignore_until must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            store.set_issue_status(1, status, **options)


@pytest.mark.asyncio
async def test_issue_states_survive_reopening(open_store: OpenStore, tmp_path: Path) -> None:
    first = open_store(tmp_path / "kept")
    first.ensure_defaults()
    first.start()
    [stored] = await first.store_outcomes_async(1, [event(1.0)])
    first.set_issue_status(stored.issue_id, "ignored", ignore_count=2)
    [quiet] = await first.store_outcomes_async(1, [event(2.0)])
    assert quiet.ignored
    first.close()
    again = open_store(tmp_path / "kept").start()
    [back] = await again.store_outcomes_async(1, [event(3.0)])  # the second of the two
    assert (back.ignored, back.regressed) == (False, False)
    again.set_issue_status(stored.issue_id, "resolved")
    again.close()
    third = open_store(tmp_path / "kept").start()
    [regressed] = await third.store_outcomes_async(1, [event(4.0)])
    assert regressed.regressed


@pytest.mark.asyncio
async def test_the_histogram_of_an_issue(store: Store) -> None:
    base = NOW + 10_000.0
    events = [event(10_000.0 + offset) for offset in (0.0, 10.0, 3600.0, 3 * 3600.0 - 1)]
    events.append(event(10_000.0 + 7200.0, extra={"selfreport_repeats": 4}))
    outcomes = await store.store_outcomes_async(1, events)
    issue_id = outcomes[0].issue_id
    assert store.issue_histogram(issue_id, base, 3600.0, until=base + 3 * 3600) == [2, 1, 6]
    assert store.issue_histogram(issue_id, base + 3600, 3600.0, until=base + 7201) == [1, 6]
    assert store.issue_histogram(issue_id, base, 1.0, until=base + 10**9)[:2] == [1, 0]
    assert len(store.issue_histogram(issue_id, base, 1.0, until=base + 10**9)) == 1000
    assert store.issue_histogram(999, base, 60.0, until=base + 60) == [0]
    assert store.issue_histogram(issue_id, time.time() + 60, 3600.0) == [0]  # until now
    with pytest.raises(ValueError, match="bucket_seconds"):
        store.issue_histogram(issue_id, base, 0.0)


@pytest.mark.asyncio
async def test_when_events_were_received(store: Store) -> None:
    await store.store_async(1, [event(1.0), event(2.0)])
    await store.store_async(2, [message("internal", 3.0)])
    _rows, upto = store.events_to_forward(0, 10)
    assert upto == 3
    assert store.received_between(0, upto) == [NOW + 1.0, NOW + 2.0, NOW + 3.0]
    assert store.received_between(1, upto, project_id=1) == [NOW + 2.0]
