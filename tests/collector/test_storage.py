"""The SQLite storage on real files: projects, grouping, atomic batches, dedupe, retention."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from tests.conftest import wait_until

from selfreport.collector.events import PreparedEvent, prepare_event
from selfreport.collector.health import default_checks, writer_alive
from selfreport.collector.storage import (
    INTERNAL_PROJECT,
    Storage,
    StorageError,
    StorageFull,
    _Batch,
    _complete,
    _LoopDone,
    _ThreadDone,
    _Write,
)

Event = dict[str, Any]


NOW = time.time()


def prepared(make_event: Callable[..., Event], received: float = 1000.0, **fields: Any):
    """An event received ``received`` seconds after a recent moment (retention keeps it)."""
    return prepare_event(make_event(**fields), received=NOW + received)


def test_a_new_database_is_in_wal_mode_with_two_projects(tmp_path: Path) -> None:
    with Storage(tmp_path / "new" / "db.sqlite") as storage:
        assert storage.created
        default, internal = storage.ensure_defaults()
        assert (default.name, default.internal) == ("default", False)
        assert (internal.name, internal.internal) == (INTERNAL_PROJECT, True)
        assert storage.ensure_defaults() == (default, internal)  # idempotent
        assert len(default.public_key) == 32
        assert storage.project_of_key(internal.public_key) == internal.id
        assert storage.project_of_key("nope") is None
        assert storage.project(default.id) == default
    conn = sqlite3.connect(tmp_path / "new" / "db.sqlite")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    with Storage(tmp_path / "new" / "db.sqlite") as again:
        assert not again.created


def test_project_names_are_checked(storage: Storage) -> None:
    with pytest.raises(ValueError, match="already exists"):
        storage.create_project("default")
    for bad in ("", "   ", "x" * 101, "tab\there"):
        with pytest.raises(ValueError, match="1 to 100 printable"):
            storage.create_project(bad)
    web = storage.create_project("  web  ")
    assert web.name == "web"
    assert web.dsn("http://host:9000/") == f"http://{web.public_key}@host:9000/{web.id}"
    assert storage.keys()[web.public_key] == web.id


def test_refuses_an_unknown_schema_and_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    Storage(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="schema 99 is not supported"):
        Storage(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="cannot open the database"):
        Storage(junk)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        Storage(tmp_path / "a.db", synchronous="SOMETIMES")
    with pytest.raises(ValueError, match="max_events_per_project"):
        Storage(tmp_path / "b.db", max_events_per_project=0)


def test_events_group_into_issues_with_counts(storage: Storage, make_event: Any) -> None:
    storage.start()
    first = prepared(make_event, 1000.0, environment="prod", release="1.0")
    second = prepared(make_event, 2000.0, environment="staging", level="warning")
    other = prepared(make_event, 1500.0, exception=None, message="disk almost full")
    assert storage.store(1, [first, second]).result(5) == [True, True]
    assert storage.store(1, [other]).result(5) == [True]
    issues = storage.issues(project_id=1)
    by_title = {i.title: i for i in issues}
    grouped = by_title["ValueError: bad input"]
    assert grouped.times_seen == 2
    assert (grouped.first_seen, grouped.last_seen) == (NOW + 1000.0, NOW + 2000.0)
    assert grouped.level == "warning"  # the latest event's
    assert (grouped.environment, grouped.release) == ("staging", "1.0")
    assert grouped.culprit == "app.views in handle"
    assert grouped.last_event_id == second.event_id
    assert by_title["disk almost full"].times_seen == 1
    assert [e.event_id for e in storage.events(grouped.id)] == [second.event_id, first.event_id]
    assert storage.event_count() == 3
    assert storage.event_count(2) == 0
    assert storage.environments() == ["prod", "staging"]


def test_repeats_folded_by_the_sdk_count_in_the_issue(storage: Storage, make_event: Any) -> None:
    storage.start()
    event = prepared(make_event, extra={"selfreport_repeats": 41})
    storage.store(1, [event]).result(5)
    assert storage.issues()[0].times_seen == 42


def test_duplicates_are_not_counted(storage: Storage, make_event: Any) -> None:
    storage.start()
    event = prepared(make_event)
    assert storage.store(1, [event]).result(5) == [True]
    assert storage.store(1, [event, event]).result(5) == [False, False]
    assert storage.store(2, [event]).result(5) == [True]  # event ids are per project
    assert [i.times_seen for i in storage.issues(project_id=1)] == [1]


def test_a_failing_write_leaves_the_others_of_its_batch_intact(
    storage: Storage, make_event: Any
) -> None:
    """An event is stored whole or not at all, and one bad write spoils nothing else."""
    storage.start()
    good = prepared(make_event)
    doomed = prepared(make_event)
    gate = threading.Event()

    def blocker(conn: sqlite3.Connection, batch: _Batch) -> None:
        gate.wait(5)

    def poison(conn: sqlite3.Connection, batch: _Batch) -> None:
        # Writes an event, then fails: the savepoint must take the event back out.
        from selfreport.collector.storage import _insert_event

        _insert_event(conn, batch, 1, doomed)
        raise RuntimeError("poison")

    from concurrent.futures import Future

    held: Future[Any] = Future()
    bad: Future[Any] = Future()
    storage._submit(_Write(blocker, _ThreadDone(held)))  # holds the writer so a batch forms
    storage._submit(_Write(poison, _ThreadDone(bad)))
    ok = storage.store(1, [good])
    gate.set()
    assert ok.result(5) == [True]
    with pytest.raises(RuntimeError, match="poison"):
        bad.result(5)
    assert storage.event(1, good.event_id) is not None
    assert storage.event(1, doomed.event_id) is None
    assert storage.issues()[0].times_seen == 1
    # The issue-id cache forgot the rolled-back state: later writes still group correctly.
    again = prepared(make_event)
    assert storage.store(1, [again]).result(5) == [True]
    assert storage.issues()[0].times_seen == 2


def test_a_failing_commit_fails_every_write_of_the_batch(
    storage: Storage, make_event: Any, caplog: pytest.LogCaptureFixture
) -> None:
    storage.start()

    def break_commit(conn: sqlite3.Connection, batch: _Batch) -> None:
        # A deferred foreign key violation only shows at COMMIT, like a full disk would.
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute("INSERT INTO keys VALUES ('orphan', 12345, 0.0)")

    from concurrent.futures import Future

    future: Future[Any] = Future()
    storage._submit(_Write(break_commit, _ThreadDone(future)))
    with pytest.raises(StorageError, match="the database refused the write"):
        future.result(5)
    assert "could not commit 1 writes" in caplog.text
    assert storage.store(1, [prepared(make_event)]).result(5) == [True]  # still works


def test_queue_limit_and_closed_storage(tmp_path: Path, make_event: Any) -> None:
    storage = Storage(tmp_path / "q.db", max_queue=0)
    storage.ensure_defaults()
    with pytest.raises(StorageError, match="writer thread is not running"):
        storage.store(1, [])
    storage.start()
    assert storage.writer_alive
    with pytest.raises(StorageFull, match="write queue is full"):
        storage.store(1, [prepared(make_event)])
    storage.close()
    storage.close()  # idempotent
    assert not storage.writer_alive
    with pytest.raises(StorageError, match="closed"):
        storage.store(1, [])
    with pytest.raises(StorageError, match="closed"):
        storage.start()
    with pytest.raises(StorageError, match="closed"):
        storage.issues()


def test_close_answers_what_is_still_queued(tmp_path: Path, make_event: Any) -> None:
    storage = Storage(tmp_path / "c.db")
    storage.ensure_defaults()
    storage.start()
    gate = threading.Event()
    from concurrent.futures import Future

    held: Future[Any] = Future()
    storage._submit(_Write(lambda conn, batch: gate.wait(5), _ThreadDone(held)))
    storage.max_batch = 1  # the next write waits in the queue behind the held one
    queued = storage.store(1, [prepared(make_event)])
    closer = threading.Thread(target=storage.close, kwargs={"timeout": 0.2})
    closer.start()
    closer.join()
    gate.set()
    with pytest.raises(StorageError, match="closed"):
        queued.result(5)


@pytest.mark.asyncio
async def test_store_async_resolves_on_the_loop(storage: Storage, make_event: Any) -> None:
    storage.start()
    events = [prepared(make_event) for _ in range(20)]
    results = await asyncio.gather(*(storage.store_async(1, [e]) for e in events))
    assert results == [[True]] * 20
    assert storage.issues()[0].times_seen == 20
    storage.max_queue = 0
    with pytest.raises(StorageFull):
        await storage.store_async(1, events[:1])


@pytest.mark.asyncio
async def test_a_cancelled_waiter_does_not_break_the_writer(
    storage: Storage, make_event: Any
) -> None:
    storage.start()
    task = asyncio.ensure_future(storage.store_async(1, [prepared(make_event)]))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await storage.store_async(1, [prepared(make_event)]) == [True]


def test_probe_writes_through_the_writer(storage: Storage) -> None:
    storage.start()
    assert storage.probe().result(5) > 0
    assert storage.queue_size == 0
    assert storage.size_bytes() > 0


def test_retention_by_count(tmp_path: Path, make_event: Any) -> None:
    storage = Storage(tmp_path / "r.db", max_events_per_project=3, retention_interval=3600)
    storage.ensure_defaults()
    try:
        storage.start()
        for index in range(5):
            storage.store(1, [prepared(make_event, 1000.0 + index)]).result(5)
        storage.store(2, [prepared(make_event, 1000.0)]).result(5)
        assert storage.apply_retention() == 2
        assert storage.event_count(1) == 3
        assert storage.event_count(2) == 1
        kept = storage.events(storage.issues(project_id=1)[0].id)
        assert [e.received - NOW for e in kept] == [1004.0, 1003.0, 1002.0]
    finally:
        storage.close()


def test_retention_by_age_removes_empty_issues(tmp_path: Path, make_event: Any) -> None:
    now = [100 * 86400.0]
    storage = Storage(
        tmp_path / "a.db", max_age_days=30, clock=lambda: now[0], retention_interval=3600
    )
    storage.ensure_defaults()
    storage.last_retention = now[0]  # no automatic pass: this test runs it
    try:
        storage.start()
        old = prepare_event(
            make_event(exception=None, message="old news"), received=now[0] - 40 * 86400
        )
        new = prepare_event(make_event(), received=now[0] - 86400)
        storage.store(1, [old, new]).result(5)
        assert storage.apply_retention() == 1
        assert [i.title for i in storage.issues()] == ["ValueError: bad input"]
        assert storage.apply_retention() == 0
    finally:
        storage.close()


def test_the_writer_runs_retention_when_idle(tmp_path: Path, make_event: Any) -> None:
    storage = Storage(tmp_path / "i.db", max_events_per_project=1, retention_interval=0.05)
    storage.ensure_defaults()
    try:
        storage.start()
        storage.store(1, [prepared(make_event), prepared(make_event)]).result(5)
        assert wait_until(lambda: storage.event_count(1) == 1)
    finally:
        storage.close()


def test_a_failing_retention_pass_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(tmp_path / "f.db")
    storage.ensure_defaults()
    conn = sqlite3.connect(tmp_path / "f.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        storage_conn = storage._connect()
        storage_conn.execute("PRAGMA busy_timeout = 10")
        storage._retain_safely(storage_conn)
        storage_conn.close()
    finally:
        conn.execute("ROLLBACK")
        conn.close()
        storage.close()
    assert "retention pass failed" in caplog.text


def test_issue_filters_and_search(storage: Storage, make_event: Any) -> None:
    storage.start()
    events: list[PreparedEvent] = [
        prepared(make_event, 1.0, environment="prod"),
        prepared(make_event, 2.0, exception=None, message="50% off_sale", level="info"),
        prepared(make_event, 3.0, exception=None, message="quota exceeded", level="warning"),
    ]
    storage.store(1, events[:2]).result(5)
    storage.store(2, events[2:]).result(5)

    def titles(**filters: Any) -> list[str]:
        return [i.title for i in storage.issues(**filters)]

    assert titles() == ["quota exceeded", "50% off_sale", "ValueError: bad input"]
    assert titles(sort="first_seen") == titles()
    assert titles(project_id=2) == ["quota exceeded"]
    assert titles(level="info") == ["50% off_sale"]
    assert titles(environment="prod") == ["ValueError: bad input"]
    assert titles(query="50%") == ["50% off_sale"]
    assert titles(query="%") == ["50% off_sale"]  # LIKE wildcards are matched literally
    assert titles(query="_") == ["50% off_sale"]
    assert titles(query="app.views") == ["ValueError: bad input"]  # culprit
    assert titles(limit=1, offset=1) == ["50% off_sale"]
    assert titles(sort="count")[0] in {"quota exceeded", "50% off_sale", "ValueError: bad input"}
    issue = storage.issues(project_id=2)[0]
    assert storage.issue(issue.id) == issue
    assert storage.issue(9999) is None
    assert storage.event(2, events[2].event_id) is not None
    assert storage.event(1, uuid.uuid4().hex) is None


def test_the_wal_is_checkpointed_in_the_background_and_restarted(
    tmp_path: Path, make_event: Any
) -> None:
    """Under steady writes the WAL must not grow without end (it did once: +4 MB a minute)."""
    storage = Storage(tmp_path / "w.db", checkpoint_interval=0.02)
    storage.ensure_defaults()
    wal = tmp_path / "w.db-wal"
    try:
        storage.start()
        sizes = []
        for _ in range(30):
            storage.store(1, [prepared(make_event) for _ in range(50)]).result(5)
            # Two passes of the checkpoint thread: the second began after this commit and,
            # with no write in between, copied all of it (however slow the machine).
            passes = storage.checkpoints
            assert wait_until(lambda passes=passes: storage.checkpoints >= passes + 2)
            sizes.append(wal.stat().st_size)
        # The WAL is reused from its start once fully copied: it stops growing.
        assert max(sizes) < 3 * sizes[len(sizes) // 3], sizes
    finally:
        storage.close()
    assert wal.stat().st_size == 0  # closing truncates it


def test_retention_works_in_bounded_steps(tmp_path: Path, make_event: Any) -> None:
    # Only the explicit steps below: neither the time nor the number of new events (7, under
    # 1000) starts the writer's own retention, which would race with them.
    storage = Storage(tmp_path / "s.db", max_events_per_project=2, retention_chunk=1000)
    storage.ensure_defaults()
    storage.last_retention = time.time() + 3600
    try:
        storage.start()
        storage.store(1, [prepared(make_event, float(n)) for n in range(7)]).result(5)
        assert storage.apply_retention(limit=2) == 2
        assert storage.apply_retention(limit=2) == 2
        assert storage.apply_retention(limit=2) == 1
        assert storage.event_count(1) == 2
        # The writer does the same on its own, a step between batches until caught up.
        storage.retention_chunk = 2
        storage.store(1, [prepared(make_event, 10.0 + n) for n in range(5)]).result(5)
        storage.last_retention = 0.0
        storage.store(1, [prepared(make_event, 20.0)]).result(5)
        assert wait_until(lambda: storage.event_count(1) == 2)
    finally:
        storage.close()


# --- the writer can stall, never die ---------------------------------------------------------


@pytest.mark.asyncio
async def test_waiters_that_give_up_during_a_stall_do_not_harm_the_writer(
    storage: Storage, make_event: Any, write_lock_held: Callable[[Path], Any]
) -> None:
    """Issue 10, item 1: the health probe's write, cancelled at the health timeout, was later
    resolved by the writer, which died of InvalidStateError; every event then got 503."""
    storage.start()
    checks = default_checks(storage)
    checks.timeout = 0.3
    with write_lock_held(storage.path):
        # The first probe is taken by the writer (which waits for the lock), the second
        # waits in the queue: both are given up on, one running and one not yet started.
        for _ in range(2):
            healthy, report = await checks.run()
            assert not healthy
            assert report["storage_writable"]["detail"] == "no answer within 0.3s"
        thread_side = storage.store(1, [prepared(make_event)])
        assert thread_side.cancel()  # not started yet: skipped, never resolved
        task = asyncio.ensure_future(storage.store_async(1, [prepared(make_event)]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    event = prepared(make_event)
    assert await storage.store_async(1, [event]) == [True]
    assert storage.writer_alive
    assert storage.writer_restarts == 0
    assert storage.queue_size == 0
    healthy, report = await checks.run()
    assert healthy, report


def test_resolving_a_cancelled_or_finished_future_never_raises() -> None:
    from concurrent.futures import Future

    cancelled: Future[Any] = Future()
    cancelled.cancel()
    done = _ThreadDone(cancelled)
    assert not done.claim()
    done.resolve(True, 1)
    finished: Future[Any] = Future()
    finished.set_result(1)
    assert not _ThreadDone(finished).claim()
    _ThreadDone(finished).resolve(False, RuntimeError("late"))
    assert finished.result() == 1
    loop = asyncio.new_event_loop()
    late = loop.create_future()
    loop.close()  # a loop closed before the writer answers: nobody to tell
    _complete([_Write(lambda c, b: None, _LoopDone(loop, late))], [(True, None)])


@pytest.mark.asyncio
async def test_a_failing_writer_is_restarted_and_health_says_why(
    storage: Storage, make_event: Any
) -> None:
    storage.start()
    real = storage._apply_batch
    failures: list[BaseException] = [RuntimeError("injected fault")]

    def apply_batch(conn: sqlite3.Connection, writes: list[_Write]) -> None:
        if failures:
            raise failures.pop()
        real(conn, writes)

    storage._apply_batch = apply_batch  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="the storage writer failed: RuntimeError"):
        storage.store(1, [prepared(make_event)]).result(10)
    assert storage.store(1, [prepared(make_event)]).result(10) == [True]
    assert storage.writer_alive
    assert storage.writer_restarts == 1
    assert storage.queue_size == 0
    result = await writer_alive(storage)()
    assert result.ok
    assert "restarts after failures: 1," in result.detail
    assert "injected fault" in result.detail
    # Not even a SystemExit raised in the writer ends it.
    failures.append(SystemExit(3))
    with pytest.raises(StorageError, match="the storage writer failed: SystemExit"):
        storage.store(1, [prepared(make_event)]).result(10)
    assert storage.store(1, [prepared(make_event)]).result(10) == [True]
    assert storage.writer_restarts == 2


@pytest.mark.asyncio
async def test_a_writer_failing_again_and_again_never_gives_up(
    tmp_path: Path, make_event: Any
) -> None:
    """A data directory gone for longer than the pauses add up to (the old writer gave up
    after 10 failures in a row, about 21 s, and every event got 503 until a restart):
    /health fails while the writer is down, and once the disk is back it serves again."""
    storage = Storage(tmp_path / "g.db", max_writer_pause=0.05)
    storage.ensure_defaults()
    real = storage._serve_writes
    disk_back = threading.Event()

    def serve_writes() -> None:
        if not disk_back.is_set():
            raise OSError(5, "Input/output error")
        real()

    storage._serve_writes = serve_writes  # type: ignore[method-assign]
    try:
        storage.start()
        assert wait_until(lambda: storage.writer_restarts > 30)
        assert storage.writer_alive
        result = await writer_alive(storage)()
        assert not result.ok
        assert result.detail.startswith("the storage writer is down (")
        assert "failures in a row), retrying; restarts after failures:" in result.detail
        assert "Input/output error" in result.detail
        waiting = storage.store(1, [prepared(make_event)])  # queued while the writer is down
        disk_back.set()
        assert waiting.result(30) == [True]
        assert (await writer_alive(storage)()).ok
    finally:
        storage.close()


def test_a_writer_that_fails_while_closing_fails_what_is_queued(
    tmp_path: Path, make_event: Any
) -> None:
    storage = Storage(tmp_path / "c.db", max_writer_pause=3600.0)
    storage.ensure_defaults()

    def serve_writes() -> None:
        raise OSError(5, "Input/output error")

    storage._serve_writes = serve_writes  # type: ignore[method-assign]
    storage.start()
    assert wait_until(lambda: storage.writer_restarts >= 1)
    waiting = storage.store(1, [prepared(make_event)])
    storage.close(timeout=30)  # ends the hour's pause at once
    assert not storage.writer_alive
    with pytest.raises(StorageError, match="storage is closed"):
        waiting.result(10)


def test_readers_leave_no_snapshot_open(storage: Storage, make_event: Any) -> None:
    """An unfinished statement on a pooled reader keeps a WAL snapshot, and the WAL can then
    never be checkpointed to its end."""
    storage.start()
    event = prepared(make_event)
    storage.store(1, [event, prepared(make_event)]).result(5)
    assert storage.event(1, event.event_id) is not None
    assert storage.issue(storage.issues()[0].id) is not None
    assert storage.event_count() == 2
    assert storage.project_of_key("x") is None
    conn = sqlite3.connect(storage.path, isolation_level=None)
    try:
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('x', 'y')")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        conn.close()


# --- retention by size --------------------------------------------------------------------


def big_event(make_event: Callable[..., Event], n: int, size: int) -> PreparedEvent:
    """An event of ``size`` bytes as stored (prepare_event would trim this one)."""
    event = prepared(make_event, float(n))
    return dataclasses.replace(event, payload=json.dumps({"n": n, "blob": "x" * size}))


def test_retention_by_bytes_keeps_the_database_under_the_limit(
    tmp_path: Path, make_event: Any
) -> None:
    limit = 4 * 2**20
    storage = Storage(tmp_path / "b.db", max_storage_bytes=limit, checkpoint_interval=0.05)
    storage.ensure_defaults()
    try:
        storage.start()
        events = [big_event(make_event, n, 100_000) for n in range(200)]  # 20 MB
        for chunk in range(0, 200, 10):
            assert storage.store(1, events[chunk : chunk + 10]).result(10) == [True] * 10
            assert (tmp_path / "b.db").stat().st_size <= limit
        assert storage.deleted_for_space > 150
        assert storage.event(1, events[-1].event_id) is not None  # the newest stay
        assert storage.event(1, events[0].event_id) is None  # the oldest went first
        assert storage.event_count() + storage.deleted_for_space == 200
    finally:
        storage.close()
    assert storage.size_bytes() <= limit


class _CountingConnection:
    """A connection that counts the payload sizes retention by size reads."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.sizes_read = 0

    def execute(self, sql: str, params: Any = ()) -> Any:
        cursor = self.conn.execute(sql, params)
        if sql.startswith("SELECT id,") and "payload" in sql:
            rows = cursor.fetchall()
            self.sizes_read += len(rows)
            return _Rows(rows)
        return cursor


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchall(self) -> list[Any]:
        return self.rows


