"""Child process: one recursion scenario; how many events reach the endpoint per original error.

``recursion.py --sdk SDK --scenario NAME --dsn DSN --window S --cap N [--unlimited]``
triggers the scenario's original error(s), waits ``window`` seconds and prints the window
(wall-clock times) so the parent can count what the collector received in it. Every loop is
bounded twice: each amplifying action (logging from before_send, starting a thread, ...) runs at
most ``cap`` times, and the parent kills the process if it outlives the window by far.
The ``self_ingest`` scenario hosts its own collector and counts by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import threading
import time
from typing import Any, Callable, Optional

from _common import SENTRY_PLUS, emit_result, envelope_of, setup_sdk

SCENARIOS = {
    "before_send_logs": "before_send logs an error",
    "str_logs": "a log argument's `__str__` logs an error",
    "upstream_500_debug": "upstream answers 500, root logger at DEBUG",
    "thread_crash": "a thread started from before_send crashes",
    "asyncio_task": "an asyncio task started from before_send fails",
    "storm_1000": "an error storm of 1,000 identical errors",
    "self_ingest": "the endpoint logs an error while ingesting each report",
}

logger = logging.getLogger("bench.app")


class Budget:
    """Counts amplifying actions; refuses them after ``cap`` so no loop runs unbounded."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.cap:
                return False
            self.used += 1
            return True


class Scenario:
    """What a scenario configures before init, and how it triggers its original error(s)."""

    originals = 1
    before_send: Optional[Callable[[Any, Any], Any]] = None

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def trigger(self) -> None:
        logger.error("original error: the payment service is down")

    def wait(self, window: float) -> None:
        time.sleep(window)


class BeforeSendLogs(Scenario):
    def __init__(self, budget: Budget) -> None:
        super().__init__(budget)

        def before_send(event: Any, hint: Any) -> Any:
            if budget.take():
                logger.error("before_send could not enrich the event")
            return event

        self.before_send = before_send


class StrLogs(Scenario):
    def trigger(self) -> None:
        budget = self.budget

        class Order:
            def __str__(self) -> str:
                if budget.take():
                    logger.error("could not render the order")
                return "order 42"

        logger.error("original error: payment failed for %s", Order())


class Upstream500Debug(Scenario):
    """Run against a collector answering 500 (the parent points ``--dsn`` at one)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(budget)
        # An application that logs everything, somewhere that costs nothing.
        logging.basicConfig(level=logging.DEBUG, stream=io.StringIO(), force=True)


class ThreadCrash(Scenario):
    def __init__(self, budget: Budget) -> None:
        super().__init__(budget)

        def crash() -> None:
            raise RuntimeError("the enrichment thread crashed")

        def before_send(event: Any, hint: Any) -> Any:
            if budget.take():
                threading.Thread(target=crash, name="enricher", daemon=True).start()
            return event

        self.before_send = before_send
        # Keep the default hook's traceback for each crash out of the parent's pipe.
        threading.excepthook = lambda args: None


class AsyncioTask(Scenario):
    """The application runs an event loop; before_send schedules a task on it that fails."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(budget)
        self.loop: Optional[asyncio.AbstractEventLoop] = None

        async def enrich() -> None:
            raise RuntimeError("the enrichment task failed")

        def start_task() -> None:
            assert self.loop is not None
            self.loop.create_task(enrich())  # never awaited: "Task exception was never retrieved"

        def before_send(event: Any, hint: Any) -> Any:
            loop = self.loop
            if loop is not None and budget.take():
                try:
                    running: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is loop:  # sentry-sdk runs before_send on the caller's thread
                    start_task()
                else:  # selfreport runs it on its worker thread
                    loop.call_soon_threadsafe(start_task)
            return event

        self.before_send = before_send

    def trigger(self) -> None:
        pass  # the original error is logged from inside the loop, see wait()

    def wait(self, window: float) -> None:
        async def app() -> None:
            self.loop = asyncio.get_running_loop()
            Scenario.trigger(self)
            await asyncio.sleep(window)

        asyncio.run(app())


