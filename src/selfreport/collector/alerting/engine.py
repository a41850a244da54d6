"""The alert engine: rules evaluated on stored events and on a timer, alerts' lifecycle."""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from selfreport._core.guard import reporting_path
from selfreport.collector.limits import LogThrottle
from selfreport.collector.store import AlertRecord, EventOutcome, StorageError, Store

from .config import AlertRule, CollectorConfig
from .model import Notification
from .monitors import MonitorStatus
from .notifiers import build_notifiers
from .outbox import Outbox
from .rules import (
    COUNTER_METRICS,
    NOTIFIER_METRIC,
    Condition,
    CounterHistory,
    RateCounter,
    level_at_least,
    metric_value,
    rate_conditions,
)
from .uptime import UptimeStatus

if TYPE_CHECKING:
    from selfreport.collector.ingest import StoredEnvelope

__all__ = ["AlertEngine", "AlertStore", "OutboxLike", "Sources", "engine_from_config"]

logger = logging.getLogger("selfreport")

INSTANT = ("new_issue", "regression")
# Instant notifications per rule and minute at most; more are summed up in one notification.
INSTANT_BUDGET = 10
# Stored-event batches waiting for the engine's thread at most; more are dropped, counted.
MAX_INBOX = 100_000
# A `self` rule without a window looks this far back for counters' growth.
DEFAULT_SELF_WINDOW = 300.0


class OutboxLike(Protocol):
    """The durable outbox as the engine uses it."""

    def put(self, notification: Notification, notifier_names: Sequence[str]) -> object: ...

    def failing(self) -> dict[str, str]: ...


class AlertStore(Protocol):
    """Where alerts are kept across restarts (the collector's :class:`Store`)."""

    def save_alert(self, alert: AlertRecord) -> None: ...

    def alerts(self, *, firing_only: bool = False, limit: int = 200) -> list[AlertRecord]: ...


@dataclass
class Sources:
    """What the timer-driven rules read; each is optional (a rule without its source is idle)."""

    health: Optional[Callable[[], Mapping[str, tuple[bool, str]]]] = None
    reporter_stats: Optional[Callable[[], Mapping[str, int]]] = None
    forwarding_stats: Optional[Callable[[], Optional[Mapping[str, int]]]] = None
    ingest_p99_ms: Optional[Callable[[], Optional[float]]] = None
    monitors: Optional[Callable[[float], Sequence[MonitorStatus]]] = None
    uptime: Optional[Callable[[], Sequence[UptimeStatus]]] = None


@dataclass
class _Stored:
    """One stored envelope as the engine's thread needs it."""

    at: float
    project: str
    events: int
    outcomes: tuple[EventOutcome, ...]