def test_making_room_reads_the_sizes_of_about_the_events_it_deletes(
    tmp_path: Path, make_event: Any
) -> None:
    """Review 1.6: every step read the sizes of 500 events, i.e. 500 whole payloads inside
    the writer's transaction (1.46 s for 1 MiB events while every request waited), even
    when a few deletions made the room."""
    limit = 8 * 2**20
    storage = Storage(tmp_path / "r.db", max_storage_bytes=limit)
    storage.ensure_defaults()
    try:
        storage.start()
        events = [big_event(make_event, n, 5_000) for n in range(600)]  # 3 MB, under the limit
        for chunk in range(0, 600, 100):
            assert storage.store(1, events[chunk : chunk + 100]).result(30) == [True] * 100
        assert storage.deleted_for_space == 0
        counting = _CountingConnection(storage._connect())
        try:
            counting.conn.execute("BEGIN IMMEDIATE")
            page_size = counting.conn.execute("PRAGMA page_size").fetchone()[0]
            in_use = counting.conn.execute("PRAGMA page_count").fetchone()[0] * page_size
            room = limit - storage.wal_allowance - in_use
            deleted = storage._make_room(counting, room + 50_000)  # type: ignore[arg-type]
            counting.conn.execute("ROLLBACK")
        finally:
            counting.conn.close()
        assert 0 < deleted < 600
        assert counting.sizes_read <= 2 * deleted + 8
        assert storage.deleted_for_space == 0  # rolled back: counted by whoever commits
    finally:
        storage.close()


