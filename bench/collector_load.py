"""Collector load benchmark: sustained ingestion, latency with concurrent senders, memory.

Starts ``selfreport serve`` in a subprocess (data in a temporary directory) and drives it from
this process with N concurrent keep-alive HTTP/1.1 senders (asyncio, raw sockets: the load
generator must cost less than the server it measures on the same machine). Each request is a
real selfreport envelope (an exception with stack frames and context lines, gzip-compressed
like the SDK sends it) with a fresh event_id, so every request is a real insert.

Phases:
  open    the offered load (``--rate`` events/s spread over ``--senders``) for ``--duration``
          seconds; latency is measured from each request's *scheduled* send time, so a server
          that falls behind shows it (no coordinated omission).
  closed  every sender sends its next request as soon as the previous is answered: the
          maximum sustained throughput.
  huge    the open phase while one more sender posts, back to back, an 11 MiB event
          (``{"message": "x", "foo": [1] * 4_000_000}``, gzip-compressed): trimming it must not
          stall the others (their p99), nor take long itself (``huge_*`` columns).
  baseline the same closed-loop load against a bare uvicorn app that reads the body and answers
          200 (no parsing, no storage): what the HTTP stack alone costs on this machine.

Run:  .venv/bin/python bench/collector_load.py --duration 30
      .venv/bin/python bench/collector_load.py --server-src ../old/src --server-src src \
          --rounds 3 --phases open,closed   # two trees side by side, interleaved, as ratios
      .venv/bin/python bench/collector_load.py --duration 300 --phases open   # memory over 5 min
      .venv/bin/python bench/collector_load.py --phases open,huge   # a huge event meanwhile
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import selfreport
from selfreport._capture.event import build_event, capture_from_exception
from selfreport._core.dsn import parse_dsn
from selfreport._delivery.envelope import serialize_envelope

PYTHON = sys.executable


# --- the payload ---------------------------------------------------------------------------


def _sample_event() -> dict[str, object]:
    def handler(order: dict[str, int]) -> int:
        return order["quantity"] // order["missing"]

    try:
        handler({"quantity": 3})
    except KeyError as exc:
        capture = capture_from_exception(exc, "generic", True)
    event = build_event(capture, environment="bench", release="bench@1")
    event["tags"] = {"route": "/orders/{id}", "customer": "bench"}
    return event


class Payloads:
    """A gzip-compressed envelope per request, each with a new event_id (like the SDK)."""

    def __init__(self, dsn: str, event: Optional[dict[str, object]] = None) -> None:
        self.dsn = parse_dsn(dsn)
        event = event or _sample_event()
        self.template = serialize_envelope(event, self.dsn, "2026-01-01T00:00:00Z")
        match = re.search(rb'"event_id":"([0-9a-f]{32})"', self.template)
        assert match is not None
        self.placeholder = match.group(1)
        self.raw_size = len(self.template)

    def next(self) -> bytes:
        body = self.template.replace(self.placeholder, uuid.uuid4().hex.encode())
        return gzip.compress(body, compresslevel=6)

    def request(self, body: bytes) -> bytes:
        head = (
            f"POST {self.dsn.envelope_path} HTTP/1.1\r\n"
            f"Host: {self.dsn.host}:{self.dsn.port}\r\n"
            "Content-Type: application/x-sentry-envelope\r\n"
            "Content-Encoding: gzip\r\n"
            f"X-Sentry-Auth: {self.dsn.auth_header('bench/1.0', time.time())}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


# --- the senders ---------------------------------------------------------------------------


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    max_lag: float = 0.0
    huge: Optional[Results] = None  # the huge phase's big events, apart


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = _CONTENT_LENGTH.search(head)
    if match is not None:
        await reader.readexactly(int(match.group(1)))
    return status


_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


async def _sender(
    index: int,
    host: str,
    port: int,
    payloads: Payloads,
    results: Results,
    start: float,
    stop: float,
    interval: Optional[float],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    loop = asyncio.get_running_loop()
    scheduled = start + (index * interval / 100.0 if interval else 0.0)
    try:
        while True:
            now = loop.time()
            if interval is not None:
                if scheduled > now:
                    await asyncio.sleep(scheduled - now)
                results.max_lag = max(results.max_lag, loop.time() - scheduled)
                began = scheduled
                scheduled += interval
            else:
                began = now
            if began >= stop:
                return
            writer.write(payloads.request(payloads.next()))
            try:
                status = await _read_response(reader)
            except (
                ConnectionError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ):
                results.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            results.latencies.append(loop.time() - began)
            results.statuses[status] = results.statuses.get(status, 0) + 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def drive(
    dsn: str, senders: int, duration: float, rate: Optional[float], huge: bool = False
) -> Results:
    payloads = Payloads(dsn)
    parsed = parse_dsn(dsn)
    results = Results()
    extra: list[tuple[Payloads, Results]] = []
    if huge:  # review 1.1: this event took 10 s of the event loop to trim
        big = Payloads(dsn, {"event_id": uuid.uuid4().hex, "message": "x", "foo": [1] * 4_000_000})
        # Compressed once (12 MB at every send would stall this generator): the same event_id
        # each time, stored once, but parsed and trimmed by the collector at every request.
        body = big.next()
        big.next = lambda: body  # type: ignore[method-assign]
        results.huge = Results()
        extra.append((big, results.huge))
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    interval = senders / rate if rate else None
    await asyncio.gather(
        *(
            _sender(0, parsed.host, parsed.port or 80, p, r, start, start + duration, None)
            for p, r in extra
        ),
        *(
            _sender(
                i,
                parsed.host,
                parsed.port or 80,
                payloads,
                results,
                start,
                start + duration,
                interval,
            )
            for i in range(senders)
        ),
    )
    return results


# --- the server process ----------------------------------------------------------------------


class Server:
    """``selfreport serve`` (or the bare baseline app) in a subprocess, with RSS sampling."""

    def __init__(
        self,
        baseline: bool = False,
        src: Optional[str] = None,
        command: Optional[list[str]] = None,
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="selfreport-bench-")
        env = dict(os.environ)
        if src is not None:  # the server from another tree (this process keeps its own)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (src, env.get("PYTHONPATH"))))
        if command is not None:  # another server (bench/alert_eval.py): the data dir appended
            cmd = [*command, self.tmp.name]
        elif baseline:
            cmd = [PYTHON, "-c", _BASELINE_APP]
        else:
            cli = "import sys; from selfreport.cli import main; sys.exit(main(sys.argv[1:]))"
            cmd = [PYTHON, "-c", cli, "serve", "--port", "0", "--data", self.tmp.name]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        assert self.proc.stdout is not None
        self.dsn = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(("DSN of the default project:", "DSN ")):
                self.dsn = line.split()[-1]
                break
        if not self.dsn:
            self.stop()
            raise RuntimeError("the server did not print its DSN")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.tmp.cleanup()


_BASELINE_APP = textwrap.dedent(
    """
    import socket, uvicorn
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
        await send({"type": "http.response.body", "body": b'{"id":null}'})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP); sock.bind(("127.0.0.1", 0)); sock.listen(2048)
    print(f"DSN http://public@127.0.0.1:{sock.getsockname()[1]}/1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    """
)


