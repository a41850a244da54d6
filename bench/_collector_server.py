"""A FakeCollector in its own process, counting envelopes per project for the benchmark."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from _common import envelope_of

from selfreport.testing import FakeCollector, ReceivedRequest


class Tally:
    """What arrived, per DSN project: (arrival time, event items, event ids) per request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrivals: dict[str, list[tuple[float, int, str]]] = {}

    def record(self, request: ReceivedRequest) -> None:
        now = time.time()
        project = project_of(request.path)
        events = 0
        event_id = ""
        envelope = envelope_of(request)
        if envelope is not None:
            events = sum(1 for item in envelope.items if item.type == "event")
            event_id = str(envelope.headers.get("event_id") or "")
        with self.lock:
            self.arrivals.setdefault(project, []).append((now, events, event_id))
        # The benchmark sends up to hundreds of thousands of events: keep counts, not bodies.
        request.body = b""
        request.envelope = None

    def stats(self, project: str, since: float, until: float) -> dict[str, Any]:
        with self.lock:
            rows = [row for row in self.arrivals.get(project, []) if since <= row[0] <= until]
        with_events = [row for row in rows if row[1]]
        # The last third of the window: is anything still arriving when it closes?
        tail_seconds = (until - since) / 3 if until != float("inf") else 1.0
        tail = [row for row in with_events if row[0] > until - tail_seconds]
        return {
            "requests": len(rows),
            "event_requests": len(with_events),
            "events": sum(row[1] for row in with_events),
            "distinct": len({row[2] for row in with_events}),
            "events_tail": sum(row[1] for row in tail),
            "tail_seconds": tail_seconds,
        }


def project_of(path: str) -> str:
    # /api/{project_id}/envelope/
    parts = [p for p in path.split("/") if p]
    return parts[1] if len(parts) >= 3 and parts[0] == "api" else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--status", type=int, default=200, help="HTTP status to answer")
    parser.add_argument("--blackhole", action="store_true", help="accept, never answer")
    args = parser.parse_args()

    tally = Tally()
    collector = FakeCollector()
    collector.status = args.status
    collector.blackhole = args.blackhole
    collector.on_envelope = tally.record
    collector.start()
    # The response goes out as two writes (headers, body); without TCP_NODELAY, Nagle plus the
    # client's delayed ACK hold the second one for ~40 ms, capping any SDK at ~25 events/s.
    server = getattr(collector, "_server", None)
    if server is not None:
        server.RequestHandlerClass.disable_nagle_algorithm = True
    print(f"PORT {collector.port}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "quit":
                break
            if words[0] == "stats":
                project = words[1]
                since = float(words[2]) if len(words) > 2 else 0.0
                until = float(words[3]) if len(words) > 3 else float("inf")
                if args.blackhole:  # on_envelope never runs: count what was accepted
                    count = sum(1 for r in collector.requests if project_of(r.path) == project)
                    result: dict[str, Any] = {"requests": count}
                else:
                    result = tally.stats(project, since, until)
                print(json.dumps(result), flush=True)
    finally:
        collector.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