class AlertEngine:
    """Evaluates ``rules`` and hands notifications to ``outbox``.

    Events reach it through :meth:`on_stored` (on the event loop: it only queues); a thread
    calls :meth:`tick` every ``interval`` seconds (and at once for a new issue), inside the
    reporting path, so nothing the engine or a notifier does is reported as an error.
    """

    def __init__(
        self,
        rules: Sequence[AlertRule],
        outbox: OutboxLike,
        *,
        storage: Optional[AlertStore] = None,
        clock: Callable[[], float] = time.time,
        public_url: str = "",
        sources: Optional[Sources] = None,
        interval: float = 1.0,
    ) -> None:
        self.rules = list(rules)
        self.outbox = outbox
        self.storage = storage
        self.clock = clock
        self.public_url = public_url.rstrip("/")
        self.sources = sources or Sources()
        self.interval = interval
        self.alerts: dict[str, AlertRecord] = {}
        self.counts = collections.Counter[str]()
        self.evaluation_seconds = 0.0
        self.notifier_failures: dict[str, str] = {}
        self._inbox: collections.deque[_Stored] = collections.deque()
        self._rates = {
            r.name: RateCounter(r.window or 60.0, r.baseline if r.ratio else 0.0)
            for r in self.rules
            if r.when == "rate"
        }
        self._counters: dict[tuple[str, str], CounterHistory] = {}
        self._bad_since: dict[str, float] = {}
        self._budget: dict[str, tuple[float, int, int]] = {}  # rule: (minute, sent, held)
        self._started = clock()
        self._lock = threading.Lock()  # one tick at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._log = LogThrottle()

    # --- input --------------------------------------------------------------------------

    def on_stored(self, stored: StoredEnvelope) -> None:
        """The ingest hook: queue what was stored for the thread; O(1), never blocks."""
        # Events on an issue that stays ignored count for no rule (as Sentry mutes them).
        outcomes = tuple(o for o in stored.outcomes if not o.ignored)
        events = sum(1 for o in outcomes if o.stored) if stored.outcomes else sum(stored.stored)
        if len(self._inbox) >= MAX_INBOX:
            self._inbox.popleft()
            self.counts["inbox_dropped"] += 1
        self._inbox.append(_Stored(self.clock(), stored.project.name, events, outcomes))
        if any(o.new_issue or o.regressed for o in outcomes):
            self._wake.set()

    def on_notifier_failure(self, name: str, error: object) -> None:
        """The outbox's callback: notifier ``name`` failed (feeds ``self`` rules)."""
        self.notifier_failures[name] = str(error)[:300]
        self.counts["notifier_failures"] += 1

    def on_notifier_recovery(self, name: str) -> None:
        """The outbox's callback: notifier ``name`` delivers again."""
        self.notifier_failures.pop(name, None)

    # --- the thread ---------------------------------------------------------------------

    def start(self) -> AlertEngine:
        """Load the alerts firing before a restart, start the outbox (if it has a thread) and
        the engine's thread (idempotent)."""
        if self._thread is not None:
            return self
        self._load()
        start_outbox = getattr(self.outbox, "start", None)
        if callable(start_outbox):
            start_outbox()
        self._thread = threading.Thread(target=self._run, name="selfreport-alerts", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after one last tick (within ``timeout``)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
        close_outbox = getattr(self.outbox, "close", None)
        if callable(close_outbox):
            close_outbox(max(0.1, deadline - time.monotonic()))

    def _load(self) -> None:
        if self.storage is None:
            return
        try:
            for alert in self.storage.alerts(firing_only=True, limit=10_000):
                self.alerts[alert.key] = alert
        except StorageError as exc:
            logger.warning("alerts: could not read the alerts firing before: %s", exc)

    def _run(self) -> None:
        with reporting_path():
            while True:
                stopping = self._stop.is_set()
                try:
                    self.tick()
                except Exception as exc:  # the engine goes on; it tells the operator why
                    self.counts["tick_failed"] += 1
                    self._log.log(logger, logging.ERROR, "alerts: evaluation failed: %r", exc)
                if stopping:
                    return
                self._wake.wait(self.interval)
                self._wake.clear()

    # --- evaluation ---------------------------------------------------------------------

    def tick(self) -> None:
        """Take in what was stored, evaluate every rule, fire, re-notify and resolve."""
        with self._lock:
            # CPU time of this thread: waiting (for the GIL, for health checks) is not cost.
            started = time.thread_time()
            now = self.clock()
            instant = self._drain()
            for rule in self.rules:
                if rule.when in INSTANT:
                    self._instant(rule, instant, now)
                else:
                    conditions = self._conditions(rule, now)
                    if conditions is not None:
                        self._apply(rule, conditions, now)
            self._forget_unknown_rules(now)
            self.evaluation_seconds += time.thread_time() - started
            self.counts["ticks"] += 1

    def _drain(self) -> list[tuple[str, EventOutcome]]:
        """Count queued events into the rate windows; return the instant outcomes."""
        instant: list[tuple[str, EventOutcome]] = []
        rates = [(r, self._rates[r.name]) for r in self.rules if r.when == "rate"]
        while self._inbox:
            item = self._inbox.popleft()
            instant.extend(
                (item.project, o)
                for o in item.outcomes
                if o.stored and (o.new_issue or o.regressed)
            )
            for rule, counter in rates:
                if rule.project is not None and rule.project != item.project:
                    continue
                if rule.per == "issue":
                    for o in item.outcomes:
                        if o.stored:
                            counter.add(f"{item.project}:issue:{o.issue_id}", 1, item.at)
                elif item.events:
                    counter.add(item.project, item.events, item.at)
        return instant

    def _conditions(self, rule: AlertRule, now: float) -> Optional[list[Condition]]:
        """The rule's subjects now, or None when it cannot be evaluated (no source)."""
        if rule.when == "rate":
            return rate_conditions(rule, self._rates[rule.name], now, now - self._started)
        if rule.when == "health":
            return self._health(rule)
        if rule.when == "self":
            return self._self(rule, now)
        if rule.when == "checkin":
            return self._monitors(rule, now)
        if rule.when == "uptime":
            return self._uptime(rule)
        return None

    def _health(self, rule: AlertRule) -> Optional[list[Condition]]:
        if self.sources.health is None:
            return None
        out = []
        for name, (ok, detail) in self.sources.health().items():
            if rule.check is None or rule.check == name:
                title = f"health check {name} " + ("ok" if ok else "failing")
                out.append(Condition(f"check:{name}", not ok, title, detail))
        return out

    def _monitors(self, rule: AlertRule, now: float) -> Optional[list[Condition]]:
        if self.sources.monitors is None:
            return None
        out = []
        for monitor in self.sources.monitors(now):
            if rule.monitor is None or rule.monitor == monitor.slug:
                title = f"{monitor.project}: monitor {monitor.slug}: {monitor.state}"
                condition = Condition(f"monitor:{monitor.slug}", monitor.failing, title)
                condition.text, condition.project = monitor.detail, monitor.project
                out.append(condition)
        return out

    def _uptime(self, rule: AlertRule) -> Optional[list[Condition]]:
        if self.sources.uptime is None:
            return None
        out = []
        for check in self.sources.uptime():
            if rule.url is None or rule.url == check.url:
                failures = check.consecutive_failures
                # The rule's own count of failed probes, else the check's.
                bad = check.down if rule.consecutive is None else failures >= rule.consecutive
                title = f"{check.url} " + (f"down ({failures} failed probes)" if bad else "up")
                out.append(Condition(f"url:{check.url}", bad, title, "", failures))
        return out

    def _self(self, rule: AlertRule, now: float) -> list[Condition]:
        """Notifier failures (rules without a metric) and the collector's own metrics."""
        out = []
        if rule.metric in (None, NOTIFIER_METRIC):
            failing = self.failing_notifiers()
            for name in sorted(set(failing) | set(self._notifier_subjects(rule))):
                error = failing.get(name, "")
                title = f"notifier {name} " + ("failing" if name in failing else "delivers again")
                out.append(Condition(f"notifier:{name}", name in failing, title, error))
        if rule.metric == NOTIFIER_METRIC:
            return out
        metrics = COUNTER_METRICS if rule.metric is None else (rule.metric,)
        reporter = self.sources.reporter_stats() if self.sources.reporter_stats else {}
        forwarding = self.sources.forwarding_stats() if self.sources.forwarding_stats else None
        p99 = self.sources.ingest_p99_ms() if self.sources.ingest_p99_ms else None
        for metric in metrics:
            value = metric_value(metric, reporter, forwarding, p99)
            if value is None or (metric in COUNTER_METRICS and not self.sources.reporter_stats):
                continue
            if metric in COUNTER_METRICS:
                history = self._counters.setdefault(
                    (rule.name, metric), CounterHistory(rule.window or DEFAULT_SELF_WINDOW)
                )
                value = float(history.growth(int(value), now))
            bad = value > (rule.above or 0.0)
            title = f"{metric} = {value:g}" + (f" (above {rule.above or 0:g})" if bad else "")
            out.append(Condition(f"metric:{metric}", bad, title, "", int(value)))
        return out

    def failing_notifiers(self) -> dict[str, str]:
        """Notifiers failing now and their last error (the outbox's view)."""
        try:
            return dict(self.outbox.failing())
        except Exception:  # an outbox without that view: the failures reported to us count
            return dict(self.notifier_failures)

    def _notifier_subjects(self, rule: AlertRule) -> list[str]:
        prefix = f"{rule.name}\x00notifier:"
        return [k[len(prefix) :] for k in self.alerts if k.startswith(prefix)]

    # --- lifecycle ----------------------------------------------------------------------

    def _apply(self, rule: AlertRule, conditions: list[Condition], now: float) -> None:
        """Fire, re-notify or resolve each subject; subjects gone are resolved."""
        seen = set()
        for condition in conditions:
            key = alert_key(rule.name, condition.subject)
            seen.add(key)
            alert = self.alerts.get(key)
            if not condition.bad:
                self._bad_since.pop(key, None)
                if alert is not None and alert.state == "firing":
                    self._resolve(rule, alert, condition, now)
                continue
            since = self._bad_since.setdefault(key, now)
            if now - since < rule.grace:
                continue
            if alert is None or alert.state != "firing":
                self._fire(rule, key, condition, now)
            elif self._renotify_due(rule, alert, condition, now):
                self._notify(rule, alert, condition, "firing", now)
            else:
                self.alerts[key] = replace(alert, count=condition.count)
        # A rate counted since a restart knows nothing older: resolve only after a window.
        warm = rule.when != "rate" or now - self._started >= (rule.window or 60.0)
        prefix = f"{rule.name}\x00"
        for key, alert in list(self.alerts.items()):
            if key.startswith(prefix) and key not in seen and alert.state == "firing" and warm:
                gone = Condition(alert.subject, False, f"{alert.title}: back to normal")
                self._resolve(rule, alert, gone, now)

    def _renotify_due(
        self, rule: AlertRule, alert: AlertRecord, condition: Condition, now: float
    ) -> bool:
        # An alert about a failing notifier is sent once, however long it keeps failing.
        if condition.subject.startswith("notifier:") or not rule.renotify:
            return False
        return now - (alert.last_notified or alert.fired_at) >= rule.renotify

    def _fire(self, rule: AlertRule, key: str, condition: Condition, now: float) -> None:
        alert = AlertRecord(
            key, rule.name, rule.when, condition.subject, "firing", condition.title,
            condition.project, condition.count, now, None, None, 0,
        )  # fmt: skip
        self.counts["fired"] += 1
        self._notify(rule, alert, condition, "firing", now)

    def _resolve(
        self, rule: AlertRule, alert: AlertRecord, condition: Condition, now: float
    ) -> None:
        alert = replace(alert, state="resolved", resolved_at=now, count=condition.count)
        self.counts["resolved"] += 1
        self._notify(rule, alert, condition, "resolved", now)

    def _instant(
        self, rule: AlertRule, outcomes: list[tuple[str, EventOutcome]], now: float
    ) -> None:
        """new_issue and regression: one notification per issue (and regression), no resolve."""
        for project, outcome in outcomes:
            wanted = outcome.new_issue if rule.when == "new_issue" else outcome.regressed
            if not wanted or (rule.project is not None and rule.project != project):
                continue
            if not level_at_least(outcome.level, rule.level):
                continue
            if not self._spend_budget(rule, now):
                continue
            what = "new issue" if rule.when == "new_issue" else "regression"
            subject = f"issue:{outcome.issue_id}"
            condition = Condition(subject, True, f"{project}: {what}: {outcome.issue_title}")
            condition.project = project
            condition.details = {"issue_id": outcome.issue_id, "level": outcome.level}
            alert = AlertRecord(
                f"{alert_key(rule.name, subject)}@{now!r}", rule.name, rule.when, subject,
                "fired", condition.title, project, None, now, None, None, 0,
            )  # fmt: skip
            self.counts["fired"] += 1
            self._notify(rule, alert, condition, "firing", now)
        self._flush_held(rule, now)

    def _spend_budget(self, rule: AlertRule, now: float) -> bool:
        minute, sent, held = self._budget.get(rule.name, (now, 0, 0))
        if now - minute >= 60.0:
            self._flush_held(rule, now)
            minute, sent, held = now, 0, 0
        if sent >= INSTANT_BUDGET:
            self._budget[rule.name] = (minute, sent, held + 1)
            self.counts["instant_held"] += 1
            return False
        self._budget[rule.name] = (minute, sent + 1, held)
        return True

    def _flush_held(self, rule: AlertRule, now: float) -> None:
        """After a minute over budget: one notification saying how many were held back."""
        minute, _sent, held = self._budget.get(rule.name, (now, 0, 0))
        if not held or now - minute < 60.0:
            return
        self._budget[rule.name] = (now, 1, 0)
        subject = f"held:{int(minute)}"
        title = f"{held} more {rule.when.replace('_', ' ')} alerts held back in a minute"
        condition = Condition(subject, True, title, "", held)
        alert = AlertRecord(
            alert_key(rule.name, subject), rule.name, rule.when, subject, "fired", title,
            rule.project, held, now, None, None, 0,
        )  # fmt: skip
        self._notify(rule, alert, condition, "firing", now)

    def _forget_unknown_rules(self, now: float) -> None:
        """Alerts of rules no longer configured resolve quietly (no one asked about them)."""
        names = {r.name for r in self.rules}
        for key, alert in list(self.alerts.items()):
            if alert.rule not in names:
                self._save(replace(alert, state="resolved", resolved_at=now))
                del self.alerts[key]

    # --- notifications ------------------------------------------------------------------

    def _notify(
        self, rule: AlertRule, alert: AlertRecord, condition: Condition, state: str, now: float
    ) -> None:
        """Hand one notification to the outbox, through the rule's notifiers minus the one an
        alert is about (a failing notifier never carries news of itself)."""
        names = list(rule.notify)
        if condition.subject.startswith("notifier:"):
            names = [n for n in names if n != condition.subject[len("notifier:") :]]
        alert = replace(alert, last_notified=now, notifications=alert.notifications + 1)
        if names:
            self._put(self._notification(rule, alert, condition, state, now), names)
        else:
            self.counts["not_sent_no_notifier"] += 1
            logger.warning("alerts: %s: %s (%s; no notifier to send it through)",
                           rule.name, alert.title, state)  # fmt: skip
        if alert.state == "firing":
            self.alerts[alert.key] = alert
        else:
            self.alerts.pop(alert.key, None)
        self._save(alert)

    def _notification(
        self, rule: AlertRule, alert: AlertRecord, condition: Condition, state: str, now: float
    ) -> Notification:
        issue = condition.details.get("issue_id")
        path = f"/issues/{issue}" if issue is not None else "/alerts"
        return Notification(
            notification_id=uuid.uuid4().hex,
            alert_key=f"{rule.name}:{alert.subject}",
            rule=rule.name,
            when=rule.when,
            state=state,
            title=alert.title if state == "firing" else f"Resolved: {alert.title}",
            text=condition.text or condition.title,
            subject=alert.subject,
            created=now,
            project=condition.project or alert.project,
            count=condition.count,
            url=f"{self.public_url}{path}" if self.public_url else None,
            details=dict(condition.details),
        )

    def _put(self, notification: Notification, names: list[str]) -> None:
        try:
            self.outbox.put(notification, names)
            self.counts["notifications"] += 1
        except Exception as exc:  # the outbox's database: counted, told once a second at most
            self.counts["put_failed"] += 1
            self._log.log(logger, logging.ERROR, "alerts: could not queue a notification: %r", exc)

    def _save(self, alert: AlertRecord) -> None:
        if self.storage is None:
            return
        try:
            self.storage.save_alert(alert)
        except StorageError as exc:
            self.counts["save_failed"] += 1
            self._log.log(logger, logging.ERROR, "alerts: could not save an alert: %s", exc)

    # --- what the pages, /status and /metrics show --------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters, firing alerts and the time spent evaluating."""
        return {
            **{k: self.counts.get(k, 0) for k in _COUNTS},
            "firing": sum(1 for a in list(self.alerts.values()) if a.state == "firing"),
            "inbox": len(self._inbox),
            "evaluation_seconds": round(self.evaluation_seconds, 6),
        }

    def rule_states(self) -> list[dict[str, Any]]:
        """Per rule: its kind, notifiers and the subjects it fires for now."""
        out = []
        # A copy: the engine's thread changes the alerts while pages read them.
        alerts = list(self.alerts.items())
        for rule in self.rules:
            prefix = f"{rule.name}\x00"
            firing = [a for k, a in alerts if k.startswith(prefix)]
            out.append(
                {
                    "name": rule.name,
                    "when": rule.when,
                    "project": rule.project,
                    "notify": list(rule.notify),
                    "state": "firing" if firing else "ok",
                    "firing": [
                        {"subject": a.subject, "title": a.title, "since": a.fired_at}
                        for a in firing
                    ],
                }
            )
        return out


_COUNTS = (
    "fired", "resolved", "notifications", "not_sent_no_notifier", "put_failed", "save_failed",
    "instant_held", "inbox_dropped", "notifier_failures", "tick_failed", "ticks",
)  # fmt: skip


def engine_from_config(
    config: CollectorConfig,
    storage: Store,
    *,
    public_url: str = "",
    clock: Callable[[], float] = time.time,
) -> AlertEngine:
    """The engine for ``config``'s rules, with a durable outbox on ``storage`` delivering
    through ``config``'s notifiers and telling the engine which of them fail."""
    outbox = Outbox(storage, build_notifiers(config), clock=clock)
    engine = AlertEngine(config.alerts, outbox, storage=storage, clock=clock, public_url=public_url)
    outbox.on_notifier_failure = engine.on_notifier_failure
    outbox.on_notifier_recovery = engine.on_notifier_recovery
    return engine


def alert_key(rule: str, subject: str) -> str:
    """The engine's key of an alert: a rule's name and the subject (NUL can be in neither)."""
    return f"{rule}\x00{subject}"