def _summary(
    name: str, results: Results, duration: float, server: Server, cpu: float
) -> dict[str, object]:
    lat = sorted(results.latencies)
    ok = results.statuses.get(200, 0)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1e3 if lat else float("nan")

    return {
        "phase": name,
        "requests": len(lat),
        "accepted_per_s": round(ok / duration, 1),
        "statuses": results.statuses,
        "errors": results.errors,
        "p50_ms": round(pct(0.50), 2),
        "p90_ms": round(pct(0.90), 2),
        "p99_ms": round(pct(0.99), 2),
        "max_ms": round(lat[-1] * 1e3, 2) if lat else None,
        "mean_ms": round(statistics.fmean(lat) * 1e3, 2) if lat else None,
        "generator_max_lag_ms": round(results.max_lag * 1e3, 1),
        "server_cpu_share": round(cpu / duration, 2),
    }


async def _phase(
    name: str, server: Server, args: argparse.Namespace, rate: Optional[float]
) -> dict[str, object]:
    rss: list[tuple[float, float]] = []
    started = time.monotonic()
    cpu_before = server.cpu_seconds()

    async def sample() -> None:
        while True:
            rss.append((round(time.monotonic() - started, 1), round(server.rss_mib(), 1)))
            await asyncio.sleep(args.sample_every)

    sampler = asyncio.create_task(sample())
    own_before = time.process_time()
    machine_before = _machine_busy_seconds()
    results = await drive(server.dsn, args.senders, args.duration, rate, huge=name == "huge")
    sampler.cancel()
    cpu = server.cpu_seconds() - cpu_before
    own = time.process_time() - own_before
    row = _summary(name, results, args.duration, server, cpu)
    row["generator_cpu_share"] = round(own / args.duration, 2)
    # CPU used by everything else on the machine meanwhile: on a shared box, the noise.
    others = _machine_busy_seconds() - machine_before - cpu - own
    row["other_processes_cpu_share"] = round(max(0.0, others) / args.duration, 2)
    row["rss_mib_start_end_max"] = (rss[0][1], rss[-1][1], max(r for _, r in rss)) if rss else None
    row["rss_samples"] = rss
    if results.huge is not None:
        big = sorted(results.huge.latencies)
        row["huge_events"] = len(big)
        row["huge_statuses"] = results.huge.statuses
        row["huge_max_ms"] = round(big[-1] * 1e3, 1) if big else None
    return row


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _print_row(row: dict[str, object]) -> None:
    shown = {k: v for k, v in row.items() if k != "rss_samples"}
    print(json.dumps(shown), flush=True)


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    sources: list[Optional[str]] = list(args.server_src) or [None]
    for round_ in range(args.rounds):
        # Interleaved, and in turn first: a machine that gets busier favours neither tree.
        order = sources if round_ % 2 == 0 else sources[::-1]
        for src in order:
            for phase in args.phases.split(","):
                if phase == "baseline" and src != order[0]:
                    continue  # the bare app is the same for every tree
                row = await _run_phase(phase, args, src)
                row["round"] = round_
                rows.append(row)
                _print_row(row)
    if len(sources) > 1:
        _print_ratios(rows, sources)
    return rows


