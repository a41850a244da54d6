"""The durable outbox: notifications committed first, then delivered and retried in the path."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

from selfreport._core.guard import enter_thread_for_life, reporting_path
from selfreport._delivery.retry import Outcome, Retry
from selfreport.collector.alerting.model import Notification, Notifier, NotifyError
from selfreport.collector.store import OutboxEntry, Store

__all__ = ["DEFAULT_RETRY", "Outbox", "notification_from_json", "notification_to_json"]

logger = logging.getLogger("selfreport.collector.alerting")

# Nine tries over about twenty minutes (5 s doubling to the 10 min cap), then given up; a
# notification older than MAX_AGE is given up whatever its tries (the collector was down).
DEFAULT_RETRY = Retry(total=8, backoff_factor=5.0, backoff_max=600.0, retry_after_max=3600.0)
MAX_AGE = 86400.0
MAX_PENDING = 1000
KEEP_DONE = 1000
_BATCH = 20  # rows read per pass: a pass stops early when the outbox is closing
_IDLE_WAIT = 60.0  # nothing due: look again after this long (put() wakes the thread sooner)
_MAX_ERROR = 500

FailureCallback = Callable[[str, NotifyError], None]
RecoveryCallback = Callable[[str], None]


def notification_to_json(notification: Notification) -> str:
    """A notification as stored in the outbox (details that JSON cannot hold become text)."""
    fields = dataclasses.asdict(notification)
    fields["details"] = dict(notification.details)
    return json.dumps(fields, default=str, ensure_ascii=False)


def notification_from_json(text: str) -> Notification:
    fields = json.loads(text)
    known = {f.name for f in dataclasses.fields(Notification)}
    return Notification(**{k: v for k, v in fields.items() if k in known})


@dataclasses.dataclass
class _NotifierState:
    delivered: int = 0
    failures: int = 0
    last_error: Optional[str] = None  # set while failing: its last error
    last_error_at: Optional[float] = None


class Outbox:
    """Notifications for notifiers, committed before :meth:`put` returns and delivered by one
    daemon thread inside the reporting path (errors there are never reported as events).

    A row is marked delivered only after its notifier took it: a crash in between sends it
    again on the next start (one duplicate at most, with the same ``notification_id``). Failed
    tries are retried with capped exponential backoff (``retry``, the one policy of
    ``_delivery/retry``) and given up after its tries or ``max_age`` seconds. Past
    ``max_pending`` rows waiting, the oldest are dropped. Everything given up or dropped is
    counted in :meth:`stats`; problems go to the ``selfreport.collector.alerting`` logger.

    ``on_notifier_failure(name, error)`` is called (on the outbox's thread) after every failed
    try, ``on_notifier_recovery(name)`` when a failing notifier delivers again: the alert
    engine's ``self`` rules listen there.
    """

    def __init__(
        self,
        storage: Store,
        notifiers: Mapping[str, Notifier],
        *,
        clock: Callable[[], float] = time.time,
        retry: Retry = DEFAULT_RETRY,
        max_pending: int = MAX_PENDING,
        keep_done: int = KEEP_DONE,
        max_age: float = MAX_AGE,
        on_notifier_failure: Optional[FailureCallback] = None,
        on_notifier_recovery: Optional[RecoveryCallback] = None,
    ) -> None:
        self.storage = storage
        self.notifiers = dict(notifiers)
        self.on_notifier_failure = on_notifier_failure
        self.on_notifier_recovery = on_notifier_recovery
        self._clock = clock
        self._retry = retry
        self._max_pending = max_pending
        self._keep_done = keep_done
        self._max_age = max_age
        self._lock = threading.Lock()  # the counters and notifier states below
        self._pass_lock = threading.Lock()  # one delivery pass at a time: no row sent twice
        self._cond = threading.Condition()
        self._woken = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._states = {name: _NotifierState() for name in self.notifiers}
        self._counts = dict.fromkeys(
            ("sent", "retries", "gave_up", "dropped_full", "dropped_unknown", "dropped_storage"), 0
        )
        self._logged: set[str] = set()
        # Rows tried whose mark storage refused: never sent again by this process.
        self._unmarked: dict[int, tuple[str, dict[str, Any]]] = {}

    # --- the engine's side ------------------------------------------------------------------

    def put(self, notification: Notification, notifier_names: Sequence[str]) -> int:
        """Commit one row per notifier (unknown names are counted and skipped) and wake the
        thread; the number of rows committed. Never raises: a storage failure is counted."""
        names = [n for n in dict.fromkeys(notifier_names) if n in self.notifiers]
        unknown = len(set(notifier_names)) - len(names)
        if unknown:
            self._count("dropped_unknown", unknown)
            self._log_once("unknown", f"notification for unknown notifiers: {notifier_names!r}")
        if not names:
            return 0
        now = self._clock()
        payload = notification_to_json(notification)
        entries = [_entry(notification, name, payload, now) for name in names]
        try:
            with reporting_path():
                dropped = self.storage.outbox_put(entries, self._max_pending, self._keep_done)
        except Exception as exc:
            self._count("dropped_storage", len(names))
            self._log_once("storage", f"outbox: could not store a notification: {exc!r}")
            return 0
        if dropped:
            self._count("dropped_full", len(dropped))
            self._log_once("full", f"outbox full ({self._max_pending} waiting): oldest dropped")
        self.wake()
        return len(names)

    def wake(self) -> None:
        """Look for due rows now (after a put, or after a test moved its clock)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    # --- delivery -----------------------------------------------------------------------------

    def deliver_due(self) -> int:
        """One pass: try every row that is due, now, on this thread; how many were tried."""
        tried = 0
        with self._pass_lock, reporting_path():
            while not self.is_closing():
                entries = self.storage.outbox_due(self._clock(), _BATCH)
                sent = 0
                for entry in entries:
                    if self.is_closing():
                        break
                    if entry.id in self._unmarked:  # tried already: only its mark is missing
                        self._mark_again(entry.id)
                        continue
                    self._deliver(entry)
                    sent += 1
                tried += sent
                if len(entries) < _BATCH or not sent:
                    break
        return tried

    def _mark(self, entry_id: int, status: str, fields: dict[str, Any]) -> None:
        """Record a try. Until storage takes the mark (a full disk), the row is remembered
        here, so this process never sends it again, and marked on the next pass."""
        self._unmarked[entry_id] = (status, fields)
        self.storage.outbox_mark(entry_id, status, **fields)
        del self._unmarked[entry_id]

    def _mark_again(self, entry_id: int) -> None:
        try:
            self._mark(entry_id, *self._unmarked[entry_id])
        except Exception as exc:
            self._log_once("mark", f"outbox: could not record a delivery try: {exc!r}")

    def _deliver(self, entry: OutboxEntry) -> None:
        notifier = self.notifiers.get(entry.notifier)
        error: Optional[NotifyError] = None
        if notifier is None:  # pragma: no cover - put() stores only known notifiers
            error = NotifyError(f"no notifier called {entry.notifier!r}", retryable=False)
        else:
            try:
                notification = notification_from_json(entry.payload)
                notifier.send(notification, float(getattr(notifier, "timeout", 10.0)))
            except NotifyError as exc:
                error = exc
            except Exception as exc:  # a notifier's bug: tried again, bounded like a failure
                error = NotifyError(f"{type(exc).__name__}: {exc}"[:_MAX_ERROR], retryable=True)
        if error is None:
            self._delivered(entry.notifier)
            self._mark(
                entry.id, "delivered", {"attempts": entry.attempts + 1, "next_try": entry.next_try}
            )
        else:
            self._failed(entry, error)

    def _delivered(self, name: str) -> None:
        with self._lock:
            state = self._states.setdefault(name, _NotifierState())
            state.delivered += 1
            self._counts["sent"] += 1
            recovered = state.last_error is not None
            state.last_error = state.last_error_at = None
        if recovered:
            logger.info("notifier %r delivers again", name)
            self._callback(self.on_notifier_recovery, name)

    def _failed(self, entry: OutboxEntry, error: NotifyError) -> None:
        now = self._clock()
        attempts = entry.attempts + 1
        policy = self._retry.new(attempts=entry.attempts)  # the failures before this one
        outcome = Outcome.FAILED if error.retryable else Outcome.REFUSED
        retry_after = error.retry_after or 0.0
        young = now - entry.created < self._max_age
        message = str(error)[:_MAX_ERROR]
        if young and policy.is_retry(outcome, retry_after):
            next_try = now + policy.increment().get_sleep_time(retry_after)
            status = "pending"
            self._count("retries")
        else:
            next_try, status = entry.next_try, "failed"
            self._count("gave_up")
            logger.warning(
                "notification %s through %r given up after %d tries: %s",
                entry.notification_id,
                entry.notifier,
                attempts,
                message,
            )
        self._notifier_failed(entry.notifier, message, now)
        self._callback(self.on_notifier_failure, entry.notifier, error)
        fields = {"attempts": attempts, "next_try": next_try, "error": message}
        self._mark(entry.id, status, fields)

    def _notifier_failed(self, name: str, message: str, now: float) -> None:
        with self._lock:
            state = self._states.setdefault(name, _NotifierState())
            state.failures += 1
            started = state.last_error is None
            state.last_error, state.last_error_at = message, now
        if started:  # one line when it starts failing, not one per try
            logger.warning("notifier %r is failing: %s", name, message)

    def _callback(self, callback: Optional[Callable[..., None]], *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as exc:
            self._log_once(f"callback:{type(exc).__name__}", f"outbox callback failed: {exc!r}")

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _log_once(self, kind: str, message: str) -> None:
        # Each kind of trouble logged once per outbox: a storm of them is in stats(), not logs.
        with self._lock:
            if kind in self._logged:
                return
            self._logged.add(kind)
        logger.warning("%s", message)

    # --- the thread ---------------------------------------------------------------------------

    def start(self) -> Outbox:
        """Start the delivery thread; rows left pending by an earlier run go first."""
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(
                    target=self._run, name="selfreport-outbox", daemon=True
                )
                self._thread.start()
        return self

    def _run(self) -> None:
        enter_thread_for_life()
        while not self._stopping:
            try:
                self.deliver_due()
                wait = self._wait_time()
            except Exception as exc:
                self._log_once(f"pass:{type(exc).__name__}", f"outbox delivery failed: {exc!r}")
                wait = 1.0
            with self._cond:
                if not self._woken and not self._stopping:
                    self._cond.wait(wait)
                self._woken = False

    def _wait_time(self) -> float:
        next_try = self.storage.outbox_next_try()
        if next_try is None:
            return _IDLE_WAIT
        return min(_IDLE_WAIT, max(0.0, next_try - self._clock()))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, waiting at most ``timeout`` seconds for a send in progress (rows
        not marked delivered are sent again on the next start)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def is_closing(self) -> bool:
        return self._stopping

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # --- for /status, /metrics and the Alerts page -------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Rows by status (``pending``, ``delivered``, ``failed``, ``dropped``, from storage),
        this run's ``sent``, ``retries``, ``gave_up`` and drops by reason, and per notifier
        its ``delivered``, ``failures``, whether it is ``failing`` and its ``last_error``."""
        try:
            rows = self.storage.outbox_counts()
        except Exception:  # storage closed or failing: its own health check says so
            rows = {}
        with self._lock:
            stats: dict[str, Any] = {
                key: rows.get(key, 0) for key in ("pending", "delivered", "failed", "dropped")
            }
            stats.update(self._counts)
            stats["notifiers"] = {
                name: {
                    "delivered": state.delivered,
                    "failures": state.failures,
                    "failing": state.last_error is not None,
                    "last_error": state.last_error,
                    "last_error_at": state.last_error_at,
                }
                for name, state in self._states.items()
            }
        return stats

    def failing(self) -> dict[str, str]:
        """Notifiers whose last try failed, and that error."""
        with self._lock:
            return {n: s.last_error for n, s in self._states.items() if s.last_error is not None}

    def history(self, limit: int = 50) -> list[OutboxEntry]:
        """The newest rows with their delivery status, newest first (empty if unreadable)."""
        try:
            return self.storage.outbox_history(limit)
        except Exception:
            return []


def _entry(notification: Notification, notifier: str, payload: str, now: float) -> OutboxEntry:
    n = notification
    return OutboxEntry(
        id=0,
        notification_id=n.notification_id,
        notifier=notifier,
        alert_key=n.alert_key,
        rule=n.rule,
        state=n.state,
        title=n.title[:1000],
        payload=payload,
        status="pending",
        created=now,
        attempts=0,
        next_try=now,
    )
