"""Fault injection against the collector's storage: a write lock held by another process during
health probes, kill -9 under load, a full disk, and compressed floods against the size limit."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from tests.conftest import wait_until

from selfreport._core.dsn import Dsn, parse_dsn

pytestmark = pytest.mark.slow

SERVE = "import sys; from selfreport.cli import main; sys.exit(main(sys.argv[1:]))"


class Serve:
    """``selfreport serve`` in a subprocess on a free port."""

    def __init__(self, data: Path, *options: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", "--port", "0", "--data", str(data), *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        for _ in range(10):
            line = self.proc.stdout.readline()
            if line.startswith("DSN of the default project:"):
                self.raw_dsn = line.split()[-1]
                self.dsn: Dsn = parse_dsn(self.raw_dsn)
                return
        self.stop()
        raise AssertionError("serve did not print its DSN")

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[dict[str, str]] = None,
        timeout: float = 20,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.dsn.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def store(self, event: dict[str, Any]) -> int:
        auth = {"X-Sentry-Auth": f"Sentry sentry_key={self.dsn.public_key}"}
        path = f"/api/{self.dsn.project_id}/store/"
        return self.request("POST", path, json.dumps(event).encode(), auth)[0]

    def health(self) -> tuple[int, dict[str, Any]]:
        status, body = self.request("GET", "/health")
        checks: dict[str, Any] = json.loads(body)["checks"]
        return status, checks

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:  # pragma: no cover - a stuck shutdown
                self.proc.kill()
                self.proc.wait(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextlib.contextmanager
def serving(data: Path, *options: str) -> Iterator[Serve]:
    server = Serve(data, *options)
    try:
        yield server
    finally:
        server.stop()


def test_health_probes_during_a_lock_held_by_another_process(
    tmp_path: Path, write_lock_held: Callable[[Path], Any]
) -> None:
    """Issue 10, item 1: a 4 s lock and one /health killed the writer for good (503 ever after)."""
    with serving(tmp_path) as server:
        assert server.store({"message": "before"}) == 200
        with write_lock_held(tmp_path / "selfreport.db"):
            started = time.monotonic()
            for _ in range(2):  # one probe waits on the lock, the next one in the queue
                status, checks = server.health()
                assert status == 503
                assert checks["storage_writable"]["detail"] == "no answer within 2s"
                assert checks["writer_alive"]["ok"]
            time.sleep(max(0.0, 4.0 - (time.monotonic() - started)))
        assert server.store({"message": "after"}) == 200
        status, checks = server.health()
        assert status == 200, checks
        assert checks["writer_alive"]["detail"] == "the storage writer thread is running"
    with contextlib.closing(sqlite3.connect(tmp_path / "selfreport.db")) as conn:
        messages = {
            row[0] for row in conn.execute("SELECT json_extract(payload, '$.message') FROM events")
        }
    assert {"before", "after"} <= messages


def test_kill_9_at_random_points_under_load_loses_nothing_acknowledged(
    tmp_path: Path, store_load: Callable[[str, int], Any]
) -> None:
    seed = random.randrange(2**32)
    chance = random.Random(seed)
    acked: set[str] = set()
    for round_ in range(3):
        server = Serve(tmp_path)
        load = store_load(server.raw_dsn, 6)
        # Somewhere between the first acknowledgement and a busy second of load.
        assert wait_until(lambda load=load: load.acked)
        time.sleep(chance.uniform(0.0, 1.0))
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        server.stop()
        load.stop()
        acked.update(load.acked)
        with contextlib.closing(sqlite3.connect(tmp_path / "selfreport.db")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
        missing = acked - stored
        assert not missing, f"round {round_} (seed {seed}): {len(missing)} acknowledged lost"
    assert len(acked) > 3


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root")
    mountpoint = Path(tempfile.mkdtemp(prefix="selfreport-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        mountpoint.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        mountpoint.rmdir()


def test_a_full_disk_is_answered_503_and_recovers() -> None:
    with small_tmpfs("2m") as disk, serving(disk / "data", "--max-storage", "64MB") as server:
        assert server.store({"message": "fits"}) == 200
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as file:
            while True:
                file.write(b"\0" * 4096)
                file.flush()
        statuses = [server.store({"message": "x" * 4000, "n": n}) for n in range(40)]
        assert 503 in statuses, statuses
        assert set(statuses) <= {200, 503}
        filler.unlink()
        assert wait_until(lambda: server.store({"message": "after"}) == 200)
        _, checks = server.health()
        del checks["disk_space"]  # a 2 MB disk is below its threshold all along
        assert all(check["ok"] for check in checks.values()), checks


def test_compressed_floods_stay_within_the_size_limit(tmp_path: Path) -> None:
    """Issue 10, item 7: 50 requests of about 20 KiB that decompress to 20 MiB each became
    1 GiB of database; each is now trimmed to at most 1 MiB, and all under --max-storage."""
    with serving(tmp_path, "--max-storage", "10MB") as server:
        auth = {
            "X-Sentry-Auth": f"Sentry sentry_key={server.dsn.public_key}",
            "Content-Encoding": "gzip",
        }
        crumbs = [{"message": "c" * 1000, "data": {"n": 1}}] * 10_000
        event = {"message": "flood", "breadcrumbs": crumbs, "extra": {"x": "x" * 10**7}}
        body = gzip.compress(json.dumps(event).encode(), 9)  # 20 MiB in 20 KiB
        assert len(body) < 40 * 1024
        path = f"/api/{server.dsn.project_id}/store/"
        for _ in range(50):  # without an event_id: 50 events
            status, reply = server.request("POST", path, body, auth)
            assert status == 200, reply
        sizes = [
            os.path.getsize(tmp_path / name)
            for name in ("selfreport.db", "selfreport.db-wal")
            if (tmp_path / name).exists()
        ]
        assert sum(sizes) <= 10 * 10**6
        with contextlib.closing(sqlite3.connect(tmp_path / "selfreport.db")) as conn:
            longest = conn.execute("SELECT max(length(payload)) FROM events").fetchone()[0]
        assert longest <= 2**20
