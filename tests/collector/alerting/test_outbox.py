"""The durable outbox: real SQLite, a real webhook receiver, restarts and kill -9."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.collector.alerting.receivers import HttpReceiver, http_receiver
from tests.conftest import wait_until

from selfreport._core.guard import is_reporting
from selfreport._delivery.retry import Retry
from selfreport.collector.alerting.model import Notification, NotifyError
from selfreport.collector.alerting.notifiers import WebhookNotifier
from selfreport.collector.alerting.outbox import (
    Outbox,
    notification_from_json,
    notification_to_json,
)
from selfreport.collector.storage import SqliteStorage
from selfreport.collector.store import StorageError

ROOT = Path(__file__).resolve().parents[3]
FAST = Retry(total=2, backoff_factor=10.0, backoff_max=600.0, retry_after_max=3600.0, jitter=0.0)


def note(number: int = 1, **changes: Any) -> Notification:
    fields: dict[str, Any] = {
        "notification_id": f"nid-{number}",
        "alert_key": "rate:spike:default",
        "rule": "spike",
        "when": "rate",
        "state": "firing",
        "title": f"spike {number}",
        "text": "many events",
        "subject": "default",
        "created": 1000.0,
        "project": "default",
        "count": 5,
        "details": {"window": 60},
    }
    fields.update(changes)
    return Notification(**fields)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[SqliteStorage]:
    store = SqliteStorage(tmp_path / "selfreport.db").start()
    yield store
    store.close()


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with http_receiver() as it:
        yield it


class Recorder:
    """A notifier keeping what it was given, failing while ``errors`` has some."""

    kind = "webhook"
    timeout = 3.0

    def __init__(self, name: str = "rec") -> None:
        self.name = name
        self.sent: list[Notification] = []
        self.errors: list[Exception] = []
        self.in_path: list[bool] = []

    def send(self, notification: Notification, timeout: float) -> None:
        self.in_path.append(is_reporting())
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append(notification)


def test_notifications_round_trip_through_json() -> None:
    original = note(details={"when": object()})
    again = notification_from_json(notification_to_json(original))
    assert again.notification_id == original.notification_id
    assert again.details["when"].startswith("<object")
    assert notification_from_json(notification_to_json(note())) == note()


def test_put_commits_then_a_pass_delivers(storage: SqliteStorage, receiver: HttpReceiver) -> None:
    clock = Clock()
    outbox = Outbox(storage, {"ops": WebhookNotifier("ops", receiver.url)}, clock=clock)
    assert outbox.put(note(), ["ops", "ops"]) == 1
    assert receiver.count() == 0  # committed, not sent: the thread is not started
    assert outbox.stats()["pending"] == 1
    assert outbox.deliver_due() == 1
    (request,) = receiver.requests
    assert request.json()["notification_id"] == "nid-1"
    assert request.json()["details"] == {"window": 60}
    stats = outbox.stats()
    assert (stats["pending"], stats["delivered"], stats["sent"]) == (0, 1, 1)
    assert stats["notifiers"]["ops"]["delivered"] == 1
    (row,) = outbox.history()
    assert (row.status, row.attempts, row.notifier, row.title) == ("delivered", 1, "ops", "spike 1")
    assert outbox.deliver_due() == 0


def test_failures_back_off_then_recover_with_callbacks(storage: SqliteStorage) -> None:
    clock = Clock()
    failures: list[tuple[str, NotifyError]] = []
    recoveries: list[str] = []
    rec = Recorder()
    rec.errors = [NotifyError("HTTP 500", status=500), RuntimeError("bug")]
    outbox = Outbox(
        storage,
        {"rec": rec},
        clock=clock,
        retry=FAST,
        on_notifier_failure=lambda name, error: failures.append((name, error)),
        on_notifier_recovery=recoveries.append,
    )
    outbox.put(note(), ["rec"])
    assert outbox.deliver_due() == 1
    assert outbox.failing() == {"rec": "HTTP 500"}
    assert outbox.deliver_due() == 0  # not due before its backoff
    clock.now += 10.0
    assert outbox.deliver_due() == 1
    assert outbox.failing() == {"rec": "RuntimeError: bug"}
    clock.now += 19.0
    assert outbox.deliver_due() == 0  # the second wait is twice the first
    clock.now += 1.0
    assert outbox.deliver_due() == 1
    assert [n.notification_id for n in rec.sent] == ["nid-1"]
    assert [(name, str(error)) for name, error in failures] == [
        ("rec", "HTTP 500"),
        ("rec", "RuntimeError: bug"),
    ]
    assert recoveries == ["rec"]
    assert outbox.failing() == {}
    stats = outbox.stats()
    assert (stats["retries"], stats["sent"], stats["delivered"]) == (2, 1, 1)
    assert stats["notifiers"]["rec"] == {
        "delivered": 1,
        "failures": 2,
        "failing": False,
        "last_error": None,
        "last_error_at": None,
    }
    assert rec.in_path == [True, True, True]  # sends run inside the reporting path


def test_refused_and_exhausted_rows_are_given_up_and_counted(
    storage: SqliteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    rec = Recorder()
    outbox = Outbox(storage, {"rec": rec}, clock=clock, retry=FAST)
    rec.errors = [NotifyError("HTTP 400: bad", retryable=False, status=400)]
    outbox.put(note(1), ["rec"])
    assert outbox.deliver_due() == 1
    rec.errors = [NotifyError("down")] * 3
    outbox.put(note(2), ["rec"])
    for _ in range(3):
        assert outbox.deliver_due() == 1
        clock.now += 1000.0
    assert outbox.deliver_due() == 0
    stats = outbox.stats()
    assert (stats["failed"], stats["gave_up"], stats["retries"], stats["sent"]) == (2, 2, 2, 0)
    assert stats["notifiers"]["rec"]["failing"] is True
    assert stats["notifiers"]["rec"]["last_error_at"] == clock.now - 1000.0
    second, first = outbox.history()
    assert (first.status, first.attempts, first.last_error) == ("failed", 1, "HTTP 400: bad")
    assert (second.status, second.attempts, second.last_error) == ("failed", 3, "down")
    given_up = [r for r in caplog.records if "given up" in r.getMessage()]
    assert len(given_up) == 2
    assert all(r.name == "selfreport.collector.alerting" for r in caplog.records)
    assert len([r for r in caplog.records if "is failing" in r.getMessage()]) == 1


def test_a_retry_after_is_obeyed(storage: SqliteStorage) -> None:
    clock = Clock()
    rec = Recorder()
    rec.errors = [NotifyError("HTTP 429", status=429, retry_after=120.0)]
    outbox = Outbox(storage, {"rec": rec}, clock=clock, retry=FAST)
    outbox.put(note(), ["rec"])
    outbox.deliver_due()
    clock.now += 119.0
    assert outbox.deliver_due() == 0
    clock.now += 1.0
    assert outbox.deliver_due() == 1
    assert len(rec.sent) == 1


def test_old_notifications_are_given_up_whatever_their_tries(storage: SqliteStorage) -> None:
    clock = Clock()
    rec = Recorder()
    outbox = Outbox(storage, {"rec": rec}, clock=clock, retry=Retry(total=None), max_age=60.0)
    outbox.put(note(), ["rec"])
    clock.now += 61.0
    rec.errors = [NotifyError("down")]
    outbox.deliver_due()
    assert outbox.stats()["failed"] == 1


def test_the_outbox_is_bounded_and_drops_the_oldest(
    storage: SqliteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    outbox = Outbox(storage, {"rec": rec}, clock=Clock(), max_pending=3)
    for number in range(5):
        outbox.put(note(number), ["rec", "nobody"])
    stats = outbox.stats()
    assert (stats["pending"], stats["dropped"], stats["dropped_full"]) == (3, 2, 2)
    assert stats["dropped_unknown"] == 5
    outbox.deliver_due()
    assert [n.notification_id for n in rec.sent] == ["nid-2", "nid-3", "nid-4"]
    assert len([r for r in caplog.records if "outbox full" in r.getMessage()]) == 1
    assert outbox.put(note(9), ["nobody"]) == 0


class BrokenStorage(SqliteStorage):
    """A real database whose outbox writes fail, as a full disk would make them."""

    def outbox_put(self, *args: Any, **kwargs: Any) -> Any:
        raise StorageError("database or disk is full")


def test_a_storage_failure_is_counted_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = BrokenStorage(tmp_path / "db").start()
    outbox = Outbox(storage, {"rec": Recorder()})
    assert outbox.put(note(1), ["rec"]) == 0
    assert outbox.put(note(2), ["rec"]) == 0
    assert outbox.stats()["dropped_storage"] == 2
    assert outbox.stats()["pending"] == 0
    assert caplog.text.count("could not store a notification") == 1
    storage.close()
    assert outbox.history() == []  # closed: nothing to read, nothing raised
    assert outbox.stats()["pending"] == 0


class MarkFailing(SqliteStorage):
    """A real database that refuses to record tries while ``refuse`` is set (a full disk)."""

    refuse = False

    def outbox_mark(self, *args: Any, **kwargs: Any) -> None:
        if self.refuse:
            raise StorageError("database or disk is full")
        super().outbox_mark(*args, **kwargs)


def test_a_try_storage_cannot_record_is_never_sent_again(tmp_path: Path) -> None:
    storage = MarkFailing(tmp_path / "db").start()
    clock = Clock()
    rec = Recorder()
    outbox = Outbox(storage, {"rec": rec}, clock=clock, retry=FAST)
    try:
        outbox.put(note(1), ["rec"])
        outbox.put(note(2), ["rec"])
        rec.errors = [NotifyError("down")]
        storage.refuse = True
        with pytest.raises(StorageError):
            outbox.deliver_due()  # nid-1 failed, its mark refused
        with pytest.raises(StorageError):
            outbox.deliver_due()  # nid-1 skipped, nid-2 sent, its mark refused
        assert outbox.deliver_due() == 0  # nothing sent again: both only wait for their marks
        assert [n.notification_id for n in rec.sent] == ["nid-2"]
        storage.refuse = False
        assert outbox.deliver_due() == 0  # the marks are recorded, nothing is sent
        assert [n.notification_id for n in rec.sent] == ["nid-2"]
        assert outbox.stats()["delivered"] == 1
        clock.now += 10.0
        assert outbox.deliver_due() == 1  # nid-1's retry, on its schedule
        assert [n.notification_id for n in rec.sent] == ["nid-2", "nid-1"]
    finally:
        storage.close()


def test_the_thread_delivers_in_the_path_and_survives_a_bad_callback(
    storage: SqliteStorage, receiver: HttpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_callback(name: str, error: NotifyError) -> None:
        raise ValueError("engine bug")

    receiver.answers[:] = [(500, {}, b"no"), (200, {}, b"ok")]
    retry = Retry(total=3, backoff_factor=0.01, jitter=0.0)
    outbox = Outbox(
        storage,
        {"ops": WebhookNotifier("ops", receiver.url)},
        retry=retry,
        on_notifier_failure=bad_callback,
    ).start()
    assert outbox.start() is outbox
    try:
        outbox.put(note(), ["ops"])
        assert wait_until(lambda: outbox.stats()["delivered"] == 1)
        assert receiver.count() == 2
        assert outbox.stats()["retries"] == 1
        assert "outbox callback failed: ValueError('engine bug')" in caplog.text
    finally:
        outbox.close()
    assert not outbox.alive


def test_what_was_put_before_a_restart_is_delivered_after_it(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    path = tmp_path / "selfreport.db"
    first = SqliteStorage(path).start()
    Outbox(first, {"ops": WebhookNotifier("ops", receiver.url)}).put(note(), ["ops"])
    first.close()
    second = SqliteStorage(path).start()
    outbox = Outbox(second, {"ops": WebhookNotifier("ops", receiver.url)}).start()
    try:
        assert wait_until(lambda: outbox.stats()["delivered"] == 1)
    finally:
        outbox.close()
        second.close()
    assert [r.json()["notification_id"] for r in receiver.requests] == ["nid-1"]


def test_close_is_bounded_while_a_send_hangs(
    storage: SqliteStorage, receiver: HttpReceiver
) -> None:
    receiver.hold = threading.Event()
    outbox = Outbox(storage, {"ops": WebhookNotifier("ops", receiver.url, timeout=60.0)})
    outbox.start()
    outbox.put(note(), ["ops"])
    assert wait_until(lambda: receiver.count() == 1)
    started = time.monotonic()
    outbox.close(timeout=0.2)
    assert time.monotonic() - started < 10.0
    assert outbox.alive  # still in its send: a daemon thread, the row stays pending
    receiver.hold.set()
    assert wait_until(lambda: not outbox.alive)
    assert outbox.stats()["delivered"] == 1  # the answer came: marked before it stopped


def run_child(db: Path, url: str, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("outbox_child.py")), str(db), url, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()


@pytest.mark.slow
def test_kill_9_after_put_before_sending_loses_nothing(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    db = tmp_path / "selfreport.db"
    child = run_child(db, receiver.url, "put")
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "put"
    kill(child)
    assert receiver.count() == 0
    again = run_child(db, receiver.url, "deliver")
    out, _ = again.communicate(timeout=60)
    assert out.strip() == "delivered"
    assert [r.json()["notification_id"] for r in receiver.requests] == ["nid-1"]


@pytest.mark.slow
def test_kill_9_between_sent_and_marked_sends_it_once_more(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    db = tmp_path / "selfreport.db"
    receiver.hold = threading.Event()  # the receiver has it, the child never hears back
    child = run_child(db, receiver.url, "put-and-deliver")
    assert wait_until(lambda: receiver.count() == 1, timeout=60)
    kill(child)
    receiver.hold.set()
    again = run_child(db, receiver.url, "deliver")
    out, _ = again.communicate(timeout=60)
    assert out.strip() == "delivered"
    ids = [r.json()["notification_id"] for r in receiver.requests]
    assert ids == ["nid-1", "nid-1"]  # one duplicate at most, recognisable by its id
    storage = SqliteStorage(db).start()
    try:
        assert storage.outbox_counts() == {"delivered": 1}
    finally:
        storage.close()


def test_log_records_come_from_the_alerting_logger() -> None:
    assert logging.getLogger("selfreport.collector.alerting").parent is not None
