"""Child process: close() with events queued, against an upstream that accepts and never answers.

``close_blackhole.py --sdk SDK --dsn DSN --events N --shutdown-timeout T --mode close|exit``.
``close``: time an explicit close (``selfreport.close()`` / ``sentry_sdk.get_client().close()``),
then exit. ``exit``: print a marker and return from main, so the parent times the interpreter's
own shutdown (the SDKs' atexit handlers) until the process is gone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from _common import emit_result, setup_sdk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sdk", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--shutdown-timeout", type=float, default=2.0)
    parser.add_argument("--mode", choices=("close", "exit"), default="close")
    args = parser.parse_args()

    logger = logging.getLogger("bench.close")
    logger.addHandler(logging.NullHandler())
    # No client-side limits, so all N events are queued behind the first, stuck request.
    sdk = setup_sdk(args.sdk, args.dsn, unlimited=True, shutdown_timeout=args.shutdown_timeout)
    for i in range(args.events):
        logger.error(f"queued event {i}")
    time.sleep(0.3)  # the worker is now blocked on the first request
    if args.mode == "exit":
        sys.stdout.write("EXITING\n")
        sys.stdout.flush()
        return
    started = time.perf_counter()
    sdk.close(args.shutdown_timeout)
    close_wall = time.perf_counter() - started
    emit_result(
        {
            "sdk": args.sdk,
            "events": args.events,
            "shutdown_timeout": args.shutdown_timeout,
            "close_wall": close_wall,
            "stats": sdk.stats(),
        }
    )


if __name__ == "__main__":
    main()
