"""pyperf worker script: what one logging/capture call costs the calling thread, per SDK.

Run by run.py as ``micro.py --sdk SDK --case CASE --dsn DSN --side-file F [pyperf options]``;
pyperf spawns fresh worker processes, so each SDK lives alone in its processes.

Each value times ``loops`` calls in a row on the caller's thread (wall clock). For reported
cases the SDK's queue is then drained, untimed, so every value starts from an empty queue and
every call is really delivered to the collector. Beside pyperf's wall-clock values, the side
file gets, per value, the caller thread's CPU time and the whole process's CPU time including
the drain (the deferred work on the SDK's worker thread), so deferral is not free in the report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import pyperf
from _common import setup_sdk

REPORTED_CASES = ("log_error", "log_exception", "capture_exception", "log_error_scope")
# breadcrumb: logger.info recorded as a breadcrumb; bare_info: the same call, NullHandler only.
CASES = (*REPORTED_CASES, "dropped", "bare", "breadcrumb", "bare_info")

side_values: list[dict[str, float]] = []


class _Boom(Exception):
    pass


def _raise(i: int) -> None:
    raise _Boom(f"payment {i} declined")


def fill_scope(sdk_name: str) -> None:
    """5 tags, a user and 20 breadcrumbs, set through each SDK's own API."""
    if sdk_name == "selfreport":
        import selfreport as api
    else:
        import sentry_sdk as api  # type: ignore[no-redef]
    for n in range(5):
        api.set_tag(f"tag{n}", f"value {n}")
    api.set_user({"id": "42", "username": "bench", "email": "bench@example.com"})
    for n in range(20):
        api.add_breadcrumb(message=f"step {n}", category="bench", level="info", data={"n": n})


def build_case(case: str, sdk_name: str, dsn: str) -> tuple[Callable[[int], None], Any]:
    """The loop to time for ``case`` (run ``loops`` times) and the SDK handle (or None)."""
    logger = logging.getLogger("bench.app")
    # The baseline logger: only a NullHandler, so logging itself does the same work in all cases.
    logger.addHandler(logging.NullHandler())
    sdk = None if case in ("bare", "bare_info") else setup_sdk(sdk_name, dsn, unlimited=True)
    if case in ("breadcrumb", "bare_info"):
        logger.setLevel(logging.INFO)  # both: INFO records are made and handled

    if case in ("breadcrumb", "bare_info"):

        def loop(loops: int) -> None:
            info = logger.info
            for i in range(loops):
                info("payment %d accepted", i)

    elif case == "log_error_scope":
        fill_scope(sdk_name)

        def loop(loops: int) -> None:
            error = logger.error
            for i in range(loops):
                error("payment %d declined", i)

    elif case == "log_error":

        def loop(loops: int) -> None:
            error = logger.error
            for i in range(loops):
                error("payment %d declined", i)

    elif case == "log_exception":

        def loop(loops: int) -> None:
            exception = logger.exception
            for i in range(loops):
                try:
                    _raise(i)
                except _Boom:
                    exception("payment %d declined", i)

    elif case == "capture_exception":
        assert sdk is not None
        capture = sdk.capture_exception

        def loop(loops: int) -> None:
            for i in range(loops):
                try:
                    _raise(i)
                except _Boom as exc:
                    capture(exc)

    elif case == "dropped":
        import selfreport

        def loop(loops: int) -> None:
            error = logger.error
            with selfreport.reporting_path():
                for i in range(loops):
                    error("payment %d declined", i)

    elif case == "bare":

        def loop(loops: int) -> None:
            error = logger.error
            for i in range(loops):
                error("payment %d declined", i)

    else:
        raise ValueError(f"unknown case {case!r}")
    return loop, sdk


def main() -> None:
    def add_cmdline_args(cmd: list[str], args: Any) -> None:
        cmd.extend(["--sdk", args.sdk, "--case", args.case, "--dsn", args.dsn])
        cmd.extend(["--side-file", args.side_file])

    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args)
    runner.argparser.add_argument("--sdk", required=True)
    runner.argparser.add_argument("--case", required=True, choices=CASES)
    runner.argparser.add_argument("--dsn", required=True)
    runner.argparser.add_argument("--side-file", required=True)
    args = runner.parse_args()

    loop: Callable[[int], None] = lambda loops: None  # noqa: E731 - the spawning process
    sdk = None
    if args.worker:
        loop, sdk = build_case(args.case, args.sdk, args.dsn)
    reported = args.case in REPORTED_CASES

    def time_func(loops: int) -> float:
        if reported and sdk is not None:
            sdk.flush(60.0)
        cpu0 = time.process_time()
        thread0 = time.thread_time()
        t0 = time.perf_counter()
        loop(loops)
        elapsed = time.perf_counter() - t0
        thread_cpu = time.thread_time() - thread0
        if reported and sdk is not None:
            sdk.flush(60.0)
        side_values.append(
            {
                "loops": loops,
                "wall": elapsed,
                "thread_cpu": thread_cpu,
                "process_cpu": time.process_time() - cpu0,
            }
        )
        return elapsed

    runner.bench_time_func(f"{args.sdk}:{args.case}", time_func)

    if args.worker:
        stats = sdk.stats() if sdk is not None else {}
        if sdk is not None:
            sdk.close(5.0)
        with open(args.side_file, "a") as f:
            record = {"pid": os.getpid(), "values": side_values, "stats": stats}
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
