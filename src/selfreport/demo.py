"""``selfreport demo``: a collector, a sample application full of recursion traps, and a summary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

__all__ = ["run_demo"]


@dataclass
class Outcome:
    scenario: str
    trap: str
    originals: int = 0
    stored: int = 0
    self_reports: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    note: str = ""


TRAPS = [
    ("real-errors", "real errors: a log, an exception, a message"),
    ("before-send-logs", "before_send logs an error"),
    ("argument-logs", "a log argument's __str__ logs an error"),
    ("thread-in-before-send", "a thread started in before_send crashes"),
    ("error-storm", "10,000 identical errors"),
    ("poison-event", "the collector fails ingesting a report"),
    ("upstream-outage", "the collector is down"),
]


def _poison_processor(event: dict[str, Any], project: Any) -> dict[str, Any]:
    message = (event.get("logentry") or {}).get("message") or ""
    if isinstance(message, str) and message.startswith("poison pill"):
        raise RuntimeError("ingestion failed on a poison pill")
    return event


def _closed_port_dsn() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://public@127.0.0.1:{port}/1"


def _run_app(scenario: str, dsn: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "selfreport._demo_app", scenario, dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"demo app {scenario!r} failed:\n{result.stderr}")
    outcome: dict[str, Any] = json.loads(lines[-1])
    for line in result.stderr.splitlines():
        if line.startswith('{"caller_ms"'):
            outcome.update(json.loads(line))
    return outcome


def _dropped(stats: dict[str, int]) -> str:
    reasons = [
        ("dropped_reentrant", "reentrant"),
        ("deduplicated", "deduplicated"),
        ("dropped_error", "error"),
        ("send_failed", "send failed"),
        ("spooled", "spooled"),
    ]
    parts = [f"{stats[key]} {label}" for key, label in reasons if stats.get(key)]
    limited = stats.get("dropped_rate_limited", 0) - stats.get("deduplicated", 0)
    if limited > 0:
        parts.append(f"{limited} rate limited")
    return ", ".join(parts) or "-"


def _table(outcomes: list[Outcome], out: TextIO) -> None:
    headers = ("trap", "errors", "sent", "stored", "self-reports", "dropped and why")
    rows = [
        (
            o.trap,
            str(o.originals),
            str(o.stats.get("sent", 0)),
            str(o.stored),
            str(o.self_reports),
            _dropped(o.stats) + (f"  ({o.note})" if o.note else ""),
        )
        for o in outcomes
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line, file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=out)


def run_demo(once: bool = False, out: Optional[TextIO] = None) -> int:
    """Run every trap against a fresh collector; keep serving until Ctrl-C unless ``once``."""
    out = out or sys.stdout
    try:
        from .collector import require_extra

        require_extra()
        from .collector.server import CollectorServer
    except ImportError as exc:
        print(f"selfreport demo: {exc}", file=sys.stderr)
        return 1
    import selfreport

    with tempfile.TemporaryDirectory(prefix="selfreport-demo-") as data_dir:
        # uvicorn would print the poison pill's traceback at every retry; the table says it all.
        server = CollectorServer(
            data_dir, port=0, processors=[_poison_processor], log_level="critical"
        )
        server.start()
        try:
            storage = server.storage
            default, internal = server.default_project, server.internal_project
            print(f"collector: {server.url}  (data in {data_dir})", file=out)
            print(f"default project DSN: {server.dsn()}\n", file=out)
            outcomes = []
            for scenario, trap in TRAPS:
                before = (storage.event_count(default.id), storage.event_count(internal.id))
                dsn = _closed_port_dsn() if scenario == "upstream-outage" else server.dsn()
                result = _run_app(scenario, dsn)
                selfreport.flush(5.0)  # the collector's own reports of this scenario
                time.sleep(0.2)
                selfreport.flush(5.0)
                outcome = Outcome(scenario, trap, result["originals"], stats=result["stats"])
                outcome.stored = storage.event_count(default.id) - before[0]
                outcome.self_reports = storage.event_count(internal.id) - before[1]
                if "caller_ms" in result:
                    outcome.note = f"caller spent {result['caller_ms']:.1f} ms for 5 errors"
                outcomes.append(outcome)
            _table(outcomes, out)
            reporter = selfreport.stats()
            print(
                "\nthe collector's own reporter: "
                f"{reporter['sent']} sent, {reporter['dropped_reentrant']} dropped as reentrant",
                file=out,
            )
            print(f"\nweb page: {server.url}/", file=out)
            out.flush()
            if not once:
                print("serving until Ctrl-C ...", file=out)
                out.flush()
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    print("", file=out)
        finally:
            server.stop()
    return 0
