"""Health checks: composition, timeouts, failures, and each built-in check for real."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from selfreport._core.dsn import parse_dsn
from selfreport.collector.health import (
    CheckResult,
    HealthChecks,
    default_checks,
    disk_space,
    queue_below,
    upstream_reachable,
)
from selfreport.collector.storage import Storage


@pytest.mark.asyncio
async def test_checks_compose_and_fail_with_a_reason() -> None:
    checks = HealthChecks(timeout=0.2)

    async def fine() -> CheckResult:
        return CheckResult(True, "fine")

    async def slow() -> CheckResult:
        await asyncio.sleep(5)
        raise AssertionError("never")  # pragma: no cover

    async def broken() -> CheckResult:
        raise OSError("disk on fire")

    checks.add("fine", fine)
    ok, report = await checks.run()
    assert ok
    assert report["fine"]["ok"] is True
    checks.add("slow", slow)
    checks.add("broken", broken)
    ok, report = await checks.run()
    assert not ok
    assert report["slow"]["detail"] == "no answer within 0.2s"
    assert report["broken"]["detail"] == "the check raised OSError('disk on fire')"
    checks.remove("slow")
    checks.remove("not there")
    assert checks.names == ["fine", "broken"]


@pytest.mark.asyncio
async def test_upstream_reachable_for_real() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        result = await upstream_reachable(("127.0.0.1", port))()
        assert result == CheckResult(True, f"127.0.0.1:{port} accepts connections")
    finally:
        listener.close()
    result = await upstream_reachable(parse_dsn(f"http://k@127.0.0.1:{port}/1"))()
    assert not result.ok
    assert result.detail.startswith(f"cannot connect to 127.0.0.1:{port}")
    https = upstream_reachable(parse_dsn("https://k@example.invalid/1"), connect=_refuse)
    assert (await https()).detail == "cannot connect to example.invalid:443: refused by test"
    plain = upstream_reachable(parse_dsn("http://k@example.invalid/1"), connect=_refuse)
    assert "example.invalid:80" in (await plain()).detail


def _refuse(host: str, port: int, timeout: float) -> None:
    raise ConnectionRefusedError("refused by test")


@pytest.mark.asyncio
async def test_disk_space_and_queue_thresholds(storage: Storage, tmp_path: Path) -> None:
    assert (await disk_space(tmp_path, 1)()).ok
    too_much = await disk_space(tmp_path, 2**62)()
    assert not too_much.ok
    assert "MiB free" in too_much.detail
    assert (await queue_below(storage, 1)()).ok
    assert not (await queue_below(storage, 0)()).ok


@pytest.mark.asyncio
async def test_default_checks_with_extras(storage: Storage) -> None:
    async def extra() -> CheckResult:
        return CheckResult(False, "forwarding is off")

    storage.start()
    checks = default_checks(storage, queue_threshold=5, extra=[("forwarding", extra)])
    ok, report = await checks.run()
    assert not ok
    assert report["queue_below_threshold"]["detail"] == "0 writes waiting (threshold 5)"
    assert report["storage_writable"]["ok"]
    assert report["forwarding"]["detail"] == "forwarding is off"


@pytest.mark.asyncio
async def test_concurrent_checks_during_a_stall_share_one_probe(
    storage: Storage, write_lock_held: Any
) -> None:
    """Review 1.10: each /health queued a probe write, and those cancelled at the timeout
    kept their place in the write queue: a flood of /health (no key needed) during a stall
    pushed ingestion towards StorageFull. 100 concurrent checks now queue one probe."""
    storage.start()
    probes = 0
    real_probe = storage.probe

    def counting_probe() -> Any:
        nonlocal probes
        probes += 1
        return real_probe()

    storage.probe = counting_probe  # type: ignore[method-assign]
    checks = default_checks(storage)
    checks.timeout = 0.3
    with write_lock_held(storage.path):
        outcomes = await asyncio.gather(*(checks.run() for _ in range(100)))
        for ok, report in outcomes:
            assert not ok
            assert report["storage_writable"]["detail"] == "no answer within 0.3s"
        assert probes == 1
        assert storage.queue_size <= 1
    checks.timeout = 30.0
    ok, report = await checks.run()  # the probe in flight, or a new one once it is done
    assert ok, report
    assert probes <= 2
