"""The sample application of ``selfreport demo``: one scenario per run, stats as JSON on stdout."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, Callable

import selfreport

log = logging.getLogger("shop")


def _real_errors() -> int:
    log.error("payment failed for order %s", 1234)
    prices: dict[str, float] = {"sku-1": 9.5}
    try:
        prices["missing-sku"]
    except KeyError:
        log.exception("could not price the basket")
    selfreport.capture_message("cache rebuilt with warnings", level="warning")
    return 3


def _before_send_logs() -> int:
    log.error("checkout failed")
    return 1


def _before_send_logs_hook(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    hooks_log = logging.getLogger("shop.hooks")
    hooks_log.error("before_send could not enrich event %s", event["event_id"])
    return event


class _BrokenRepr:
    def __str__(self) -> str:
        log.error("rendering a log argument failed")
        return "order#77"


def _argument_logs() -> int:
    log.error("refund failed for %s", _BrokenRepr())
    return 1


def _crash_in_thread(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    def enrich() -> None:
        raise RuntimeError("enrichment thread crashed")

    thread = threading.Thread(target=enrich, name="enricher")
    thread.start()
    thread.join()
    return event


def _storm() -> int:
    for _ in range(10_000):
        log.error("inventory service unreachable")
    return 10_000


def _poison() -> int:
    log.error("poison pill: this event makes the collector's ingestion fail")
    return 1


def _outage() -> int:
    started = time.perf_counter()
    for i in range(5):
        log.error("database timeout %d", i)
    blocked_ms = (time.perf_counter() - started) * 1000
    print(json.dumps({"caller_ms": round(blocked_ms, 2)}), file=sys.stderr)
    return 5


SCENARIOS: dict[str, tuple[Callable[[], int], dict[str, Any]]] = {
    "real-errors": (_real_errors, {}),
    "before-send-logs": (_before_send_logs, {"before_send": _before_send_logs_hook}),
    "argument-logs": (_argument_logs, {}),
    "thread-in-before-send": (_before_send_logs, {"before_send": _crash_in_thread}),
    "error-storm": (_storm, {}),
    "poison-event": (_poison, {}),
    "upstream-outage": (_outage, {"max_retries": 2, "retry_backoff": 0.05}),
}


def main(argv: list[str]) -> int:
    name, dsn = argv[0], argv[1]
    scenario, options = SCENARIOS[name]
    # Only selfreport's handler: the demo's output is the summary table, not log lines.
    logging.getLogger().addHandler(logging.NullHandler())
    threading.excepthook = lambda args: None  # the crashing thread is expected here
    client = selfreport.init(dsn, shutdown_timeout=3.0, **options)
    originals = scenario()
    selfreport.flush(5.0)
    selfreport.close()
    print(json.dumps({"originals": originals, "stats": client.stats()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
