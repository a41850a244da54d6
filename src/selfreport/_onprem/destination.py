"""Destinations: one upstream each, with its own queue, thread, scrubber, limits and spool."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Union

from selfreport._admission.ratelimit import TokenBucket
from selfreport._capture.sensitive import Scrub, resolve_scrub
from selfreport._core.counters import Counters
from selfreport._core.diag import Diagnostics
from selfreport._core.dsn import Dsn, parse_dsn
from selfreport._core.fork import fresh_event, on_fork_child
from selfreport._core.guard import ReportingPath
from selfreport._core.options import check_number, check_text
from selfreport._delivery.envelope import serialize_envelope
from selfreport._delivery.retry import Retry
from selfreport._delivery.spool import DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES
from selfreport._delivery.transport import Transport
from selfreport._delivery.upstream import SpoolOptions, Upstream
from selfreport._delivery.worker import Worker
from selfreport.exceptions import ConfigError

__all__ = ["DESTINATION_STAT_KEYS", "Destination", "plain_copy"]

Event = dict[str, Any]
Latency = Callable[[float, tuple[str, ...]], None]

DESTINATION_STAT_KEYS = (
    "accepted",  # taken into the destination's queue
    "sent",  # acknowledged by the upstream (directly or replayed from the spool)
    "dropped_rate_limited",  # the destination's token bucket, or a 429 without a spool
    "dropped_queue_full",
    "dropped_error",  # not a dict, or scrubbing/serializing raised: dropped, never sent raw
    "dropped_closed",
    "send_failed",  # refused by the upstream, given up after retries, or not spoolable
    "retried",
    "spooled",  # kept on disk while the upstream was unavailable
    "replayed",  # of sent: delivered from the spool
    "dropped_spool_full",  # the oldest spooled envelopes, dropped to stay under max bytes
    "dropped_spool_expired",  # spooled envelopes older than the spool's max age
    "quarantined",  # spooled envelopes refused for good or failing again and again (5xx)
    "queue_size",
    "spool_size",
)


def plain_copy(value: Any, depth: int = 0) -> Any:
    """A copy of the dicts and lists in an event (other values are shared), so that several
    destinations can scrub it on their own threads without seeing each other's changes."""
    if depth > 64:
        return value
    if isinstance(value, Mapping):
        return {key: plain_copy(item, depth + 1) for key, item in list(value.items())}
    if isinstance(value, (list, tuple)):
        return [plain_copy(item, depth + 1) for item in list(value)]
    return value


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Destination:
    """One more upstream for events, independent of every other one.

    Each destination has its own transport, scrubber, token bucket, upstream (429) limits,
    optional spool and its own worker thread, so a slow or failing upstream never holds up
    the others (the design of Sentry's multiplexing transport). Pass destinations to
    ``selfreport.init(destinations=[...])``, or use one on its own in a server that forwards
    events it already has::

        upstream = Destination("https://key@vendor.example/42", scrub=True, spool_dir="/var/sr")
        upstream.send_event(event)   # never blocks, never raises; False when dropped
        ...
        upstream.close()

    ``send_event`` takes ownership of the dict: do not change it afterwards.

    Args:
        dsn: where to send (Sentry-format DSN).
        name: for stats and metrics; default ``host:port/project``.
        scrub: ``True`` for the default :class:`~selfreport.Scrubber`, or any callable taking
            and returning the event. Off by default. A scrubber that raises drops the event.
        rate_limit: this destination's token bucket: events per second (0 disables it).
        rate_burst: events that may go at once before ``rate_limit`` applies.
        max_queue: events waiting for this destination's thread at most.
        http_timeout: seconds per HTTP operation, as for the client.
        max_retries: retries of a failed send (5xx, no answer) when there is no spool,
            0 to 10.
        retry_backoff: first delay between those retries in seconds, doubled each time, 0 to
            30; no wait is longer than 30 s (nor a ``Retry-After`` waited for past that).
        compress: gzip envelopes over 1 KiB.
        spool_dir: keep envelopes on disk while the upstream is unreachable or answers
            5xx/429, and replay them in order once it answers again (also after a restart).
        spool_max_bytes: size bound of the spool; the oldest envelopes go first.
        spool_max_age: age bound of the spool in seconds.
        replay_backoff: first delay between replay rounds while the upstream is down, in
            seconds (0.001 to 60), doubled each time up to ``replay_max_backoff`` (at most
            3600); a ``Retry-After`` or rate limit is waited out whatever its length (up to
            an hour).
        transport: a custom transport, any object with ``send(body, timeout)`` (tests); default
            HTTP to the DSN.

    Raises:
        ConfigError: a malformed DSN or option.
    """

    def __init__(
        self,
        dsn: Union[str, Dsn, None] = None,
        *,
        name: Optional[str] = None,
        scrub: Union[bool, Scrub, None] = None,
        rate_limit: float = 10.0,
        rate_burst: int = 100,
        max_queue: int = 1000,
        http_timeout: float = 5.0,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        compress: bool = True,
        spool_dir: Union[str, os.PathLike[str], None] = None,
        spool_max_bytes: int = DEFAULT_MAX_BYTES,
        spool_max_age: float = DEFAULT_MAX_AGE,
        replay_backoff: float = 1.0,
        replay_max_backoff: float = 60.0,
        transport: object = None,
        diagnostics: Optional[Diagnostics] = None,
    ) -> None:
        check_number("rate_limit", rate_limit, 0.0)
        check_number("rate_burst", rate_burst, 1, 10_000_000, integer=True)
        check_number("max_queue", max_queue, 1, 10_000_000, integer=True)
        check_number("http_timeout", http_timeout, 0.001, 600.0)
        retry = Retry.for_delivery(max_retries, retry_backoff)
        replay = Retry.for_replay(replay_backoff, replay_max_backoff)
        self.dsn: Optional[Dsn] = parse_dsn(dsn) if isinstance(dsn, str) else dsn
        self.name = _check_name(name, self.dsn, transport)
        self.tags = (f"destination:{self.name}",)
        self.http_timeout = float(http_timeout)
        self.max_retries = max_retries
        self.retry_backoff = float(retry_backoff)
        self._scrub = resolve_scrub(scrub)
        self._bucket = TokenBucket(rate_limit, rate_burst)
        self.diagnostics = diagnostics or Diagnostics()
        self._counters = Counters(DESTINATION_STAT_KEYS)
        self._closed = threading.Event()
        self.latency: Optional[Latency] = None  # set by a metrics exporter
        spool = None
        if spool_dir is not None:
            spool = SpoolOptions(spool_dir, spool_max_bytes, spool_max_age, replay)
        self.upstream = Upstream.connect(
            self.dsn,
            transport,
            compress=compress,
            spool=spool,
            count=self._count,
            diagnostics=self.diagnostics,
            closed=self._closed,
            http_timeout=self.http_timeout,
            retry=retry,
            observe=self._observe,
            name=self.name,
        )
        self._worker: Worker[Mapping[str, Any]] = Worker(
            self._process, max_queue, name=f"selfreport-destination-{self.name}"
        )
        on_fork_child(self.after_fork_in_child)

    @property
    def transport(self) -> Transport:
        return self.upstream.transport

    def __repr__(self) -> str:
        return f"Destination({self.name!r})"

    # --- stats -------------------------------------------------------------------------------

    def _count(self, key: str, amount: int = 1) -> None:
        self._counters.add(key, amount)

    def stats(self) -> dict[str, int]:
        """A snapshot of this destination's counters (``DESTINATION_STAT_KEYS``)."""
        out = self._counters.snapshot()
        out["queue_size"] = self._worker.qsize()
        out["spool_size"] = self.upstream.spool_size()
        return out

    def spool_nearly_full(self) -> bool:
        """Whether the spool is past 90% of its size bound, or two more envelopes of the
        average size would not fit: a sender that can keep events itself (a forwarding
        collector) should hold them back rather than make the spool drop its oldest."""
        return self.upstream.spool_nearly_full()

    def _observe(self, seconds: float) -> None:
        latency = self.latency
        if latency is not None:
            latency(seconds, self.tags)

    # --- the caller's side -------------------------------------------------------------------

    def send_event(self, event: object, copy: bool = False) -> bool:
        """Queue ``event`` for this upstream; never blocks or raises. False when dropped.

        The destination owns ``event`` from now on; ``copy=True`` queues a copy of its dicts
        and lists instead (for an event that other code keeps using or changing).
        """
        try:
            if self._closed.is_set():
                self._count("dropped_closed")
                return False
            if not isinstance(event, Mapping):
                self._count("dropped_error")
                self.diagnostics.warn(
                    "destination_type", f"{self.name}: send_event() needs a dict, dropped"
                )
                return False
            if self._worker.full():
                self._count("dropped_queue_full")
                self.diagnostics.warn(
                    f"destination_full:{self.name}",
                    f"{self.name}: queue full, dropping events (is the upstream slow?)",
                )
                return False
            if not self._bucket.take():
                self._count("dropped_rate_limited")
                return False
            item: Mapping[str, Any] = plain_copy(event) if copy else event
            if not self._worker.submit(item):  # pragma: no cover - closed or filled meanwhile
                self._count("dropped_closed" if self._closed.is_set() else "dropped_queue_full")
                return False
            self._count("accepted")
            return True
        except Exception as error:  # a dict whose items() raises: never raise into the caller
            self._count("dropped_error")
            self.diagnostics.warn(
                "destination_copy", f"{self.name}: could not take an event: {error!r}"
            )
            return False

    # --- the worker's side -------------------------------------------------------------------

    def _envelope(self, event: Mapping[str, Any]) -> Optional[bytes]:
        try:
            with ReportingPath():
                prepared: Mapping[str, Any] = event
                if self._scrub is not None:
                    prepared = self._scrub(dict(event))
                    if not isinstance(prepared, Mapping):
                        raise TypeError(f"the scrubber returned {type(prepared).__name__}")
                return serialize_envelope(prepared, self.dsn, _now_iso())
        except BaseException as error:  # a scrubber's, on our own thread: counted, not lost
            self._count("dropped_error")
            self.diagnostics.warn(
                f"destination_prepare:{self.name}",
                f"{self.name}: dropped an event because scrubbing or serializing it raised "
                f"{error!r}",
            )
            return None

    def _process(self, event: Mapping[str, Any]) -> None:
        if self.upstream.holding_back():
            self._count("dropped_rate_limited")
            return
        body = self._envelope(event)
        if body is None:
            return
        try:
            self._deliver(body)
        except BaseException as error:  # a transport answering nonsense: counted, not lost
            self._count("send_failed")
            self.diagnostics.warn(
                f"destination_deliver:{self.name}", f"{self.name}: delivery raised {error!r}"
            )

    def _deliver(self, body: bytes) -> None:
        self.upstream.deliver(body)

    # --- lifecycle ---------------------------------------------------------------------------

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until everything queued so far was sent or spooled; False on timeout."""
        try:
            return self._worker.flush(timeout)
        except Exception:  # pragma: no cover - never raise into the caller
            return False

    def close(self, timeout: float = 2.0) -> None:
        """Deliver or spool what is queued within ``timeout`` seconds, then stop."""
        if self._closed.is_set():
            return
        try:
            self._closed.set()
            self.upstream.close(self._worker, max(0.0, float(timeout)), self._keep_or_drop)
        except Exception as error:  # pragma: no cover - never raise into the caller
            self.diagnostics.warn("destination_close", f"{self.name}: error closing: {error!r}")

    def _keep_or_drop(self, events: list[Mapping[str, Any]]) -> None:
        """Events still queued at a timed-out close: to the spool if there is one."""
        if self.upstream.spool is None:
            self._count("dropped_closed", len(events))
            return
        for event in events:
            body = self._envelope(event)
            if body is not None:
                self.upstream.keep(body)

    def after_fork_in_child(self) -> None:
        """A fresh queue, locks and connections in a forked child."""
        self._worker.reset_after_fork()
        self._counters.reset()
        self._closed = fresh_event(self._closed)  # its lock may be held
        self._bucket.reset_after_fork()
        self.diagnostics.reset_after_fork()
        self.upstream.after_fork_in_child(self._closed)


def _check_name(name: Optional[str], dsn: Optional[Dsn], transport: object) -> str:
    if dsn is None and transport is None:
        raise ConfigError("dsn", "a destination needs a DSN (or a transport)")
    if name is None:
        name = f"{dsn.netloc}/{dsn.project_id}" if dsn is not None else "custom"
    check_text("name", name, nonempty=True)
    return name