async def _run_phase(phase: str, args: argparse.Namespace, src: Optional[str]) -> dict[str, object]:
    server = Server(baseline=phase == "baseline", src=src)
    try:
        # Warm up: connections, SQLite pages, the key cache.
        await drive(server.dsn, min(args.senders, 10), 1.0, None)
        rate = args.rate if phase in ("open", "huge") else None
        row = await _phase(phase, server, args, rate)
        if phase != "baseline":
            row["stored_events"] = _stored_events(server)
            row["server_src"] = src or "(this tree)"
        return row
    finally:
        server.stop()


def _print_ratios(rows: list[dict[str, object]], sources: list[Optional[str]]) -> None:
    """Medians per tree and phase, and each tree's ratio to the first one."""
    first = sources[0] or "(this tree)"
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        if "server_src" in row:
            metrics = values.setdefault((str(row["server_src"]), str(row["phase"])), {})
            for metric in ("accepted_per_s", "p50_ms", "p99_ms", "server_cpu_share"):
                metrics.setdefault(metric, []).append(float(str(row[metric])))
    for (src, phase), metrics in sorted(values.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        median = {m: statistics.median(v) for m, v in metrics.items()}
        base = {m: statistics.median(v) for m, v in values.get((first, phase), {}).items()}
        ratios = {m: round(median[m] / base[m], 3) for m in median if base.get(m)}
        print(json.dumps({"phase": phase, "server_src": src, "median": median, "vs_first": ratios}))


def _stored_events(server: Server) -> int:
    import sqlite3

    conn = sqlite3.connect(Path(server.tmp.name) / "selfreport.db")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--senders", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000.0, help="offered events/s (open phase)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--phases", default="open,closed,baseline")
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling interval (s)")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the rows (with RSS samples) here"
    )
    parser.add_argument(
        "--server-src",
        metavar="DIR",
        action="append",
        default=[],
        help="run the server from this source tree (a checkout's src/); twice or more to "
        "compare trees side by side, as ratios to the first (default: this tree)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, interleaved")
    args = parser.parse_args()
    print(
        f"selfreport {selfreport.__version__}, {os.cpu_count()} CPUs, senders={args.senders}",
        flush=True,
    )
    rows = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
