"""Composable health checks behind ``GET /health``: each says ok or not, and why."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from selfreport._core.dsn import Dsn

from .store import Store

__all__ = [
    "Check",
    "CheckResult",
    "HealthChecks",
    "default_checks",
    "disk_space",
    "queue_below",
    "storage_writable",
    "upstream_reachable",
    "writer_alive",
]


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


# A check is an async callable returning a CheckResult; one that raises or takes longer than
# the timeout counts as failed, with the reason as its detail.
Check = Callable[[], Awaitable[CheckResult]]


class HealthChecks:
    """A named list of checks, run concurrently, each bounded by ``timeout`` seconds."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        """Add (or replace) the check called ``name``."""
        self._checks[name] = check

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    @property
    def names(self) -> list[str]:
        return list(self._checks)

    async def _run_one(self, check: Check) -> tuple[CheckResult, float]:
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(check(), self.timeout)
        except asyncio.TimeoutError:
            result = CheckResult(False, f"no answer within {self.timeout:g}s")
        except Exception as exc:
            result = CheckResult(False, f"the check raised {exc!r}")
        return result, time.perf_counter() - started

    async def run(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """(all ok, per check: ok, detail, duration_ms)."""
        names = list(self._checks)
        outcomes = await asyncio.gather(*(self._run_one(self._checks[n]) for n in names))
        report = {
            name: {"ok": result.ok, "detail": result.detail, "duration_ms": round(took * 1e3, 2)}
            for name, (result, took) in zip(names, outcomes)
        }
        return all(r.ok for r, _ in outcomes), report


def writer_alive(storage: Store) -> Check:
    """The writer thread runs and its last try worked; says how often it was restarted
    and its last failure. Failing while the writer fails again and again (it keeps trying)."""

    async def check() -> CheckResult:
        history = ""
        if storage.writer_restarts or storage.writer_last_error:
            ago = time.time() - (storage.writer_last_error_at or time.time())
            history = (
                f"; restarts after failures: {storage.writer_restarts},"
                f" the last failure {ago:.0f}s ago: {storage.writer_last_error}"
            )
        if not storage.writer_alive:
            return CheckResult(False, "the storage writer thread is not running" + history)
        failing = storage.writer_failing
        if failing:
            return CheckResult(
                False,
                f"the storage writer is down ({failing} failures in a row), retrying" + history,
            )
        return CheckResult(True, "the storage writer thread is running" + history)

    return check


def storage_writable(storage: Store) -> Check:
    """A tiny write through the writer thread, committed to disk. Waiting for it may time
    out (the health timeout) and the writer goes on. One probe at a time: concurrent checks
    (anyone can ask for ``/health``) wait on the one in flight rather than each queueing a
    write, so a flood of them during a stall takes one place in the write queue, not
    thousands."""
    inflight: Optional[asyncio.Future[float]] = None

    async def check() -> CheckResult:
        nonlocal inflight
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if inflight is None or inflight.done() or inflight.get_loop() is not loop:
            inflight = asyncio.wrap_future(storage.probe())
            # Its failure may outlive every check waiting on it: retrieved here, so asyncio
            # does not log "exception was never retrieved" outside the reporting path.
            inflight.add_done_callback(_retrieve)
        # Shielded: a check that times out leaves the probe for the others to wait on.
        await asyncio.shield(inflight)
        took = (time.perf_counter() - started) * 1e3
        return CheckResult(True, f"a probe write committed in {took:.1f} ms")

    return check


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def queue_below(storage: Store, threshold: int) -> Check:
    async def check() -> CheckResult:
        size = storage.queue_size
        ok = size < threshold
        return CheckResult(ok, f"{size} writes waiting (threshold {threshold})")

    return check


def disk_space(path: Union[str, Path], min_free_bytes: int) -> Check:
    async def check() -> CheckResult:
        free = shutil.disk_usage(path).free
        ok = free >= min_free_bytes
        return CheckResult(ok, f"{free // 2**20} MiB free (minimum {min_free_bytes // 2**20} MiB)")

    return check


def upstream_reachable(
    target: Union[Dsn, tuple[str, int]],
    connect: Optional[Callable[[str, int, float], None]] = None,
    timeout: float = 1.5,
) -> Check:
    """The upstream (a DSN, or host and port) accepts TCP connections; for forwarding."""
    if isinstance(target, Dsn):
        port = target.port or (443 if target.scheme == "https" else 80)
        host_port = (target.host, port)
    else:
        host_port = target
    opener = connect or _tcp_connect

    async def check() -> CheckResult:
        host, port = host_port
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, opener, host, port, timeout)
        except OSError as exc:
            return CheckResult(False, f"cannot connect to {host}:{port}: {exc}")
        return CheckResult(True, f"{host}:{port} accepts connections")

    return check


def _tcp_connect(host: str, port: int, timeout: float) -> None:
    with socket.create_connection((host, port), timeout=timeout):
        pass


def default_checks(
    storage: Store,
    *,
    queue_threshold: Optional[int] = None,
    min_free_bytes: int = 100 * 2**20,
    extra: Iterable[tuple[str, Check]] = (),
) -> HealthChecks:
    """Storage writable, writer alive, queue below threshold, disk space, plus ``extra``."""
    checks = HealthChecks()
    threshold = queue_threshold if queue_threshold is not None else storage.max_queue * 8 // 10
    # The queue is read before the probe write below joins it.
    checks.add("queue_below_threshold", queue_below(storage, threshold))
    checks.add("writer_alive", writer_alive(storage))
    checks.add("storage_writable", storage_writable(storage))
    checks.add("disk_space", disk_space(storage.path.parent, min_free_bytes))
    for name, check in extra:
        checks.add(name, check)
    return checks