class Storm1000(Scenario):
    originals = 1000

    def trigger(self) -> None:
        for _ in range(self.originals):
            logger.error("original error: the database is unavailable")


class SelfIngest(Scenario):
    """This process is the endpoint: it logs an error while ingesting each report it receives.

    With selfreport (and sentry-sdk + SelfreportIntegration) the endpoint recognises its own
    reports with ``is_own_report`` and ingests them inside ``reporting_path()``; with plain
    sentry-sdk there is no such mark, so it just logs.
    """

    def __init__(self, budget: Budget, marked: bool) -> None:
        super().__init__(budget)
        import selfreport
        from selfreport.testing import FakeCollector, ReceivedRequest

        self.arrivals: list[tuple[float, int, str]] = []
        self.collector = FakeCollector()

        def ingest(request: ReceivedRequest) -> None:
            events = 0
            event_id = ""
            envelope = envelope_of(request)
            if envelope is not None:
                events = sum(1 for item in envelope.items if item.type == "event")
                event_id = str(envelope.headers.get("event_id") or "")
            self.arrivals.append((time.time(), events, event_id))
            if not budget.take():
                return
            if marked and selfreport.is_own_report(request.headers):
                with selfreport.reporting_path():
                    logger.error("ingest: could not store the report")
            else:
                logger.error("ingest: could not store the report")

        self.collector.on_envelope = ingest
        self.collector.start()
        server = getattr(self.collector, "_server", None)
        if server is not None:  # see _collector_server.py: avoid Nagle's 40 ms per reply
            server.RequestHandlerClass.disable_nagle_algorithm = True

    def count(self, since: float, until: float) -> dict[str, Any]:
        rows = [row for row in list(self.arrivals) if since <= row[0] <= until]
        tail_seconds = (until - since) / 3  # as _collector_server.Tally.stats
        with_events = [row for row in rows if row[1]]
        return {
            "requests": len(rows),
            "event_requests": len(with_events),
            "events": sum(row[1] for row in with_events),
            "distinct": len({row[2] for row in with_events}),
            "events_tail": sum(row[1] for row in with_events if row[0] > until - tail_seconds),
            "tail_seconds": tail_seconds,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sdk", required=True)
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--dsn", default="")
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--cap", type=int, default=5000)
    parser.add_argument("--unlimited", action="store_true", help="no client-side rate limits")
    args = parser.parse_args()

    logger.addHandler(logging.NullHandler())
    budget = Budget(args.cap)
    scenario: Scenario
    ingest: Optional[SelfIngest] = None
    if args.scenario == "self_ingest":
        ingest = SelfIngest(budget, marked=args.sdk in ("selfreport", SENTRY_PLUS))
        scenario = ingest
        dsn = ingest.collector.dsn
    else:
        scenario = {
            "before_send_logs": BeforeSendLogs,
            "str_logs": StrLogs,
            "upstream_500_debug": Upstream500Debug,
            "thread_crash": ThreadCrash,
            "asyncio_task": AsyncioTask,
            "storm_1000": Storm1000,
        }[args.scenario](budget)
        dsn = args.dsn

    sdk = setup_sdk(
        args.sdk,
        dsn,
        unlimited=args.unlimited,
        shutdown_timeout=1.0,
        before_send=scenario.before_send,
    )
    time.sleep(0.2)  # let start-up work (connections, threads) settle before the window opens
    started = time.time()
    scenario.trigger()
    scenario.wait(args.window)
    ended = time.time()
    result: dict[str, Any] = {
        "sdk": args.sdk,
        "scenario": args.scenario,
        "originals": scenario.originals,
        "window": [started, ended],
        "amplifying_actions": budget.used,
        "capped": budget.used >= budget.cap,
        "stats": sdk.stats(),
    }
    if ingest is not None:
        result["local"] = ingest.count(started, ended)
    emit_result(result)  # before closing: a looping SDK may not close in time
    sdk.close(1.0)
    if ingest is not None:
        ingest.collector.stop()


if __name__ == "__main__":
    main()
