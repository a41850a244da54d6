"""What alert rules watch: event counts in windows, levels, the collector's own signals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from selfreport.collector.events import LEVELS

from .config import AlertRule

__all__ = [
    "COUNTER_METRICS",
    "GAUGE_METRICS",
    "NOTIFIER_METRIC",
    "Condition",
    "CounterHistory",
    "RateCounter",
    "level_at_least",
    "metric_value",
    "rate_conditions",
]

# `self` rules: counters (alert on growth within the window) and levels (alert above a value).
COUNTER_METRICS = ("dropped_reentrant", "send_failed", "dropped_queue_full")
GAUGE_METRICS = ("forward_backlog", "spool_bytes", "ingest_p99_ms")
# `self` rules on this (or on no metric) alert about each failing notifier, never through it.
NOTIFIER_METRIC = "notifier_failures"
# A subject per rule at most this many (per-issue rates): the oldest are forgotten, counted.
MAX_SUBJECTS = 10_000


@dataclass
class Condition:
    """One subject of a rule as evaluated now: bad (the alert should fire) or not."""

    subject: str
    bad: bool
    title: str
    text: str = ""
    count: Optional[int] = None
    project: Optional[str] = None
    details: dict[str, Any] = field(default_factory=dict)


def level_at_least(level: str, minimum: Optional[str]) -> bool:
    """``level`` is as severe as ``minimum`` or more (an unknown level counts as error)."""
    if minimum is None:
        return True
    rank = LEVELS.index(level) if level in LEVELS else 1
    return rank <= (LEVELS.index(minimum) if minimum in LEVELS else 1)


class RateCounter:
    """Events per subject in time buckets: the count in the last ``window`` seconds and in the
    ``baseline`` seconds before it. Memory: buckets per subject, subjects at most MAX_SUBJECTS."""

    def __init__(self, window: float, baseline: float = 0.0) -> None:
        self.window = window
        self.baseline = baseline
        # Thirty buckets a window: the window's edge is at most a thirtieth off.
        self.bucket = max(1.0, window / 30.0)
        self.subjects: dict[str, dict[int, int]] = {}
        self.forgotten = 0

    def add(self, subject: str, count: int, now: float) -> None:
        buckets = self.subjects.get(subject)
        if buckets is None:
            if len(self.subjects) >= MAX_SUBJECTS:
                del self.subjects[next(iter(self.subjects))]
                self.forgotten += 1
            buckets = self.subjects[subject] = {}
        index = int(now // self.bucket)
        buckets[index] = buckets.get(index, 0) + count

    def counts(self, now: float) -> dict[str, tuple[int, int]]:
        """Per subject: (events in the window, events in the baseline before it); subjects
        with nothing left in either are forgotten."""
        current = int(now // self.bucket)
        first_in_window = current - int(self.window // self.bucket) + 1
        oldest = first_in_window - int(self.baseline // self.bucket)
        out: dict[str, tuple[int, int]] = {}
        for subject in list(self.subjects):
            buckets = self.subjects[subject]
            for index in [i for i in buckets if i < oldest]:
                del buckets[index]
            if not buckets:
                del self.subjects[subject]
                continue
            recent = sum(n for i, n in buckets.items() if i >= first_in_window)
            out[subject] = (recent, sum(buckets.values()) - recent)
        return out


def rate_conditions(
    rule: AlertRule, counter: RateCounter, now: float, watched: float
) -> list[Condition]:
    """A rate rule's subjects: bad when more than ``threshold`` events came in the window and,
    with ``ratio``, the window's rate is at least ``ratio`` times the baseline's. A ratio needs
    a baseline: not before events were counted (``watched`` seconds) for window and baseline;
    then an empty baseline counts as one event."""
    known = watched >= counter.window + counter.baseline
    out = []
    window = counter.window
    for subject, (recent, before) in counter.counts(now).items():
        bad = rule.threshold is None or recent > rule.threshold
        details: dict[str, Any] = {"window_seconds": window, "events": recent}
        if rule.ratio is not None and counter.baseline > 0:
            baseline_rate = max(before, 1) / counter.baseline
            ratio = (recent / window) / baseline_rate
            details.update(baseline_events=before, ratio=round(ratio, 2))
            bad = bad and known and ratio >= rule.ratio
        project, _, issue = subject.partition(":issue:")
        title = f"{recent} events in {window:g}s" + (f" on issue {issue}" if issue else "")
        out.append(Condition(subject, bad, f"{project}: {title}", "", recent, project, details))
    return out


class CounterHistory:
    """Samples of a growing counter, to tell how much it grew within a window."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def growth(self, value: int, now: float) -> int:
        """Record ``value`` and return its growth since the oldest sample within the window."""
        self.samples.append((now, value))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window:
            self.samples.pop(0)
        return max(0, value - self.samples[0][1])


def metric_value(
    metric: str,
    reporter: Mapping[str, int],
    forwarding: Optional[Mapping[str, int]],
    ingest_p99_ms: Optional[float],
) -> Optional[float]:
    """A ``self`` metric's value now, or None when the collector does not have it."""
    if metric in COUNTER_METRICS:
        return float(reporter.get(metric, 0))
    if metric == "ingest_p99_ms":
        return ingest_p99_ms
    if forwarding is None:
        return None
    key = "waiting" if metric == "forward_backlog" else "spool_bytes"
    if key not in forwarding and key == "spool_bytes":
        key = "spool_size"
    return float(forwarding.get(key, 0))
