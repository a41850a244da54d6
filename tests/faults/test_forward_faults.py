"""Forwarding under faults: kill -9 of a forwarding collector loses nothing it acknowledged."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest
from tests.conftest import wait_until

from selfreport._core.dsn import parse_dsn
from selfreport.testing import FakeCollector

pytestmark = pytest.mark.slow

SERVE = "import sys; from selfreport.cli import main; sys.exit(main(sys.argv[1:]))"


def start_serve(data: Path, upstream: str) -> tuple[subprocess.Popen[str], str]:
    """``selfreport serve`` forwarding to ``upstream`` (given in the environment), spooling
    into ``data/spool``."""
    env = {**os.environ, "SELFREPORT_UPSTREAM_DSN": upstream}
    spool = str(data / "spool")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE,
            "serve",
            "--port",
            "0",
            "--data",
            str(data),
            "--spool",
            spool,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for _ in range(10):
        line = proc.stdout.readline()
        if line.startswith("DSN of the default project:"):
            return proc, line.split()[-1]
    stop(proc, signal.SIGKILL)
    raise AssertionError("serve did not print its DSN")


def stop(proc: subprocess.Popen[str], how: signal.Signals) -> None:
    proc.send_signal(how)
    proc.wait(30)
    assert proc.stdout is not None
    proc.stdout.close()


def send(dsn: str, count: int, acked: list[str], lock: threading.Lock) -> None:
    parsed = parse_dsn(dsn)
    conn = http.client.HTTPConnection(parsed.host, parsed.port, timeout=30)
    auth = {"X-Sentry-Auth": f"Sentry sentry_key={parsed.public_key}"}
    try:
        for _ in range(count):
            event_id = uuid.uuid4().hex
            body = json.dumps({"event_id": event_id, "message": "acknowledged"})
            conn.request("POST", f"/api/{parsed.project_id}/store/", body=body, headers=auth)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                with lock:
                    acked.append(event_id)
    finally:
        conn.close()


def free_port() -> int:
    with FakeCollector() as probe:
        return probe.port


def temporaries(spool: Path) -> list[Path]:
    return [p for p in spool.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("trouble", "senders", "linger"),
    [("down", 1, 0.0), ("down", 4, 0.0), ("down", 4, 0.2), ("429", 4, 0.0), ("503", 4, 0.1)],
)
def test_kill_9_with_the_upstream_in_trouble_loses_nothing_acknowledged(
    tmp_path: Path, trouble: str, senders: int, linger: float
) -> None:
    """Killed right after the last acknowledgement (or a moment later, mid-spooling) while the
    upstream is down or refuses; restarted with the upstream back: every acknowledged event
    arrives, at most twice."""
    port = free_port()
    upstream_dsn = f"http://public@127.0.0.1:{port}/1"
    refusing: Optional[FakeCollector] = None
    if trouble != "down":  # else nothing listens there until the second run
        refusing = FakeCollector(port=port).start()
        refusing.status = int(trouble)
        refusing.response_headers = {"Retry-After": "60"}
    proc, dsn = start_serve(tmp_path, upstream_dsn)
    acked: list[str] = []
    lock = threading.Lock()
    try:
        threads = [
            threading.Thread(target=send, args=(dsn, 200 // senders, acked, lock))
            for _ in range(senders)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        time.sleep(linger)  # kill -9 at another point of forwarding's work
    finally:
        stop(proc, signal.SIGKILL)
        if refusing is not None:
            refusing.stop()
    assert len(acked) == 200
    spool = tmp_path / "spool"
    # What a crash in the middle of spooling leaves behind: cleaned at the next start.
    (spool / "tmp" / f"{time.time_ns():019d}-000000-1-00000000.env.tmp").write_bytes(b"half")

    upstream: Optional[FakeCollector] = FakeCollector(port=port).start()
    assert upstream is not None
    proc, _ = start_serve(tmp_path, upstream_dsn)
    try:

        def arrived() -> bool:
            got = {e.get("event_id") for e in upstream.events}
            return all(event_id in got for event_id in acked)

        assert wait_until(arrived, 60), (
            f"{len(set(acked) - {e.get('event_id') for e in upstream.events})} lost"
        )
        counts = Counter(e.get("event_id") for e in upstream.events)
        assert max(counts[event_id] for event_id in acked) <= 2  # at most one duplicate each
        assert temporaries(spool) == []
    finally:
        stop(proc, signal.SIGTERM)
        upstream.stop()
