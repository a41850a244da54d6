"""The collector's metrics: a registry per app, the recent rate window, live values."""

from __future__ import annotations

import pytest

from selfreport.collector.metrics import CollectorMetrics, LatencyWindow, RateWindow
from selfreport.collector.storage import Storage


def test_rate_window_counts_the_last_minute_only() -> None:
    now = [1000.0]
    window = RateWindow(seconds=60, clock=lambda: now[0])
    assert window.rate() == 0.0
    assert window.average_processing() is None
    window.add(30, 0.3)
    now[0] += 1
    window.add(30, 0.9)
    assert window.rate() == 1.0  # 60 events over 60 s
    assert window.average_processing() == 0.02
    now[0] += 59.5  # the first second left the window
    assert window.rate() == 0.5
    now[0] += 60  # a slot is reused: its old counts are dropped first
    window.add(6, 0.06)
    assert window.rate() == 0.1
    assert window.average_processing() == 0.01


def test_each_app_has_its_own_registry(storage: Storage) -> None:
    first, second = CollectorMetrics(storage), CollectorMetrics()
    first.received(3)
    first.stored(2, 1, 0.004)
    first.rejected("malformed")
    first.rejected("malformed", 2)
    assert first.rejected_by_reason() == {"malformed": 3}
    assert first.average_processing() == 0.004
    assert second.average_processing() is None
    assert b"selfreport_collector_events_received_total 3.0" in first.render()
    assert b"selfreport_collector_events_received_total 0.0" in second.render()
    assert b"selfreport_collector_write_queue" not in second.render()  # no storage to read


def test_the_reporters_stats_are_exposed(storage: Storage) -> None:
    metrics = CollectorMetrics(storage, reporter_stats=lambda: {"sent": 4, "queue_size": 2})
    text = metrics.render().decode()
    assert 'selfreport_reporter_events_total{outcome="sent"} 4.0' in text
    assert "selfreport_reporter_queue_size 2.0" in text
    assert "selfreport_collector_database_bytes" in text


# --- pipeline latency ---------------------------------------------------------------------------


def test_latency_percentiles_over_a_recent_bounded_window() -> None:
    now = [1000.0]
    window = LatencyWindow(seconds=60.0, max_samples=200, clock=lambda: now[0])
    assert window.percentiles() == {"p50_ms": None, "p99_ms": None, "samples": 0}
    for n in range(1, 101):
        window.add(n / 1000)
    assert window.percentiles() == {"p50_ms": 50.0, "p99_ms": 99.0, "samples": 100}
    now[0] += 30
    window.add(5.0)
    assert window.percentiles()["p99_ms"] == 100.0
    now[0] += 31  # the first hundred left the window
    assert window.percentiles() == {"p50_ms": 5000.0, "p99_ms": 5000.0, "samples": 1}
    for _ in range(500):
        window.add(0.001)
    assert window.percentiles()["samples"] == 200  # bounded
    metrics = CollectorMetrics()
    metrics.latency("forwarded", -1.0)  # a wall clock stepping back counts as 0
    assert metrics.latency_percentiles()["forwarded"]["p99_ms"] == 0.0
    with pytest.raises(ValueError, match="stage must be one of"):
        metrics.latency("shipped", 1.0)


def test_processing_seconds_is_the_stored_stage_under_its_old_name() -> None:
    # One observation per request on the hot path: the old histogram is read from the stage's.
    metrics = CollectorMetrics()
    for seconds in (0.0005, 0.003, 0.003, 0.2, 45.0):
        metrics.stored(1, 0, seconds)
    text = metrics.render().decode()
    assert 'selfreport_collector_processing_seconds_bucket{le="0.001"} 1.0' in text
    assert 'selfreport_collector_processing_seconds_bucket{le="0.005"} 3.0' in text
    assert 'selfreport_collector_processing_seconds_bucket{le="10.0"} 4.0' in text
    assert 'selfreport_collector_processing_seconds_bucket{le="+Inf"} 5.0' in text
    assert 'processing_seconds_bucket{le="30.0"}' not in text  # the stage's longer buckets
    assert "selfreport_collector_processing_seconds_count 5.0" in text
    assert "selfreport_collector_processing_seconds_sum 45.2065" in text
    assert 'pipeline_latency_seconds_bucket{le="30.0",stage="stored"} 4.0' in text
    assert metrics.average_processing() == pytest.approx(45.2065 / 5)
    assert CollectorMetrics().average_processing() is None
