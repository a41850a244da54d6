"""StatsD / DogStatsD export, checked at a real UDP socket on 127.0.0.1."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from tests.conftest import FAST_OPTIONS, wait_until

from selfreport import Client, ConfigError, Destination
from selfreport._core.guard import is_reporting
from selfreport._onprem.statsd import StatsdConfig, StatsdExporter
from selfreport.testing import FakeCollector


class UdpServer:
    """A StatsD server: the lines it received, in order."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.lines.extend(line for line in data.decode().split("\n") if line)

    def received(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, condition: Callable[[list[str]], bool]) -> list[str]:
        """The lines received, once ``condition`` holds for them (or after wait_until gave up)."""
        wait_until(lambda: condition(self.received()))
        return self.received()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def server() -> Iterator[UdpServer]:
    udp = UdpServer()
    try:
        yield udp
    finally:
        udp.close()


@pytest.fixture
def exporters() -> Iterator[Callable[..., StatsdExporter]]:
    made: list[StatsdExporter] = []

    def make(**config: Any) -> StatsdExporter:
        exporter = StatsdExporter(StatsdConfig(**config))
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.close(2)


class Counters:
    def __init__(self, **values: int) -> None:
        self.values = dict(values)
        self.callers_in_path: list[bool] = []

    def __call__(self) -> dict[str, int]:
        self.callers_in_path.append(is_reporting())
        return dict(self.values)


