"""Child process: an error storm through one SDK with its default limits; caller latency and RSS.

``storm.py --sdk SDK --dsn DSN --errors N --variant identical|distinct`` logs N errors with an
exception from one place in a tight loop. ``identical``: one message template, so every error
has one fingerprint. ``distinct``: an f-string message, so every error is new to a deduper.
Each call is timed on the caller's thread; the peak resident set is reset right before the storm.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
from array import array

from _common import emit_result, peak_rss_bytes, reset_peak_rss, rss_bytes, setup_sdk


class UpstreamDown(ConnectionError):
    pass


def charge(order: int) -> None:
    raise UpstreamDown(f"payment service unavailable (order {order})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sdk", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--errors", type=int, default=100_000)
    parser.add_argument("--variant", choices=("identical", "distinct"), default="identical")
    parser.add_argument("--close-timeout", type=float, default=2.0)
    args = parser.parse_args()

    logger = logging.getLogger("bench.storm")
    logger.addHandler(logging.NullHandler())
    sdk = setup_sdk(args.sdk, args.dsn, unlimited=False, shutdown_timeout=args.close_timeout)
    n = args.errors
    latencies = array("q", bytes(8 * n))  # allocated before the memory baseline
    distinct = args.variant == "distinct"

    # Warm up imports, caches and the connection, then start from an empty queue.
    for i in range(5):
        try:
            charge(-i)
        except UpstreamDown:
            logger.exception(f"warm-up {i}")
    sdk.flush(10.0)
    time.sleep(0.2)

    gc.collect()
    rss_before = rss_bytes()
    peak_reset = reset_peak_rss()
    clock = time.perf_counter_ns
    cpu0 = time.process_time()
    thread0 = time.thread_time()
    started = clock()
    for i in range(n):
        try:
            charge(i)
        except UpstreamDown:
            t0 = clock()
            if distinct:
                logger.exception(f"charge failed for order {i}")
            else:
                logger.exception("charge failed for order %d", i)
            latencies[i] = clock() - t0
    loop_wall = (clock() - started) / 1e9
    thread_cpu = time.thread_time() - thread0
    process_cpu = time.process_time() - cpu0
    peak = peak_rss_bytes() if peak_reset else max(peak_rss_bytes(), rss_bytes())
    rss_after = rss_bytes()

    ordered = sorted(latencies)
    call_total = sum(ordered) / 1e9
    close_started = time.perf_counter()
    stats_before_close = sdk.stats()
    sdk.close(args.close_timeout)
    close_wall = time.perf_counter() - close_started

    def pct(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1e3  # microseconds

    emit_result(
        {
            "sdk": args.sdk,
            "variant": args.variant,
            "errors": n,
            "loop_wall": loop_wall,
            "calls_per_s": n / call_total if call_total else 0.0,
            "mean_us": statistics.fmean(ordered) / 1e3,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
            "max_us": ordered[-1] / 1e3,
            "over_5ms": sum(1 for v in ordered if v > 5_000_000),
            "over_50ms": sum(1 for v in ordered if v > 50_000_000),
            "thread_cpu": thread_cpu,
            "process_cpu": process_cpu,
            "rss_before": rss_before,
            "rss_peak": peak,
            "rss_after": rss_after,
            "peak_growth_mb": (peak - rss_before) / 2**20,
            "peak_reset": peak_reset,
            "close_wall": close_wall,
            "stats": stats_before_close,
        }
    )


if __name__ == "__main__":
    main()
