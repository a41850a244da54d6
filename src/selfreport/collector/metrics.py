"""Prometheus metrics of one collector app, and the recent ingest rate for the status page."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .store import Store

__all__ = ["CONTENT_TYPE", "LATENCY_STAGES", "CollectorMetrics", "LatencyWindow", "RateWindow"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
StatsSource = Callable[[], dict[str, int]]
# Sentry's envelope item types (https://develop.sentry.dev/sdk/data-model/envelope-items/).
_ITEM_TYPES = frozenset(
    (
        "attachment",
        "session",
        "sessions",
        "transaction",
        "client_report",
        "profile",
        "profile_chunk",
        "replay_event",
        "replay_recording",
        "replay_video",
        "statsd",
        "metric_meta",
        "span",
        "log",
        "otel_log",
        "user_report",
        "feedback",
        "trace_metric",
    )
)
# The pipeline's stages: received -> stored (committed), stored -> forwarded (handed on to the
# upstream: sent, or kept in the spool). Forwarding waits minutes when the upstream is down.
LATENCY_STAGES = ("stored", "forwarded")
_LATENCY_BUCKETS = (*_BUCKETS, 30.0, 60.0, 300.0, 1800.0)


class RateWindow:
    """Events and processing time per second over the last ``seconds`` seconds."""

    def __init__(self, seconds: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = [0] * seconds
        self._times = [0.0] * seconds
        self._stamps = [-1] * seconds

    def add(self, events: int, processing_seconds: float) -> None:
        now = int(self._clock())
        slot = now % self.seconds
        with self._lock:
            if self._stamps[slot] != now:
                self._stamps[slot] = now
                self._counts[slot] = 0
                self._times[slot] = 0.0
            self._counts[slot] += events
            self._times[slot] += processing_seconds

    def _totals(self) -> tuple[int, float, int]:
        now = int(self._clock())
        with self._lock:
            live = [i for i, stamp in enumerate(self._stamps) if now - self.seconds < stamp <= now]
            events = sum(self._counts[i] for i in live)
            seconds = sum(self._times[i] for i in live)
        return events, seconds, now

    def rate(self) -> float:
        """Events per second, averaged over the window."""
        events, _, _ = self._totals()
        return events / self.seconds

    def average_processing(self) -> Optional[float]:
        """Seconds an event took through processing, on average over the window."""
        events, seconds, _ = self._totals()
        return seconds / events if events else None


class LatencyWindow:
    """The latencies of the last ``seconds`` seconds (at most ``max_samples`` of the newest):
    their percentiles for the status page, bounded in memory whatever the load."""

    def __init__(
        self,
        seconds: float = 300.0,
        max_samples: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=max_samples
        )

    def add(self, seconds: float) -> None:
        sample = (self._clock(), seconds)
        with self._lock:
            self._samples.append(sample)

    def percentiles(self) -> dict[str, Optional[float]]:
        """``p50_ms``, ``p99_ms`` (None without samples) and ``samples`` in the window."""
        cutoff = self._clock() - self.seconds
        with self._lock:
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            values = sorted(value for _, value in list(self._samples))
        if not values:
            return {"p50_ms": None, "p99_ms": None, "samples": 0}
        return {
            "p50_ms": round(_rank(values, 0.50) * 1e3, 3),
            "p99_ms": round(_rank(values, 0.99) * 1e3, 3),
            "samples": len(values),
        }


def _rank(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted ``values``."""
    index = max(0, min(len(values) - 1, int(fraction * len(values) + 0.999999) - 1))
    return values[index]