def metric(line: str) -> str:
    return line.split(":", 1)[0]


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost:9125", StatsdConfig(host="localhost", port=9125)),
        ("statsd.example", StatsdConfig(host="statsd.example")),
        ("statsd://10.0.0.5:8126", StatsdConfig(host="10.0.0.5", port=8126, protocol="statsd")),
        ("dogstatsd://[::1]:8125", StatsdConfig(host="::1", protocol="dogstatsd")),
        ("udp://h:1", StatsdConfig(host="h", port=1)),
        (
            {"host": "h", "tags": ["env:prod"], "prefix": "app"},
            StatsdConfig(host="h", tags=("env:prod",), prefix="app"),
        ),
    ],
)
def test_config_parsing(value: Any, expected: StatsdConfig) -> None:
    assert StatsdConfig.parse(value) == expected
    assert StatsdConfig.parse(expected) is expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "http://h:1",
        "h:99999",
        "h:port",
        "://",
        "udp://:8125",
        42,
        {"host": ""},
        {"port": 0},
        {"port": True},
        {"prefix": 3},
        {"tags": "env:prod"},
        {"tags": [1]},
        {"interval": 0},
        {"protocol": "graphite"},
        {"nope": 1},
    ],
)
def test_invalid_configs_are_config_errors(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        StatsdConfig.parse(value)
    assert info.value.option == "statsd"


def test_a_missing_datadog_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("datadog", "datadog.dogstatsd", "datadog.dogstatsd.base"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"selfreport\[statsd\]"):
        StatsdExporter(StatsdConfig())


# --- what is sent ------------------------------------------------------------------------------


def test_dogstatsd_counters_gauges_and_timings(
    exporters: Callable[..., StatsdExporter], server: UdpServer
) -> None:
    exporter = exporters(port=server.port, tags=("env:test",))
    client_stats = Counters(captured=3, sent=2, dropped_queue_full=1, queue_size=4, retried=0)
    destination_stats = Counters(sent=5, spool_size=2)
    exporter.add_source(client_stats)
    exporter.add_source(destination_stats, ("destination:vendor",))
    exporter.timing(0.0125)
    exporter.timing(0.5, ("destination:vendor",))
    assert exporter.flush() == 8
    lines = server.wait_for(lambda got: len(got) >= 8)
    assert sorted(lines) == sorted(
        [
            "selfreport.captured:3|c|#env:test",
            "selfreport.sent:2|c|#env:test",
            "selfreport.dropped:1|c|#reason:queue_full,env:test",
            "selfreport.queue.depth:4|g|#env:test",
            "selfreport.sent:5|c|#destination:vendor,env:test",
            "selfreport.spool.depth:2|g|#destination:vendor,env:test",
            "selfreport.send.latency:12.5|ms|#env:test",
            "selfreport.send.latency:500.0|ms|#destination:vendor,env:test",
        ]
    )
    # Only what grew since the last flush; gauges every time.
    client_stats.values.update(captured=5, sent=2)
    assert exporter.flush() == 3
    lines = server.wait_for(lambda got: len(got) >= 11)
    assert sorted(lines[8:]) == sorted(
        [
            "selfreport.captured:2|c|#env:test",
            "selfreport.queue.depth:4|g|#env:test",
            "selfreport.spool.depth:2|g|#destination:vendor,env:test",
        ]
    )


def test_plain_statsd_folds_tags_into_names(
    exporters: Callable[..., StatsdExporter], server: UdpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATADOG_TAGS", "team:x")  # would add tags plain StatsD cannot read
    exporter = exporters(port=server.port, protocol="statsd", prefix="app.errors")
    exporter.add_source(
        Counters(dropped_rate_limited=2, sent=1), ("destination:vendor.example:443/1",)
    )
    exporter.timing(0.002)
    exporter.flush()
    lines = server.wait_for(lambda got: len(got) >= 3)
    assert sorted(lines) == [
        "app.errors.destination.vendor.example_443_1.dropped.rate_limited:2|c",
        "app.errors.destination.vendor.example_443_1.sent:1|c",
        "app.errors.send.latency:2.0|ms",
    ]


def test_counters_that_went_back_count_from_zero(
    exporters: Callable[..., StatsdExporter], server: UdpServer
) -> None:
    stats = Counters(sent=10)
    exporter = exporters(port=server.port)
    exporter.add_source(stats)
    exporter.flush()
    stats.values["sent"] = 3  # a forked child starts from zero
    exporter.flush()
    lines = server.wait_for(lambda got: len(got) >= 2)
    assert lines == ["selfreport.sent:10|c", "selfreport.sent:3|c"]


def test_the_thread_flushes_periodically_inside_the_reporting_path(
    exporters: Callable[..., StatsdExporter], server: UdpServer
) -> None:
    stats = Counters(captured=1)
    exporter = exporters(port=server.port, interval=0.02)
    exporter.add_source(stats)
    exporter.start()
    exporter.start()  # once is enough
    try:
        server.wait_for(lambda got: "selfreport.captured:1|c" in got)
        stats.values["captured"] = 4
        lines = server.wait_for(lambda got: "selfreport.captured:3|c" in got)
        assert "selfreport.captured:3|c" in lines
    finally:
        exporter.close(2)
    assert stats.callers_in_path
    assert all(stats.callers_in_path)


def test_close_sends_the_last_deltas(
    exporters: Callable[..., StatsdExporter], server: UdpServer
) -> None:
    stats = Counters()
    exporter = exporters(port=server.port, interval=3600)
    exporter.add_source(stats)
    exporter.start()
    stats.values["sent"] = 7
    exporter.close(2)
    assert "selfreport.sent:7|c" in server.wait_for(lambda got: len(got) >= 1)


def test_an_unresolvable_host_is_counted_and_nothing_is_lost(
    exporters: Callable[..., StatsdExporter], server: UdpServer
) -> None:
    stats = Counters(sent=2)
    exporter = exporters(host="does-not-resolve.invalid", port=server.port)
    exporter.add_source(stats)
    assert exporter.flush() == 0
    assert exporter.errors == 1
    object.__setattr__(exporter.config, "host", "127.0.0.1")  # the name resolves again
    assert exporter.flush() == 1
    assert server.wait_for(lambda got: len(got) >= 1) == ["selfreport.sent:2|c"]


def test_a_statsd_server_that_is_down_is_harmless(exporters: Callable[..., StatsdExporter]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a UDP port just freed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = exporters(port=port)
    exporter.add_source(Counters(sent=1))
    exporter.flush()
    exporter.add_source(Counters(captured=1))
    exporter.flush()  # ICMP port unreachable from the first packet: logged by datadog, dropped
    assert exporter.errors == 0


def test_after_fork_the_first_send_restarts_the_thread(
    exporters: Callable[..., StatsdExporter], server: UdpServer
) -> None:
    exporter = exporters(port=server.port, interval=0.02)
    stats = Counters(sent=1)
    exporter.add_source(stats)
    exporter.after_fork_in_child()  # as the client's fork hook does, without a thread yet
    assert exporter._thread is None
    exporter.timing(0.001)
    try:
        assert exporter._thread is not None
        lines = server.wait_for(lambda got: len(got) >= 2)
        assert sorted(lines) == ["selfreport.send.latency:1.0|ms", "selfreport.sent:1|c"]
    finally:
        exporter.close(2)
    exporter.timing(0.001)  # closed: no new thread
    assert not exporter._thread.is_alive()


# --- wired into the client ---------------------------------------------------------------------


def test_client_exports_its_counters_and_latency(
    server: UdpServer, collector: FakeCollector
) -> None:
    with FakeCollector() as vendor:
        client = Client(
            collector.dsn,
            statsd={"port": server.port, "interval": 3600, "tags": ["service:api"]},
            destinations=[Destination(vendor.dsn, name="vendor")],
            **FAST_OPTIONS,
        )
        client.capture_message("one")
        client.capture_message("two")
        assert client.flush(5)
        assert vendor.wait_for(2)
        client.close(5)
    lines = server.wait_for(lambda got: len(got) >= 7)
    assert "selfreport.captured:2|c|#service:api" in lines
    assert "selfreport.sent:2|c|#service:api" in lines
    assert "selfreport.accepted:2|c|#destination:vendor,service:api" in lines
    assert "selfreport.sent:2|c|#destination:vendor,service:api" in lines
    assert "selfreport.queue.depth:0|g|#service:api" in lines
    latencies = [line for line in lines if metric(line) == "selfreport.send.latency"]
    assert len(latencies) == 4
    assert sum("destination:vendor" in line for line in latencies) == 2


def test_client_statsd_option_errors(collector: FakeCollector) -> None:
    with pytest.raises(ConfigError) as info:
        Client(collector.dsn, statsd="ftp://x")
    assert info.value.option == "statsd"
