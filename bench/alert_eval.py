"""Alert evaluation cost: ingestion with 20 alert rules against the same collector without.

Starts a collector (``CollectorServer``, as ``selfreport serve`` runs it) in a subprocess,
twice: without alert rules, then with 20 (rate per project and per issue, with and without
ratio, new_issue, regression, health, self) and an outbox that counts. Each time it drives the
open phase of bench/collector_load.py (``--rate`` events/s, default 2,000) and its closed phase
(the maximum sustained throughput), and reads the engine's own evaluation time (CPU time of its thread).

Figures: the server's CPU per event at the offered rate, the closed-loop throughput, and the
engine's evaluation time as a share of the phase; the cost ratio is
``1 - throughput_with / throughput_without`` (target: at most 5%).

Run:  .venv/bin/python bench/alert_eval.py --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import textwrap
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from collector_load import PYTHON, Server, _phase, drive

RULES = 20

_SERVER = textwrap.dedent(
    """
    import sys
    from selfreport.collector.alerting.config import AlertRule
    from selfreport.collector.alerting.engine import AlertEngine
    from selfreport.collector.server import CollectorServer

    class CountingOutbox:
        def __init__(self):
            self.count = 0
        def put(self, notification, names):
            self.count += 1
        def failing(self):
            return {}

    def rules(n):
        kinds = [
            dict(when="rate", threshold=1000, window=300.0),
            dict(when="rate", threshold=50, window=60.0, per="issue"),
            dict(when="rate", threshold=100, window=300.0, ratio=5.0, baseline=3600.0),
            dict(when="new_issue", level="error"),
            dict(when="regression"),
            dict(when="health", grace=30.0),
            dict(when="self"),
            dict(when="rate", threshold=10, window=30.0, project="default"),
        ]
        return [AlertRule(name=f"rule {i}", notify=("ops",), **kinds[i % len(kinds)])
                for i in range(n)]

    count, data = int(sys.argv[1]), sys.argv[2]
    factory = None
    if count:
        factory = lambda storage: AlertEngine(rules(count), CountingOutbox(), storage=storage)
    server = CollectorServer(data, port=0, self_report=False, login="off", alerts=factory)
    print("DSN", server.default_project.dsn(server.url), flush=True)
    server.run()
    """
)


def _engine_seconds(server: Server) -> float:
    """The engine's evaluation time so far, from the collector's /api/0/status/."""
    dsn = server.dsn
    base = "http://" + dsn.split("@", 1)[1].rsplit("/", 1)[0]
    with urllib.request.urlopen(base + "/api/0/status/", timeout=10) as response:
        alerts = json.load(response)["alerts"]
    return 0.0 if alerts is None else float(alerts["stats"]["evaluation_seconds"])


async def _measure(rules: int, args: argparse.Namespace) -> dict[str, object]:
    server = Server(command=[PYTHON, "-c", _SERVER, str(rules)])
    try:
        await drive(server.dsn, min(args.senders, 10), 1.0, None)
        before = _engine_seconds(server)
        opened = await _phase("open", server, args, args.rate)
        engine_open = _engine_seconds(server) - before
        closed = await _phase("closed", server, args, None)
        cpu_seconds = float(str(opened["server_cpu_share"])) * args.duration
        events = float(str(opened["accepted_per_s"])) * args.duration  # one event a request
        return {
            "rules": rules,
            "open_events_per_s": opened["accepted_per_s"],
            "open_p99_ms": opened["p99_ms"],
            "open_server_cpu_us_per_event": round(cpu_seconds / max(events, 1) * 1e6, 1),
            "open_engine_share": round(engine_open / args.duration, 4),
            "closed_events_per_s": closed["accepted_per_s"],
        }
    finally:
        server.stop()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    """Without and with rules, alternately, ``--rounds`` times: medians (the box is shared)."""
    rows: dict[int, list[dict[str, object]]] = {0: [], RULES: []}
    for _ in range(args.rounds):
        for rules in (0, RULES):
            rows[rules].append(await _measure(rules, args))
            print(json.dumps(rows[rules][-1]), flush=True)

    def median(rules: int, key: str) -> float:
        return statistics.median(float(str(row[key])) for row in rows[rules])

    summary = {
        "closed_events_per_s": [
            median(0, "closed_events_per_s"),
            median(RULES, "closed_events_per_s"),
        ],
        "throughput_cost": round(
            1 - median(RULES, "closed_events_per_s") / median(0, "closed_events_per_s"), 4
        ),
        "cpu_us_per_event_at_rate": [
            median(0, "open_server_cpu_us_per_event"),
            median(RULES, "open_server_cpu_us_per_event"),
        ],
        "cpu_per_event_ratio": round(
            median(RULES, "open_server_cpu_us_per_event")
            / median(0, "open_server_cpu_us_per_event"),
            3,
        ),
        "engine_cpu_share_at_rate": median(RULES, "open_engine_share"),
    }
    print(json.dumps(summary), flush=True)
    return {"rows": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--senders", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000.0, help="offered events/s (open phase)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling interval (s)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (medians)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, senders={args.senders}, rules={RULES}", flush=True)
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