class CollectorMetrics:
    """The collector's counters in a registry of its own (several apps may share a process)."""

    def __init__(
        self, storage: Optional[Store] = None, reporter_stats: Optional[StatsSource] = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.storage = storage
        self.reporter_stats = reporter_stats
        self.forward_stats: Callable[[], Optional[dict[str, int]]] = lambda: None
        self.alert_stats: Callable[[], Optional[dict[str, Any]]] = lambda: None
        self.started = time.time()
        self.window = RateWindow()
        self.events_received = self._counter(
            "events_received", "Events received in authenticated requests."
        )
        self.events_stored = self._counter("events_stored", "Events committed to storage.")
        self.events_duplicate = self._counter(
            "events_duplicate", "Events not stored again because their event_id was already stored."
        )
        self.rejections = self._counter(
            "rejected", "Requests or events refused, by reason.", "reason"
        )
        self.registry.register(_LiveValues(self))
        self._init_checkin_metrics()
        self._init_latency()

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(
            f"selfreport_collector_{name}", documentation, labels, registry=self.registry
        )

    # --- check-ins and other envelope items -----------------------------------------------

    def _init_checkin_metrics(self) -> None:
        self.checkins = self._counter(
            "checkins", "Check-ins received, by outcome (stored, monitor_limit).", "outcome"
        )
        self.items_dropped = self._counter(
            "items_dropped",
            "Envelope items neither events nor check-ins, dropped, by type.",
            "type",
        )

    def checkin(self, outcome: str) -> None:
        self.checkins.labels(outcome).inc()

    def item_dropped(self, item_type: str) -> None:
        # The type is the sender's: a label from a fixed set, so it cannot grow the registry.
        self.items_dropped.labels(item_type if item_type in _ITEM_TYPES else "other").inc()

    def received(self, events: int) -> None:
        self.events_received.inc(events)

    def stored(self, stored: int, duplicates: int, seconds: float) -> None:
        self.events_stored.inc(stored)
        if duplicates:
            self.events_duplicate.inc(duplicates)
        self.window.add(stored + duplicates, seconds)
        self._stored_latency.observe(seconds)
        self.latencies["stored"].add(seconds)

    # --- pipeline latency ------------------------------------------------------------------

    def _init_latency(self) -> None:
        self.pipeline_latency = Histogram(
            "selfreport_collector_pipeline_latency_seconds",
            "Time an event took through the pipeline, by stage: stored (request body read to "
            "committed), forwarded (received to handed on to the upstream, sent or spooled).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._stored_latency = self.pipeline_latency.labels("stored")  # the hot path's
        self.latencies = {stage: LatencyWindow() for stage in LATENCY_STAGES}

    def latency(self, stage: str, seconds: float) -> None:
        """One event (or request, for ``stored``) took ``seconds`` through ``stage``."""
        if stage not in self.latencies:
            raise ValueError(f"stage must be one of {', '.join(LATENCY_STAGES)}")
        seconds = max(0.0, seconds)  # the wall clock may step back
        self.pipeline_latency.labels(stage).observe(seconds)
        self.latencies[stage].add(seconds)

    def latency_percentiles(self) -> dict[str, dict[str, Optional[float]]]:
        """Per stage, p50 and p99 (ms) over the recent window, and the samples in it."""
        return {stage: window.percentiles() for stage, window in self.latencies.items()}

    def rejected(self, reason: str, count: int = 1) -> None:
        self.rejections.labels(reason).inc(count)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        return generate_latest(self.registry)

    def totals(self) -> dict[str, int]:
        """Events received, stored and duplicate since start."""
        out = {}
        for name, counter in (
            ("received", self.events_received),
            ("stored", self.events_stored),
            ("duplicates", self.events_duplicate),
        ):
            samples = [s for m in counter.collect() for s in m.samples]
            out[name] = int(next(s.value for s in samples if s.name.endswith("_total")))
        return out

    def rejected_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for metric in self.rejections.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["reason"]] = int(sample.value)
        return out

    def stored_latency(self) -> tuple[list[tuple[str, float]], float]:
        """The ``stored`` stage's histogram: cumulative counts per bucket bound (``le``, as
        Prometheus writes it, ``+Inf`` last), and the sum of the seconds."""
        buckets: list[tuple[str, float]] = []
        total = 0.0
        for metric in self.pipeline_latency.collect():
            for sample in metric.samples:
                if sample.labels.get("stage") != "stored":
                    continue
                if sample.name.endswith("_bucket"):
                    buckets.append((sample.labels["le"], sample.value))
                elif sample.name.endswith("_sum"):
                    total = sample.value
        return buckets, total

    def average_processing(self) -> Optional[float]:
        """Average processing time since start (seconds), or None before the first event."""
        buckets, total = self.stored_latency()
        count = buckets[-1][1] if buckets else 0.0
        return total / count if count else None


def _processing(buckets: list[tuple[str, float]], total: float) -> HistogramMetricFamily:
    # The pipeline's "stored" stage under the name it had before there were stages, from the
    # same observations (its first buckets are this one's): one histogram on the hot path.
    return HistogramMetricFamily(
        "selfreport_collector_processing_seconds",
        "Time from a request's body being read to its events being committed (the same as "
        'selfreport_collector_pipeline_latency_seconds{stage="stored"}).',
        buckets=[*buckets[: len(_BUCKETS)], *buckets[-1:]],
        sum_value=total,
    )


class _LiveValues(Collector):
    """Values read when scraped: the write queue, the database, the self-reporter's stats."""

    def __init__(self, metrics: CollectorMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        storage = self.metrics.storage
        if storage is not None:
            yield GaugeMetricFamily(
                "selfreport_collector_write_queue",
                "Writes waiting for the storage writer thread.",
                value=storage.queue_size,
            )
            yield GaugeMetricFamily(
                "selfreport_collector_writer_up",
                "1 while the storage writer thread runs.",
                value=1.0 if storage.writer_alive else 0.0,
            )
            yield CounterMetricFamily(
                "selfreport_collector_writer_restarts",
                "Restarts of the storage writer thread after unexpected failures.",
                value=storage.writer_restarts,
            )
            yield CounterMetricFamily(
                "selfreport_collector_events_deleted_for_space",
                "Oldest events deleted to keep the database under --max-storage.",
                value=storage.deleted_for_space,
            )
            yield GaugeMetricFamily(
                "selfreport_collector_database_bytes",
                "Size of the SQLite database, WAL included.",
                value=storage.size_bytes(),
            )
        yield _processing(*self.metrics.stored_latency())
        yield from _forwarding(self.metrics.forward_stats())
        yield from _alerting(self.metrics.alert_stats())
        source = self.metrics.reporter_stats
        if source is None:
            return
        stats = source()
        counters = CounterMetricFamily(
            "selfreport_reporter_events",
            "The collector's own self-reporter: events by outcome (selfreport.stats()).",
            labels=["outcome"],
        )
        for key, value in stats.items():
            if key != "queue_size":
                counters.add_metric([key], float(value))
        yield counters
        yield GaugeMetricFamily(
            "selfreport_reporter_queue_size",
            "Events waiting in the self-reporter's queue.",
            value=stats.get("queue_size", 0),
        )


# Forwarder.stats() keys that are levels, not counts.
_FORWARD_GAUGES = {
    "queue_size": "Events waiting in the forwarding destination's queue.",
    "spool_size": "Envelopes waiting in the forwarding spool.",
    "waiting": "Stored events not yet handed on to the upstream (sent or spooled).",
}


def _forwarding(stats: Optional[dict[str, int]]) -> Iterator[Metric]:
    """Forwarding upstream: events by outcome (every ``dropped_*`` has its reason), levels."""
    if stats is None:
        return
    counters = CounterMetricFamily(
        "selfreport_collector_forward_events",
        "Forwarding upstream: events by outcome (dropped_* and send_failed were not delivered).",
        labels=["outcome"],
    )
    for key, value in stats.items():
        if key not in _FORWARD_GAUGES:
            counters.add_metric([key], float(value))
    yield counters
    for key, help_text in _FORWARD_GAUGES.items():
        yield GaugeMetricFamily(
            f"selfreport_collector_forward_{key}", help_text, value=stats.get(key, 0)
        )


# --- alerts ---------------------------------------------------------------------------------

# AlertEngine.stats() keys exported as counters of the engine's work, by what happened.
_ALERT_COUNTS = (
    "fired", "resolved", "notifications", "not_sent_no_notifier", "put_failed", "save_failed",
    "instant_held", "inbox_dropped", "notifier_failures", "tick_failed",
)  # fmt: skip


def _alerting(stats: Optional[dict[str, Any]]) -> Iterator[Metric]:
    """The alert engine: alerts firing, its work by outcome, evaluation time, failing notifiers."""
    if stats is None:
        return
    yield GaugeMetricFamily(
        "selfreport_collector_alerts_firing", "Alerts firing now.", value=stats["firing"]
    )
    counters = CounterMetricFamily(
        "selfreport_collector_alert_events",
        "The alert engine: alerts fired and resolved, notifications queued, what went wrong.",
        labels=["outcome"],
    )
    for key in _ALERT_COUNTS:
        counters.add_metric([key], float(stats.get(key, 0)))
    yield counters
    yield CounterMetricFamily(
        "selfreport_collector_alert_evaluation_seconds",
        "Time the alert engine spent evaluating its rules.",
        value=stats["evaluation_seconds"],
    )
    failing = GaugeMetricFamily(
        "selfreport_collector_notifier_failing",
        "1 for each notifier whose last delivery failed.",
        labels=["notifier"],
    )
    for name in sorted(stats.get("failing", {})):
        failing.add_metric([name], 1.0)
    yield failing
