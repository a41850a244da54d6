"""Delivering envelopes to one upstream: retries, 429s and the spool (client and destinations)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Optional

from selfreport._core.diag import Diagnostics

from .retry import Outcome, Retry, UpstreamLimits
from .transport import Response, Transport

if TYPE_CHECKING:
    from selfreport._onprem.destination import Uplink

__all__ = ["Delivery", "otel_integration", "send_unobserved", "unobserved"]


def otel_integration() -> Optional[ModuleType]:
    """selfreport.integrations.opentelemetry once the application has imported OpenTelemetry
    (never imported on our account), else None."""
    if "opentelemetry.context" not in sys.modules:
        return None
    try:
        from selfreport.integrations import opentelemetry
    except Exception:  # an OpenTelemetry too old or broken to use: report without it
        return None
    return opentelemetry


@contextmanager
def unobserved() -> Iterator[None]:
    """Tell instrumented HTTP clients (OpenTelemetry's) not to trace or log what runs inside."""
    otel = otel_integration()
    if otel is None:
        yield
        return
    with otel.suppress_instrumentation():
        yield


def send_unobserved(transport: Transport, body: bytes, timeout: float) -> Response:
    """``transport.send`` inside :func:`unobserved`."""
    with unobserved():
        return transport.send(body, timeout)


class Delivery:
    """Sends serialized envelopes to one upstream, on its owner's worker thread.

    Answers are read by :meth:`UpstreamLimits.answer` (``Retry-After`` and
    ``X-Sentry-Rate-Limits`` are honoured on every one) and retried as the :class:`Retry`
    policy says: 5xx and connection errors with capped, jittered exponential backoff, or, with
    an :class:`~selfreport._onprem.destination.Uplink`, into its spool at once (its replay thread
    retries); a 429 is never retried (spooled, or dropped as rate limited); other 4xx are final.
    Everything is counted through ``count``. ``close_deadline`` (monotonic) bounds the time
    spent once closing.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        limits: UpstreamLimits,
        count: Callable[..., None],
        diagnostics: Diagnostics,
        closed: threading.Event,
        http_timeout: float,
        retry: Retry,
        observe: Callable[[float], None] = lambda seconds: None,
        name: str = "the collector",
        uplink: Optional[Uplink] = None,
    ) -> None:
        self.transport = transport
        self.limits = limits
        self.uplink = uplink
        self.close_deadline: Optional[float] = None
        self.http_timeout = http_timeout
        self.retry = retry
        self._count = count
        self._diagnostics = diagnostics
        self.closed = closed  # replaced by the owner's fresh Event after a fork
        self._observe = observe
        self._name = name

    def deliver(self, body: bytes) -> None:
        uplink = self.uplink
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
            outcome, status, problem = self._try(body, timeout)
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
            self._count("retried")
            if self.closed.wait(retry.get_sleep_time(asked)):
                self._give_up(body, "closed while waiting to retry")
                return

    def _try(self, body: bytes, timeout: float) -> tuple[Outcome, int, str]:
        """Send once: the outcome, the HTTP status (0 without an answer), and what went wrong."""
        started = time.monotonic()
        try:
            response = send_unobserved(self.transport, body, timeout)
        except Exception as error:  # OSError, timeouts, anything a custom transport raises
            return Outcome.UNREACHABLE, 0, f"could not reach {self._name}: {error!r}"
        self._observe(time.monotonic() - started)
        outcome = self.limits.answer(response.status, response.headers)
        return outcome, response.status, f"{self._name} answered HTTP {response.status}"

    def _settle(self, body: bytes, outcome: Outcome, status: int) -> None:
        """Count (or spool) an envelope the upstream took, rate limited or refused for good."""
        uplink = self.uplink
        if outcome is Outcome.SENT:
            self._count("sent")
        elif outcome is Outcome.RATE_LIMITED:
            if uplink is not None:
                uplink.keep(body, upstream_failed=False)  # replayed once the limit is over
                return
            self._count("dropped_rate_limited")
            self._diagnostics.warn(f"429:{self._name}", f"{self._name} is rate limiting us (429)")
        else:
            self._diagnostics.warn(
                f"http_{status}:{self._name}", f"{self._name} refused an event with HTTP {status}"
            )
            if uplink is not None:
                uplink.reject(body, status)  # kept in quarantine/, counted there
            else:
                self._count("send_failed")

    def _give_up(self, body: bytes, problem: str) -> None:
        if self.uplink is not None:
            self.uplink.keep(body, upstream_failed=True)
            return
        self._count("send_failed")
        self._diagnostics.warn(f"send_failed:{self._name}", f"gave up sending an event: {problem}")
