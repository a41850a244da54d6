"""One upstream: transport, limits, the retry policy, spool and replay, close and fork reset."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar, Union

from selfreport._core.diag import Diagnostics
from selfreport._core.dsn import Dsn
from selfreport._core.processors import unobserved

from .retry import Outcome, Retry, UpstreamLimits
from .spool import DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, Replayer, Spool
from .transport import HttpTransport, Response, Transport, as_transport
from .worker import Worker

__all__ = ["SpoolOptions", "Upstream", "send_unobserved"]

T = TypeVar("T")
Count = Callable[..., None]

# What the spool's drops are counted as.
_SPOOL_DROPS = {
    "full": "dropped_spool_full",
    "expired": "dropped_spool_expired",
    "quarantined": "quarantined",
}


def send_unobserved(transport: Transport, body: bytes, timeout: float) -> Response:
    """``transport.send`` inside :func:`~selfreport._core.processors.unobserved`."""
    with unobserved():
        return transport.send(body, timeout)


@dataclass(frozen=True)
class SpoolOptions:
    """Where and how much an upstream keeps on disk, and how its replay backs off."""

    directory: Union[str, os.PathLike[str]]
    max_bytes: int = DEFAULT_MAX_BYTES
    max_age: float = DEFAULT_MAX_AGE
    replay: Retry = field(default_factory=Retry.for_replay)


class _Uplink:
    """The durable side of an upstream: a :class:`Spool` and the :class:`Replayer` draining it."""

    def __init__(self, upstream: Upstream, options: SpoolOptions, transport: Transport) -> None:
        self._upstream = upstream
        self.transport = transport
        count = upstream.count
        self.spool = Spool(
            options.directory,
            options.max_bytes,
            options.max_age,
            diagnostics=upstream.diagnostics,
            on_drop=lambda reason, amount: count(_SPOOL_DROPS[reason], amount),
        )
        self.replayer = Replayer(
            self.spool,
            self._replay,
            retry_after=lambda: upstream.limits.seconds_left("error"),
            on_sent=self._replayed,
            interrupt=transport.interrupt,
            policy=options.replay,
            name=f"selfreport-replay-{upstream.name}",
        )
        if self.spool.pending():  # left by an earlier run: send it now
            self.replayer.start()

    def should_spool(self) -> bool:
        """Whether to spool without trying: the upstream is down or told us to wait."""
        return self.replayer.down or self._upstream.limits.is_limited("error")

    def keep(self, body: bytes, upstream_failed: bool) -> None:
        """Spool ``body``; ``upstream_failed``: because sending it just failed."""
        if self.spool.put(body):
            self._upstream.count("spooled", 1)
            self.replayer.spooled(upstream_failed)
        elif self.spool.fits(body):  # too big for the spool is counted as dropped_spool_full
            self._upstream.count("send_failed", 1)

    def reject(self, body: bytes, status: int) -> None:
        """``body`` was refused for good (a 4xx other than 429): quarantined, for inspection;
        if even that fails (disk full, read-only), it is lost and counted as ``send_failed``."""
        if not self.spool.quarantine_body(body, f"the upstream refused it with HTTP {status}"):
            self._upstream.count("send_failed", 1)

    def _replayed(self) -> None:
        self._upstream.count("sent", 1)
        self._upstream.count("replayed", 1)

    def _replay(self, body: bytes) -> Outcome:
        upstream = self._upstream
        outcome, status, _ = upstream.send_once(self.transport, body, upstream.http_timeout)
        if outcome is Outcome.REFUSED:  # counted as quarantined
            upstream.diagnostics.warn(
                f"replay_http_{status}",
                f"the upstream refused a spooled envelope with HTTP {status}: quarantined",
            )
        return outcome

    def close(self, timeout: float) -> bool:
        finished = self.replayer.stop(timeout)
        if finished:
            self.transport.close()
        return finished

    def after_fork_in_child(self) -> None:
        self.spool.after_fork_in_child()
        self.replayer.after_fork_in_child()
        self.transport.reset_after_fork()


class Upstream:
    """Where one owner (the Client, a Destination) sends its envelopes, on its worker thread.

    Every answer, replayed ones and 2xx included, is read by :meth:`UpstreamLimits.answer`
    (``Retry-After`` and ``X-Sentry-Rate-Limits`` honoured), and failures are retried as the
    :class:`Retry` policy says: 5xx and connection errors with capped, jittered exponential
    backoff, or, with a spool, into the spool at once (its replay thread retries); a 429 is
    never retried (spooled, or dropped as rate limited); other 4xx are final (quarantined with
    a spool). Everything is counted through ``count(key, amount=1)``. ``closed`` is the owner's.
    """

    def __init__(
        self,
        transport: object,
        *,
        count: Count,
        diagnostics: Diagnostics,
        closed: threading.Event,
        http_timeout: float = 5.0,
        retry: Optional[Retry] = None,
        spool: Optional[SpoolOptions] = None,
        replay_transport: Optional[Transport] = None,
        observe: Callable[[float], None] = lambda seconds: None,
        name: str = "the collector",
    ) -> None:
        self.transport = as_transport(transport)
        self.limits = UpstreamLimits()
        self.count = count
        self.diagnostics = diagnostics
        self.closed = closed
        self.http_timeout = float(http_timeout)
        self.retry = retry or Retry()
        self.close_deadline: Optional[float] = None  # monotonic, once closing
        self.name = name
        self._observe = observe
        self._uplink: Optional[_Uplink] = None
        if spool is not None:
            self._uplink = _Uplink(self, spool, replay_transport or self.transport)

    @classmethod
    def connect(
        cls,
        dsn: Optional[Dsn],
        transport: object = None,
        *,
        compress: bool = True,
        spool: Optional[SpoolOptions] = None,
        **options: Any,
    ) -> Upstream:
        """An upstream over HTTP to ``dsn``, or through a custom ``transport``; with a spool,
        its replay thread gets a connection of its own (a custom transport is shared)."""
        if transport is not None:
            return cls(transport, spool=spool, **options)
        assert dsn is not None
        replay = HttpTransport(dsn, compress=compress) if spool is not None else None
        return cls(
            HttpTransport(dsn, compress=compress), spool=spool, replay_transport=replay, **options
        )

    # --- state -------------------------------------------------------------------------------

    @property
    def spool(self) -> Optional[Spool]:
        return self._uplink.spool if self._uplink is not None else None

    @property
    def replayer(self) -> Optional[Replayer]:
        return self._uplink.replayer if self._uplink is not None else None

    def holding_back(self) -> bool:
        """Whether an envelope would be dropped as rate limited now (limited, and no spool)."""
        return self._uplink is None and self.limits.is_limited("error")

    def spool_size(self) -> int:
        return len(self._uplink.spool) if self._uplink is not None else 0

    def spool_nearly_full(self) -> bool:
        """Whether the spool is past 90% of its size bound, or two more envelopes of the
        average size would not fit."""
        if self._uplink is None:
            return False
        spool = self._uplink.spool
        stats = spool.stats()
        used, files = stats["bytes"], stats["files"]
        room = spool.max_bytes - used
        return used >= 0.9 * spool.max_bytes or (files > 0 and room < 2 * used / files)

    # --- delivery ----------------------------------------------------------------------------

    def deliver(self, body: bytes) -> None:
        uplink = self._uplink
        if uplink is not None and uplink.should_spool():
            uplink.keep(body, upstream_failed=False)  # down or rate limited: do not even try
            return
        # With a spool, a failure goes to disk at once and the replay thread retries with
        # backoff (a stale keep-alive connection is already retried by the transport).
        retry = self.retry if uplink is None else self.retry.new(total=0)
        while True:
            timeout = self.http_timeout
            if self.close_deadline is not None:
                timeout = min(timeout, self.close_deadline - time.monotonic())
                if timeout <= 0:
                    self._give_up(body, "close() ran out of time")
                    return
            outcome, status, problem = self.send_once(self.transport, body, timeout)
            if outcome not in (Outcome.FAILED, Outcome.UNREACHABLE):
                self._settle(body, outcome, status)
                return
            asked = self.limits.seconds_left("error")  # a 503's Retry-After
            if self.closed.is_set() or not retry.is_retry(outcome, asked):
                if asked > retry.retry_after_max:
                    problem += f", and asked us to wait {asked:.0f} s"
                self._give_up(body, problem)
                return
            retry = retry.increment()
            self.count("retried")
            if self.closed.wait(retry.get_sleep_time(asked)):
                self._give_up(body, "closed while waiting to retry")
                return

    def send_once(
        self, transport: Transport, body: bytes, timeout: float
    ) -> tuple[Outcome, int, str]:
        """Send once (delivery or replay): the outcome, the HTTP status (0 without an answer),
        and what went wrong; the answer's headers are recorded in :attr:`limits`."""
        started = time.monotonic()
        try:
            response = send_unobserved(transport, body, timeout)
        except Exception as error:  # OSError, timeouts, anything a custom transport raises
            return Outcome.UNREACHABLE, 0, f"could not reach {self.name}: {error!r}"
        self._observe(time.monotonic() - started)
        outcome = self.limits.answer(response.status, response.headers)
        return outcome, response.status, f"{self.name} answered HTTP {response.status}"

    def _settle(self, body: bytes, outcome: Outcome, status: int) -> None:
        """Count (or spool) an envelope the upstream took, rate limited or refused for good."""
        uplink = self._uplink
        if outcome is Outcome.SENT:
            self.count("sent")
        elif outcome is Outcome.RATE_LIMITED:
            if uplink is not None:
                uplink.keep(body, upstream_failed=False)  # replayed once the limit is over
                return
            self.count("dropped_rate_limited")
            self.diagnostics.warn(f"429:{self.name}", f"{self.name} is rate limiting us (429)")
        else:
            self.diagnostics.warn(
                f"http_{status}:{self.name}", f"{self.name} refused an event with HTTP {status}"
            )
            if uplink is not None:
                uplink.reject(body, status)  # kept in quarantine/, counted there
            else:
                self.count("send_failed")

    def _give_up(self, body: bytes, problem: str) -> None:
        if self._uplink is not None:
            self._uplink.keep(body, upstream_failed=True)
            return
        self.count("send_failed")
        self.diagnostics.warn(f"send_failed:{self.name}", f"gave up sending an event: {problem}")

    def keep(self, body: bytes) -> bool:
        """Spool ``body`` without trying to send it (left at a timed-out close); False without
        a spool."""
        if self._uplink is None:
            return False
        self._uplink.keep(body, upstream_failed=False)
        return True

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self, worker: Worker[T], limit: float, left: Callable[[list[T]], None]) -> bool:
        """Stop ``worker`` delivering here within ``limit`` seconds, hand what it did not take
        to ``left``, then stop the replay within what remains; False when time ran out."""
        deadline = time.monotonic() + limit
        self.close_deadline = deadline
        finished = stop_worker(worker, limit, left, self.transport.interrupt)
        if finished:
            self.transport.close()
        if self._uplink is not None:
            self._uplink.close(max(0.0, deadline - time.monotonic()))
        return finished

    def after_fork_in_child(self, closed: threading.Event) -> None:
        """Forget the parent's connections and spool state; ``closed`` is the owner's new one."""
        self.closed = closed
        self.transport.reset_after_fork()
        if self._uplink is not None:
            self._uplink.after_fork_in_child()


def stop_worker(
    worker: Worker[T],
    limit: float,
    left: Callable[[list[T]], None],
    interrupt: Callable[[], None] = lambda: None,
) -> bool:
    """Let ``worker`` finish within ``limit`` seconds (the owner has set its closed flag).

    A sliver of the time is kept to ``interrupt`` a send stuck on a silent upstream, so the
    item in flight is spooled or counted before this returns. What the worker did not take
    goes to ``left``. False when the worker did not finish in time."""
    grace = min(0.1, limit / 10)
    finished = worker.stop(limit - grace)
    remaining = worker.drain()
    if remaining:
        left(remaining)
    if not finished:
        interrupt()
        worker.stop(grace)
    return finished
