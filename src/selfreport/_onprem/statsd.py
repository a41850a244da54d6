"""StatsD / DogStatsD metrics over UDP: counters, queue depth and send latency, from one thread."""

from __future__ import annotations

import inspect
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit

from selfreport._core.guard import enter_thread_for_life, reporting_path
from selfreport._core.options import check_choice, check_number, check_strings, check_text
from selfreport.exceptions import ConfigError

__all__ = ["StatsdConfig", "StatsdExporter"]

StatsSource = Callable[[], Mapping[str, int]]

_PROTOCOLS = ("dogstatsd", "statsd")
_GAUGES = {"queue_size": "queue.depth", "spool_size": "spool.depth"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_TIMINGS = 10_000
_RESOLVE_EVERY = 300.0  # seconds between DNS lookups of the StatsD host


@dataclass(frozen=True)
class StatsdConfig:
    """Where and how to send metrics.

    ``protocol="dogstatsd"`` sends tags (``reason:queue_full``, ``destination:NAME`` and
    ``tags``); ``"statsd"`` is the plain protocol, with tag values folded into the metric names
    (``selfreport.dropped.queue_full``) and ``tags`` unused.
    """

    host: str = "127.0.0.1"
    port: int = 8125
    prefix: str = "selfreport"
    tags: tuple[str, ...] = ()
    interval: float = 10.0
    protocol: str = "dogstatsd"
    latency_metric: str = "send.latency"
    extra: Mapping[str, Any] = field(default_factory=dict)  # more DogStatsd() arguments

    def __post_init__(self) -> None:
        check_text("statsd", self.host, nonempty=True, what="host")
        check_number("statsd", self.port, 1, 65535, integer=True, what="port")
        check_text("statsd", self.prefix, what="prefix")
        tags = check_strings("statsd", self.tags, what="tags ('key:value')")
        object.__setattr__(self, "tags", tuple(tags))
        check_number("statsd", self.interval, 0.01, 3600, what="interval (seconds)")
        check_choice("statsd", self.protocol, _PROTOCOLS, what="protocol")

    @classmethod
    def parse(cls, value: Union[str, StatsdConfig, Mapping[str, Any]]) -> StatsdConfig:
        """From a config, a dict of fields, or ``host:port`` / ``statsd://host:port`` /
        ``dogstatsd://host:port`` (the scheme picks the protocol; IPv6 as ``[::1]:8125``)."""
        if isinstance(value, StatsdConfig):
            return value
        if isinstance(value, Mapping):
            fields = dict(value)
            try:
                return cls(**fields)
            except TypeError as exc:
                raise ConfigError("statsd", str(exc)) from None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError("statsd", "expected 'host:port', a StatsdConfig or a dict")
        text = value.strip()
        protocol = "dogstatsd"
        if "://" not in text:
            text = "udp://" + text
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise ConfigError("statsd", f"invalid address {value!r}: {exc}") from None
        if parts.scheme in _PROTOCOLS:
            protocol = parts.scheme
        elif parts.scheme != "udp":
            raise ConfigError("statsd", f"scheme must be udp, statsd or dogstatsd: {value!r}")
        if not parts.hostname:
            raise ConfigError("statsd", f"no host in {value!r}")
        return cls(host=parts.hostname, port=port or 8125, protocol=protocol)


def _load_client_class() -> Any:
    try:
        with reporting_path():  # datadog logs as it loads: never a report of ours
            from datadog.dogstatsd.base import DogStatsd
    except ImportError:
        raise ConfigError(
            "statsd", "needs the datadog package: pip install 'selfreport[statsd]'"
        ) from None
    return DogStatsd


class StatsdExporter:
    """Sends the counters of the client and its destinations as StatsD metrics.

    Every ``interval`` seconds one thread (part of the reporting path for its whole life)
    sends what each counter grew by since the last time (``captured``, ``sent``, ``spooled``,
    ``replayed``, ``retried``, ``send_failed``, ``dropped`` by ``reason``), the queue and spool
    depth as gauges, and the send latencies recorded by :meth:`timing`. The datadog client is
    used synchronously from that thread only: no buffering or sender threads of its own.
    """

    def __init__(self, config: StatsdConfig) -> None:
        self.config = config
        self._client_class = _load_client_class()
        self._client: Any = None
        self._resolved_at = -_RESOLVE_EVERY
        self._sources: list[tuple[tuple[str, ...], StatsSource]] = []
        self._last: dict[tuple[int, str], int] = {}
        self._timings: deque[tuple[float, tuple[str, ...]]] = deque(maxlen=_MAX_TIMINGS)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.errors = 0

    def add_source(self, stats: StatsSource, tags: tuple[str, ...] = ()) -> None:
        """Export the counters ``stats()`` returns, with ``tags`` (``("destination:x",)``)."""
        with self._lock:
            self._sources.append((tuple(tags), stats))

    def timing(self, seconds: float, tags: tuple[str, ...] = ()) -> None:
        """Record one send latency; sent with the next flush (never blocks)."""
        self._timings.append((seconds * 1000.0, tags))
        if self._thread is None:  # after a fork: the child's first send starts its thread
            self.start()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                thread = threading.Thread(target=self._run, name="selfreport-statsd", daemon=True)
                self._thread = thread
                thread.start()

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread after it sent the last deltas, waiting ``timeout`` seconds at most
        (resolving the host name can hang; it does so on that thread, not the caller's)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, timeout))
        if thread is None or not thread.is_alive():
            with reporting_path():  # datadog logs if closing fails
                self._close_client()  # never started, or done: the socket is ours to close

    def after_fork_in_child(self) -> None:
        """The child starts with its own socket and thread, and counts from zero."""
        self._lock = threading.Lock()
        self._client = None
        self._thread = None
        self._last.clear()
        self._timings.clear()

    def _run(self) -> None:
        enter_thread_for_life()
        while not self._stop.wait(self.config.interval):
            self.flush()
        self.flush()  # the last deltas, at close
        self._close_client()

    # --- sending -----------------------------------------------------------------------------

    def _resolve(self) -> str:
        """The host's address, looked up here once in a while: the datadog client would look
        it up again for every metric while the name does not resolve, and lookups can hang."""
        infos = socket.getaddrinfo(self.config.host, self.config.port, 0, socket.SOCK_DGRAM)
        infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first, as datadog does
        return str(infos[0][4][0])

    def _make_client(self, address: str) -> Any:
        config = self.config
        plain = config.protocol == "statsd"
        wanted: dict[str, Any] = {
            "host": address,
            "port": config.port,
            "namespace": config.prefix or None,
            "constant_tags": [] if plain else list(config.tags),
            # Synchronous sends from our thread only: no threads, no fork hooks of its own.
            "disable_buffering": True,
            "disable_aggregation": True,
            "disable_background_sender": True,
            "disable_telemetry": True,
            "origin_detection_enabled": False,
            "track_instance": False,
            "socket_timeout": 0,
        }
        wanted.update(config.extra)
        accepted = inspect.signature(self._client_class.__init__).parameters
        client = self._client_class(**{k: v for k, v in wanted.items() if k in accepted})
        if plain:
            client.constant_tags = []  # DATADOG_TAGS / DD_ENV would add tags plain StatsD lacks
        return client

    def _metric(self, name: str, tags: tuple[str, ...]) -> tuple[str, Optional[list[str]]]:
        if self.config.protocol == "dogstatsd":
            return name, list(tags) or None
        prefix: list[str] = []
        suffix: list[str] = []
        for tag in tags:
            key, _, value = tag.partition(":")
            if key == "reason":
                suffix.append(_UNSAFE.sub("_", value))
            else:
                prefix.extend((_UNSAFE.sub("_", key), _UNSAFE.sub("_", value)))
        return ".".join([*prefix, name, *suffix]), None

    def _points(self) -> list[tuple[str, str, float, tuple[str, ...]]]:
        """(kind, name, value, tags) for every change since the last flush."""
        points: list[tuple[str, str, float, tuple[str, ...]]] = []
        with self._lock:
            sources = list(self._sources)
        for index, (tags, stats) in enumerate(sources):
            try:
                snapshot = dict(stats())
            except Exception:  # pragma: no cover - stats() never raises
                continue
            for key, value in snapshot.items():
                if key in _GAUGES:
                    points.append(("gauge", _GAUGES[key], value, tags))
                    continue
                previous = self._last.get((index, key), 0)
                self._last[(index, key)] = value
                delta = value - previous if value >= previous else value  # reset after a fork
                if delta <= 0:
                    continue
                if key.startswith("dropped_"):
                    points.append(("count", "dropped", delta, (*tags, f"reason:{key[8:]}")))
                else:
                    points.append(("count", key, delta, tags))
        while self._timings:
            try:
                millis, tags = self._timings.popleft()
            except IndexError:  # pragma: no cover - emptied by a concurrent flush
                break
            points.append(("timing", self.config.latency_metric, millis, tags))
        return points

    def flush(self) -> int:
        """Send what changed since the last flush; the number of metrics sent. Never raises."""
        try:
            if self._client is None or time.monotonic() - self._resolved_at > _RESOLVE_EVERY:
                address = self._resolve()  # raises before the deltas are taken: none are lost
                self._close_client()
                self._client = self._make_client(address)
                self._resolved_at = time.monotonic()
            points = self._points()
            client = self._client
            for kind, name, value, tags in points:
                metric, metric_tags = self._metric(name, tags)
                if kind == "count":
                    client.increment(metric, int(value), tags=metric_tags)
                elif kind == "gauge":
                    client.gauge(metric, value, tags=metric_tags)
                else:
                    client.timing(metric, round(value, 3), tags=metric_tags)
            return len(points)
        except Exception:
            # A resolver or socket problem: counted; the next flush tries again.
            self.errors += 1
            self._close_client()
            return 0

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close_socket()
            except Exception:  # pragma: no cover - closing a UDP socket does not fail
                pass
