"""Outages end to end: a collector process that goes down and comes back on the same port, and
client processes killed with SIGKILL while spooling and while replaying."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from tests.conftest import wait_until

from selfreport import Client

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock"),
]

# A collector of our own: records the id and message of every event it accepts, one JSON line
# each, before it answers 200 (so an event can be recorded and yet its sender never hear back).
COLLECTOR = r"""
import gzip, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from selfreport._delivery.envelope import parse_envelope

port, out, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        time.sleep(delay)
        with open(out, "a") as f:
            for event in parse_envelope(body).events():
                message = (event.get("logentry") or {}).get("message")
                f.write(json.dumps({"id": event["event_id"], "message": message}) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

ThreadingHTTPServer.allow_reuse_address = True
server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
print("ready", flush=True)
server.serve_forever()
"""

# Captures events while the collector is down; prints ACK once each is safe in the spool.
SPOOLER = r"""
import sys, time, selfreport

dsn, spool, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = selfreport.init(
    dsn, spool_dir=spool, install_hooks=False, logging_level=None,
    rate_limit=0, dedupe_window=0, max_queue=100_000,
)
for n in range(count):
    event_id = selfreport.capture_message(f"event {n:04d}")
    while client.stats()["spooled"] < n + 1:
        time.sleep(0.0002)
    print("ACK", n, event_id, flush=True)
selfreport.close(5)
print("DONE", flush=True)
"""

# Replays a spool left by an earlier process until its stdin ends (then it closes the client,
# which waits for the send in flight, and says so) or it is killed.
REPLAYER = r"""
import sys, selfreport

selfreport.init(sys.argv[1], spool_dir=sys.argv[2], install_hooks=False, logging_level=None)
print("ready", flush=True)
sys.stdin.readline()
selfreport.close(10)
print("closed", flush=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A Python subprocess running ``script`` with ``args``, reading its stdout by lines."""

    def __init__(self, script: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def wait_ready(self) -> None:
        assert self.readline() == "ready"

    def finish(self) -> str:
        """End the script's stdin (a replayer then closes its client); its next line."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.readline()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck child
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class CollectorProcess:
    def __init__(self, port: int, out: Path, delay: float = 0.0) -> None:
        self.port = port
        self.out = out
        self.delay = delay
        self.process: Optional[Process] = None

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.port}/1"

    def start(self) -> CollectorProcess:
        self.process = Process(COLLECTOR, self.port, self.out, self.delay)
        self.process.wait_ready()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [
            json.loads(line) for line in self.out.read_text().splitlines() if line.endswith("}")
        ]

    def wait_for(
        self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
    ) -> list[dict[str, Any]]:
        wait_until(lambda: condition(self.records()), timeout)
        return self.records()


@pytest.fixture
def collector_process(tmp_path: Path) -> Iterator[CollectorProcess]:
    collector = CollectorProcess(free_port(), tmp_path / "received.jsonl")
    try:
        yield collector
    finally:
        collector.stop()


@pytest.fixture
def processes() -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(script: str, *args: object) -> Process:
        process = Process(script, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def spool_while_down(
    processes: Callable[..., Process], dsn: str, spool: Path, count: int
) -> list[str]:
    """Event ids a client process acknowledged as spooled, in order, then exited normally."""
    spooler = processes(SPOOLER, dsn, spool, count)
    acked = []
    while True:
        line = spooler.readline()
        if line == "DONE" or not line:
            break
        _, _, event_id = line.split()
        acked.append(event_id)
    assert len(acked) == count
    return acked


def test_outage_then_recovery_on_the_same_port(
    collector_process: CollectorProcess, tmp_path: Path
) -> None:
    collector_process.start()
    client = Client(
        collector_process.dsn, spool_dir=tmp_path / "spool", rate_limit=0, dedupe_window=0
    )
    try:
        client.capture_message("before the outage")
        assert client.flush(5)
        assert collector_process.wait_for(lambda r: len(r) == 1)
        collector_process.stop()
        during = [client.capture_message(f"during {n}") for n in range(5)]
        assert client.flush(5)
        stats = client.stats()
        assert stats["spooled"] == 5
        assert stats["send_failed"] == 0
        assert stats["dropped_closed"] == 0
        collector_process.start()  # the same port
        records = collector_process.wait_for(lambda r: len(r) >= 6)
        assert [r["id"] for r in records[1:]] == during  # replayed in order
        assert [r["message"] for r in records[1:]] == [f"during {n}" for n in range(5)]
        assert wait_until(lambda: client.stats()["replayed"] >= 5, 10)
        assert client.stats()["replayed"] == 5
        client.capture_message("after")  # straight through again
        assert client.flush(5)
        assert collector_process.wait_for(lambda r: len(r) == 7)[-1]["message"] == "after"
    finally:
        client.close(5)


def test_kill_9_while_spooling_loses_nothing_acknowledged(
    collector_process: CollectorProcess, processes: Callable[..., Process], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spooler = processes(SPOOLER, collector_process.dsn, spool, 100_000)
    acked = []
    while len(acked) < 40:
        _, _, event_id = spooler.readline().split()
        acked.append(event_id)
    spooler.kill()  # mid-spool: it was writing the next envelopes
    collector_process.start()
    replayer = processes(REPLAYER, collector_process.dsn, spool)
    replayer.wait_ready()
    records = collector_process.wait_for(lambda r: set(acked) <= {x["id"] for x in r})
    ids = [r["id"] for r in records]
    assert set(acked) <= set(ids)  # nothing acknowledged is lost
    first_seen = list(dict.fromkeys(ids))
    assert first_seen[: len(acked)] == acked  # in order
    assert all(count == 1 for count in Counter(ids).values())  # nothing was in flight


def test_kill_9_while_replaying_duplicates_at_most_the_envelope_in_flight(
    collector_process: CollectorProcess, processes: Callable[..., Process], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    acked = spool_while_down(processes, collector_process.dsn, spool, 30)
    collector_process.delay = 0.05  # slow enough to kill the replay part way
    collector_process.start()
    first = processes(REPLAYER, collector_process.dsn, spool)
    first.wait_ready()
    collector_process.wait_for(lambda r: len(r) >= 8)
    first.kill()
    second = processes(REPLAYER, collector_process.dsn, spool)
    second.wait_ready()
    records = collector_process.wait_for(lambda r: set(acked) <= {x["id"] for x in r})
    ids = [r["id"] for r in records]
    assert set(ids) == set(acked)
    assert list(dict.fromkeys(ids)) == acked  # in order, across both processes
    duplicated = [event_id for event_id, count in Counter(ids).items() if count > 1]
    assert len(duplicated) <= 1
    assert all(count <= 2 for count in Counter(ids).values())


def test_two_processes_sharing_a_spool_never_send_the_same_envelope(
    collector_process: CollectorProcess, processes: Callable[..., Process], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    acked = spool_while_down(processes, collector_process.dsn, spool, 30)
    collector_process.delay = 0.01
    collector_process.start()
    one = processes(REPLAYER, collector_process.dsn, spool)
    two = processes(REPLAYER, collector_process.dsn, spool)
    one.wait_ready()
    two.wait_ready()
    records = collector_process.wait_for(lambda r: set(acked) <= {x["id"] for x in r})
    # Both closed (each waited for its send in flight) and answered: what came is all.
    assert (one.finish(), two.finish()) == ("closed", "closed")
    ids = [r["id"] for r in collector_process.records()]
    assert sorted(ids) == sorted(acked)
    assert len(records) <= len(ids) == len(acked)