def test_room_is_measured_again_only_when_it_could_be_used_up(
    tmp_path: Path, make_event: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the pages in use took three statements in every transaction: now only when
    the room last found, less twice what each batch since brought, could be gone."""
    statements: list[str] = []
    connect = Storage._connect

    def traced(self: Storage, **options: Any) -> sqlite3.Connection:
        conn = connect(self, **options)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(Storage, "_connect", traced)
    storage = Storage(tmp_path / "m.db", max_storage_bytes=64 * 2**20)
    storage.ensure_defaults()
    try:
        storage.start()
        for n in range(40):  # 40 batches of one small event, within the 1 s between checks
            assert storage.store(1, [big_event(make_event, n, 1000)]).result(10) == [True]
        measured = sum(1 for sql in statements if sql == "PRAGMA freelist_count")
        assert 1 <= measured <= 3
        # Near the limit, nearly every batch measures again (1 MB events against 4 MiB), and
        # the database stays under it.
        small = Storage(tmp_path / "n.db", max_storage_bytes=4 * 2**20)
        small.ensure_defaults()
        try:
            small.start()
            before = sum(1 for sql in statements if sql == "PRAGMA freelist_count")
            for n in range(8):
                assert small.store(1, [big_event(make_event, n, 1_000_000)]).result(10) == [True]
                assert (tmp_path / "n.db").stat().st_size <= 4 * 2**20
            after = sum(1 for sql in statements if sql == "PRAGMA freelist_count")
            assert after - before >= 6
            assert small.deleted_for_space > 0
        finally:
            small.close()
    finally:
        storage.close()


def test_deletions_for_space_rolled_back_are_not_counted(tmp_path: Path, make_event: Any) -> None:
    """Review 1.9: a batch with a failing write is applied again one write at a time, and
    the deletions of the rolled-back first try were counted as well."""
    storage = Storage(tmp_path / "c.db", max_storage_bytes=4 * 2**20)
    storage.ensure_defaults()
    try:
        storage.start()
        stored = 0
        for n in range(0, 60, 10):
            batch = [big_event(make_event, n + i, 100_000) for i in range(10)]
            assert storage.store(1, batch).result(30) == [True] * 10
            stored += 10
        assert storage.deleted_for_space > 0
        # Hold the writer so that the next two writes make one batch.
        taken, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection, batch: _Batch) -> None:
            taken.set()
            release.wait(30)

        def fail(conn: sqlite3.Connection, batch: _Batch) -> None:
            raise ValueError("refused")

        from concurrent.futures import Future

        held: Future[Any] = Future()
        storage._submit(_Write(hold, _ThreadDone(held)))
        assert taken.wait(30)
        room_needed = storage.store(1, [big_event(make_event, 100 + i, 100_000) for i in range(10)])
        failing: Future[Any] = Future()
        storage._submit(_Write(fail, _ThreadDone(failing)))
        release.set()
        assert room_needed.result(30) == [True] * 10
        stored += 10
        with pytest.raises(ValueError, match="refused"):
            failing.result(30)
        assert storage.event_count() + storage.deleted_for_space == stored
    finally:
        storage.close()


def test_a_lowered_size_limit_shrinks_the_file(tmp_path: Path, make_event: Any) -> None:
    path = tmp_path / "s.db"
    with Storage(path) as storage:
        storage.ensure_defaults()
        storage.start()
        storage.store(1, [big_event(make_event, n, 100_000) for n in range(80)]).result(10)
    assert path.stat().st_size > 7 * 2**20
    with Storage(path, max_storage_bytes=2 * 2**20) as smaller:
        smaller.start()
        assert wait_until(lambda: path.stat().st_size <= 2 * 2**20), path.stat().st_size
        assert 0 < smaller.event_count() < 80
    with pytest.raises(ValueError, match="at least 1048576"):
        Storage(tmp_path / "t.db", max_storage_bytes=1000)


# --- files only their owner reads ------------------------------------------------------------


def test_the_directory_and_database_are_private_whatever_the_umask(
    tmp_path: Path, make_event: Any, caplog: pytest.LogCaptureFixture
) -> None:
    previous = os.umask(0)
    try:
        storage = Storage(tmp_path / "data" / "x.db")
        storage.ensure_defaults()
        storage.start()
        storage.store(1, [prepared(make_event)]).result(5)
        modes = {
            name: stat.S_IMODE((tmp_path / "data" / name).stat().st_mode)
            for name in ("x.db", "x.db-wal", "x.db-shm")
        }
        storage.close()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert modes == {"x.db": 0o600, "x.db-wal": 0o600, "x.db-shm": 0o600}
    os.chmod(tmp_path / "data" / "x.db", 0o644)  # an older version made it so
    with caplog.at_level(logging.WARNING, "selfreport.collector"):
        Storage(tmp_path / "data" / "x.db").close()
    assert "can be read by other users (mode 644)" in caplog.text


def test_a_directory_that_cannot_be_made_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="Not a directory"):
        Storage(tmp_path / "file" / "data" / "x.db")


def test_a_database_damaged_after_opening_gives_storage_errors(tmp_path: Path) -> None:
    """Callers of the Store catch StorageError only: SQLite's own errors stay inside."""
    path = tmp_path / "d.db"
    storage = Storage(path)
    try:
        path.write_bytes(b"this is not a database" * 100)
        for call in (
            storage.users,
            storage.ensure_defaults,
            lambda: storage.add_user("bob", "hash"),
            lambda: storage.create_session("s", "bob", time.time() + 60),
        ):
            with pytest.raises(StorageError, match=r"d\.db: file is not a database"):
                call()
    finally:
        storage.close()
    storage = Storage(tmp_path / "gone" / "e.db")
    try:
        (tmp_path / "gone" / "e.db").unlink()
        (tmp_path / "gone").rmdir()
        with pytest.raises(StorageError, match="unable to open database file"):
            storage.has_users()
        with pytest.raises(StorageError, match="unable to open database file"):
            storage.remove_user("bob")
    finally:
        storage.close()


# --- forwarding cursor ---------------------------------------------------------------------


def test_the_forwarding_cursor_starts_at_the_newest_event_and_only_moves_forward(
    tmp_path: Path, make_event: Any
) -> None:
    storage = Storage(tmp_path / "f.db", retention_interval=3600)
    storage.ensure_defaults()
    try:
        storage.start()
        storage.store(1, [prepared(make_event)]).result(5)
        cursor = storage.forwarding_start()
        assert cursor == 1  # what was there before forwarding is not forwarded
        storage.store(1, [prepared(make_event), prepared(make_event)]).result(5)
        storage.store(2, [prepared(make_event)]).result(5)
        rows, upto = storage.events_to_forward(cursor, 10)
        assert [row[0] for row in rows] == [2, 3, 4]
        assert upto == 4
        rows, upto = storage.events_to_forward(cursor, 2)
        assert ([row[0] for row in rows], upto) == ([2, 3], 3)
        rows, upto = storage.events_to_forward(cursor, 10, project_id=2)
        assert ([row[0] for row in rows], upto) == ([4], 4)
        rows, upto = storage.events_to_forward(cursor, 1, project_id=1)
        assert ([row[0] for row in rows], upto) == ([2], 2)
        storage.save_forward_cursor(3).result(5)
        storage.save_forward_cursor(2).result(5)  # never back
        assert storage.forwarding_start() == 3
        assert storage.forwarding_state(3)["waiting"] == 1
        assert storage.forwarding_state(3, project_id=1)["waiting"] == 0
    finally:
        storage.close()


def test_the_forwarding_cursor_starts_afresh_after_a_run_without_it_or_for_another_upstream(
    tmp_path: Path, make_event: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Before, the old cursor survived both: the whole backlog went to the upstream, and the
    # trigger counted retention's deletes as lost while nothing forwarded.
    a, b = "http://a.example/api/1/envelope/", "http://b.example/api/1/envelope/"
    storage = Storage(tmp_path / "a.db", max_events_per_project=3, retention_interval=3600)
    storage.ensure_defaults()
    try:
        storage.start()
        storage.store(1, [prepared(make_event, 1000.0)]).result(5)
        assert storage.forwarding_start(upstream=a) == 1
        storage.store(1, [prepared(make_event, 1001.0), prepared(make_event, 1002.0)]).result(5)
        assert storage.forwarding_start(upstream=a) == 1  # the same upstream: resumed
        storage.forwarding_off()  # a run without --upstream
        storage.store(1, [prepared(make_event, 1010.0 + n) for n in range(3)]).result(5)
        assert storage.apply_retention() == 3  # 1 to 3: 2 and 3 never went on, but not lost
        assert storage.forwarding_state(1)["dropped_retention"] == 0
        assert storage.forwarding_start(upstream=a) == 6  # not the backlog
        assert "it was off in the last run" in caplog.text
        storage.store(1, [prepared(make_event, 1020.0 + n) for n in range(4)]).result(5)
        assert storage.apply_retention() == 4  # 4 to 7: 7 was not forwarded yet
        assert storage.forwarding_state(6)["dropped_retention"] == 1
        assert storage.forwarding_start(upstream=b) == 10  # another upstream
        assert storage.forwarding_state(10)["dropped_retention"] == 0
        storage.store(1, [prepared(make_event, 1030.0)]).result(5)
        assert storage.forwarding_start(project_id=1, upstream=b) == 11  # another scope
        assert caplog.text.count("forwarding starts afresh") == 3
    finally:
        storage.close()


def test_retention_counts_events_deleted_before_they_were_forwarded(
    tmp_path: Path, make_event: Any
) -> None:
    storage = Storage(tmp_path / "r.db", max_events_per_project=2, retention_interval=3600)
    storage.ensure_defaults()
    try:
        storage.start()
        storage.store(1, [prepared(make_event, 1000.0)]).result(5)
        storage.store(2, [prepared(make_event, 1000.0)]).result(5)
        assert storage.forwarding_start(project_id=1) == 2
        for index in range(4):
            storage.store(1, [prepared(make_event, 1001.0 + index)]).result(5)
        storage.store(2, [prepared(make_event, 1001.0), prepared(make_event, 1002.0)]).result(5)
        storage.save_forward_cursor(3).result(5)  # event 3 went on, 4 to 6 did not yet
        # Deleted: 1 (before forwarding), 3 (forwarded), 4 (not yet: lost), and project 2's
        # oldest (not forwarded in this scope).
        assert storage.apply_retention() == 4
        assert storage.forwarding_state(3, project_id=1) == {
            "cursor": 3,
            "waiting": 2,
            "dropped_retention": 1,
        }
    finally:
        storage.close()


# --- issue states -------------------------------------------------------------------------------


def test_a_database_from_before_issue_states_gets_their_columns(
    tmp_path: Path, make_event: Callable[..., Event]
) -> None:
    """The schema script of 0.1.0 (no state columns): opened, migrated, its issues unresolved."""
    path = tmp_path / "old.db"
    with Storage(path) as storage:
        storage.ensure_defaults()
        storage.start()
        assert storage.store(1, [prepared(make_event)]).result(10) == [True]
    conn = sqlite3.connect(path)
    try:
        for table, column in [
            ("issues", "status"),
            ("issues", "ignore_count"),
            ("issues", "ignore_until"),
            ("issues", "ignore_seen"),
            ("issues", "resolved_at"),
            ("events", "repeats"),
        ]:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.commit()
    finally:
        conn.close()
    with Storage(path) as storage:
        [issue] = storage.issues(status="unresolved")
        assert (issue.status, issue.times_seen) == ("unresolved", 1)
        storage.start()
        assert storage.set_issue_status(issue.id, "resolved") is not None
        assert storage.store(1, [prepared(make_event)]).result(10) == [True]
        again = storage.issue(issue.id)
        assert again is not None
        assert (again.status, again.times_seen) == ("unresolved", 2)


def test_a_status_change_the_writer_cannot_take_is_a_storage_error(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "db.sqlite", max_queue=1)
    try:
        storage.ensure_defaults()
        with pytest.raises(StorageError, match="not running"):
            storage.set_issue_status(1, "resolved")
    finally:
        storage.close()
