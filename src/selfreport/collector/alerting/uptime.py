"""Uptime probes: URLs fetched on their intervals, each one's last result and failure streak."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Union

from selfreport._core.diag import Diagnostics
from selfreport._core.guard import enter_thread_for_life
from selfreport._delivery.transport import Connector

__all__ = ["ProbeResult", "UptimeCheck", "UptimeProber", "UptimeStatus", "probe"]

_USER_AGENT = "selfreport-uptime/1"
_MAX_BODY = 64 * 1024  # read (and drop) at most this much of an answer


class UptimeCheck(Protocol):
    """What the prober needs of an ``[[uptime]]`` entry (the configuration's UptimeConfig);
    read-only, so frozen dataclasses with narrower types (a tuple of statuses) fit."""

    @property
    def url(self) -> str: ...

    @property
    def interval(self) -> float:
        """Seconds between probes."""

    @property
    def timeout(self) -> float:
        """Seconds one probe may take."""

    @property
    def expect_status(self) -> Union[int, Sequence[int]]: ...

    @property
    def consecutive(self) -> int:
        """Failed probes in a row that make the URL down."""

    @property
    def name(self) -> Optional[str]: ...


@dataclass(frozen=True)
class ProbeResult:
    """One probe: up or not, the status code (None when no answer), how long, why down."""

    up: bool
    status: Optional[int]
    latency: float  # seconds
    error: Optional[str]
    at: float  # wall-clock time of the probe


@dataclass(frozen=True)
class UptimeStatus:
    """A URL's state for the alert engine and the Monitors page.

    ``up`` is None before the first probe; ``down`` is True once ``consecutive_failures``
    reached the check's ``consecutive`` (so one lost packet does not page anyone).
    """

    name: str
    url: str
    up: Optional[bool]
    down: bool
    consecutive_failures: int
    last: Optional[ProbeResult]
    since: Optional[float]  # when the current up/down state began
    interval: float
    threshold: int

    @property
    def failing(self) -> bool:
        """What an ``uptime`` alert fires on (the same as ``down``)."""
        return self.down

    @property
    def subject(self) -> str:
        """What an alert about this URL is about: the check's name (its URL without one)."""
        return self.name


def _expected(check: UptimeCheck) -> tuple[int, ...]:
    wanted = check.expect_status
    if isinstance(wanted, int):
        return (wanted,)
    return tuple(wanted)


def probe(
    check: UptimeCheck,
    clock: Callable[[], float] = time.time,
    timer: Callable[[], float] = time.monotonic,
) -> ProbeResult:
    """GET ``check.url`` once, within its timeout, redirects not followed; never raises.

    The request carries no selfreport marks and no trace headers: a watched collector sees
    an ordinary client, and nothing of the probe is reported by either side.
    """
    at = clock()
    start = timer()
    status: Optional[int] = None
    error: Optional[str] = None
    try:
        connector, path = Connector.for_url(check.url)
        connection = connector.connect(check.timeout)
        try:
            connection.request(
                "GET", path, headers={"User-Agent": _USER_AGENT, "Connection": "close"}
            )
            answer = connection.getresponse()
            status = answer.status
            answer.read(_MAX_BODY)
        finally:
            connection.close()
    except Exception as exc:  # refused, reset, timeout, TLS, a bad URL: all mean down
        error = f"{type(exc).__name__}: {exc}"[:300]
    latency = timer() - start
    up = status is not None and status in _expected(check)
    if status is not None and not up:
        error = f"HTTP {status}"
    return ProbeResult(up, status, latency, error, at)


class _State:
    """One check's results so far (under the prober's lock)."""

    def __init__(self, check: UptimeCheck, name: str) -> None:
        self.check = check
        self.name = name
        self.last: Optional[ProbeResult] = None
        self.failures = 0
        self.since: Optional[float] = None
        self.down = False
        self.due = 0.0  # monotonic time of the next probe

    def record(self, result: ProbeResult) -> None:
        was = None if self.last is None else self.last.up
        self.failures = 0 if result.up else self.failures + 1
        down = self.failures >= max(1, int(self.check.consecutive))
        if was is None or result.up != was:
            self.since = result.at
        self.down = down
        self.last = result

    def status(self) -> UptimeStatus:
        return UptimeStatus(
            name=self.name,
            url=self.check.url,
            up=None if self.last is None else self.last.up,
            down=self.down,
            consecutive_failures=self.failures,
            last=self.last,
            since=self.since,
            interval=float(self.check.interval),
            threshold=max(1, int(self.check.consecutive)),
        )


class UptimeProber:
    """Probes each check on its interval, one daemon thread per check (a URL that hangs until
    its timeout delays no other), inside the reporting path (a probe that fails is a result,
    never a report); ``status()`` for the engine and the page.

    ``on_result(name, result)`` (optional) is called after each probe, e.g. to keep the last
    results in the store; it must not block for long.
    """

    def __init__(
        self,
        checks: Sequence[UptimeCheck],
        *,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
        on_result: Optional[Callable[[str, ProbeResult], None]] = None,
        diagnostics: Optional[Diagnostics] = None,
    ) -> None:
        self.clock = clock
        self.timer = timer
        self.on_result = on_result
        self.diagnostics = diagnostics or Diagnostics()
        self._states = [_State(check, check.name or check.url) for check in checks]
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.probes = 0

    def status(self) -> list[UptimeStatus]:
        """Every check's state now (a snapshot; never blocks on a probe)."""
        with self._lock:
            return [state.status() for state in self._states]

    def probe_all(self) -> None:
        """Probe every check once now, one after the other (tests; the threads probe alone)."""
        for state in self._states:
            self._probe(state)

    def _probe(self, state: _State) -> None:
        result = probe(state.check, self.clock, self.timer)
        with self._lock:
            state.record(result)
            state.due = self.timer() + float(state.check.interval)
            self.probes += 1
        if self.on_result is not None:
            try:
                self.on_result(state.name, result)
            except Exception as exc:
                self.diagnostics.warn("uptime_store", f"could not keep an uptime result: {exc!r}")

    def start(self) -> None:
        """Start probing: a thread per check (none without checks); idempotent."""
        with self._lock:
            if self._threads or self._stopping:
                return
            for index, state in enumerate(self._states):
                name = f"selfreport-uptime-{index}"
                thread = threading.Thread(target=self._run, args=(state,), name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _run(self, state: _State) -> None:
        enter_thread_for_life()
        while True:
            with self._lock:
                while not self._stopping and state.due > self.timer():
                    self._wake.wait(max(0.01, state.due - self.timer()))
                if self._stopping:
                    return
            self._probe(state)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the threads; waits at most ``timeout`` in all (a probe under way ends by its
        own timeout, on a daemon thread)."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
