"""`kill -9` of a collector under load loses no event it acknowledged."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from tests.conftest import wait_until

from selfreport._core.dsn import parse_dsn

pytestmark = pytest.mark.slow

SERVE = "import sys; from selfreport.cli import main; sys.exit(main(sys.argv[1:]))"


def start_serve(data: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--port", "0", "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(10):
        line = proc.stdout.readline()
        if line.startswith("DSN of the default project:"):
            return proc, line.split()[-1]
    proc.kill()
    proc.wait()
    raise AssertionError("serve did not print its DSN")


def sender(dsn: str, acked: list[str], lock: threading.Lock, stop: threading.Event) -> None:
    parsed = parse_dsn(dsn)
    conn = http.client.HTTPConnection(parsed.host, parsed.port, timeout=5)
    auth = {"X-Sentry-Auth": f"Sentry sentry_key={parsed.public_key}"}
    try:
        while not stop.is_set():
            event_id = uuid.uuid4().hex
            body = json.dumps({"event_id": event_id, "message": "load", "extra": {"n": 1}})
            try:
                conn.request("POST", f"/api/{parsed.project_id}/store/", body=body, headers=auth)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                return  # the server is gone
            if response.status == 200:
                with lock:
                    acked.append(event_id)
    finally:
        conn.close()


def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    proc, dsn = start_serve(tmp_path)
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    threads = [
        threading.Thread(target=sender, args=(dsn, acked, lock, stop), daemon=True)
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acked) >= 300)
    os.kill(proc.pid, signal.SIGKILL)  # mid-write: requests are in flight on 8 connections
    proc.wait(10)
    assert proc.stdout is not None
    proc.stdout.close()
    stop.set()
    for thread in threads:
        thread.join(10)
    assert len(acked) >= 300
    conn = sqlite3.connect(tmp_path / "selfreport.db")
    try:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged events were lost"
    # And the collector starts again on the crashed database, with the same DSN.
    again, dsn_again = start_serve(tmp_path)
    try:
        assert dsn_again.rsplit(":", 1)[0] == dsn.rsplit(":", 1)[0]
    finally:
        again.terminate()
        again.wait(15)
        assert again.stdout is not None
        again.stdout.close()
