"""Shared by the benchmark scripts: the collector process, SDK set-up and result lines."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PYTHON = sys.executable
RESULT_PREFIX = "RESULT "

SDKS = ("selfreport", "sentry")
SENTRY_PLUS = "sentry+selfreport"
SENTRY_DEFAULTS = "sentry-defaults"


# --- the endpoint ------------------------------------------------------------------------------


class CollectorProcess:
    """``selfreport.testing.FakeCollector`` on 127.0.0.1 in a process of its own.

    Each benchmark child reports to its own DSN project id, so one collector can tell the
    children apart; ``stats(project, since, until)`` counts what arrived in a time window.
    """

    def __init__(self, *, status: int = 200, blackhole: bool = False) -> None:
        cmd = [PYTHON, str(BENCH_DIR / "_collector_server.py"), "--status", str(status)]
        if blackhole:
            cmd.append("--blackhole")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self.close()
            raise RuntimeError(f"the collector process did not start: {line!r}")
        self.port = int(line.split()[1])
        self._lock = threading.Lock()  # one question and answer on the pipe at a time

    def dsn(self, project: int) -> str:
        return f"http://public@127.0.0.1:{self.port}/{project}"

    def stats(
        self, project: int, since: float = 0.0, until: Optional[float] = None
    ) -> dict[str, Any]:
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        end = "inf" if until is None else repr(until)
        with self._lock:
            self._proc.stdin.write(f"stats {project} {since!r} {end}\n")
            self._proc.stdin.flush()
            return dict(json.loads(self._proc.stdout.readline()))

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write("quit\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> CollectorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def envelope_of(request: Any) -> Any:
    """The envelope of a ``FakeCollector`` request, decoding brotli bodies it could not read.

    sentry-sdk compresses with brotli (``Content-Encoding: br``) whenever the ``brotli`` module
    is installed; count those events too rather than take them for malformed requests.
    """
    if request.envelope is not None:
        return request.envelope
    headers = {str(k).lower(): v for k, v in request.headers.items()}
    if headers.get("content-encoding", "").lower() != "br":
        return None
    try:
        import brotli

        from selfreport._delivery.envelope import parse_envelope

        return parse_envelope(brotli.decompress(request.body))
    except Exception:
        return None


# --- children ----------------------------------------------------------------------------------


class ChildError(RuntimeError):
    """A benchmark child failed or printed no result."""


def run_child(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``bench/<script>`` in a fresh interpreter; its ``RESULT {...}`` line as a dict."""
    cmd = [PYTHON, str(BENCH_DIR / script), *args]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ChildError(f"{script} {' '.join(args)} timed out after {timeout:.0f}s") from exc
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = dict(json.loads(line[len(RESULT_PREFIX) :]))
            result.setdefault("child_wall", time.monotonic() - started)
            result["exit_code"] = proc.returncode
            return result
    tail = "\n".join(proc.stderr.splitlines()[-15:])
    raise ChildError(f"{script} {' '.join(args)} exited {proc.returncode}, no result:\n{tail}")


def emit_result(result: dict[str, Any]) -> None:
    """Print the child's result line (the parent reads the last one)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


# --- SDK set-up inside a child -----------------------------------------------------------------


def sentry_plus_available() -> tuple[bool, str]:
    """Whether ``selfreport.integrations.sentry.SelfreportIntegration`` can be imported."""
    try:
        from selfreport.integrations.sentry import SelfreportIntegration  # noqa: F401
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


class Sdk:
    """The operations a benchmark needs, the same for both SDKs."""

    def __init__(
        self,
        name: str,
        flush: Callable[[float], object],
        close: Callable[[float], object],
        capture_exception: Callable[[BaseException], object],
        stats: Callable[[], dict[str, int]],
    ) -> None:
        self.name = name
        self.flush = flush
        self.close = close
        self.capture_exception = capture_exception
        self.stats = stats


def setup_sdk(
    sdk: str,
    dsn: str,
    *,
    unlimited: bool,
    shutdown_timeout: float = 2.0,
    before_send: Optional[Callable[[Any, Any], Any]] = None,
) -> Sdk:
    """Initialise one SDK in this process.

    ``unlimited`` turns off everything that would drop events on the client (selfreport:
    ``rate_limit=0, dedupe_window=0, max_queue=1_000_000``; sentry-sdk: a transport queue of
    1,000,000), so the cost cases measure the path of an event that is really sent. Without it
    both SDKs run with their default limits. sentry-sdk never samples (``sample_rate=1.0``).
    """
    if sdk == "selfreport":
        import selfreport

        options: dict[str, Any] = {"shutdown_timeout": shutdown_timeout, "release": "bench"}
        if unlimited:
            options.update(rate_limit=0, dedupe_window=0, max_queue=1_000_000)
        if before_send is not None:
            options["before_send"] = before_send
        client = selfreport.init(dsn, **options)
        return Sdk(
            sdk,
            flush=selfreport.flush,
            close=selfreport.close,
            capture_exception=selfreport.capture_exception,
            stats=client.stats,  # still readable after close()
        )
    if sdk in ("sentry", SENTRY_DEFAULTS, SENTRY_PLUS):
        import sentry_sdk
        from sentry_sdk.integrations.logging import LoggingIntegration

        # "sentry": the same event content as selfreport sends (no breadcrumbs, no list of
        # installed modules, no local variables), the cheapest honest comparison.
        # "sentry-defaults": sentry-sdk as installed, breadcrumbs from INFO logs and all.
        defaults = sdk == SENTRY_DEFAULTS
        breadcrumb_level = logging.INFO if defaults else None
        integrations: list[Any] = [
            LoggingIntegration(level=breadcrumb_level, event_level=logging.ERROR)
        ]
        if sdk == SENTRY_PLUS:
            from selfreport.integrations.sentry import SelfreportIntegration

            limits: dict[str, Any] = {"rate_limit": 0, "dedupe_window": 0} if unlimited else {}
            integrations.append(SelfreportIntegration(**limits))
        sentry_options: dict[str, Any] = {
            "integrations": integrations,
            "sample_rate": 1.0,
            "shutdown_timeout": shutdown_timeout,
            "release": "bench",  # no git look-up for a release at start-up
        }
        if not defaults:
            from sentry_sdk.integrations.modules import ModulesIntegration

            sentry_options["include_local_variables"] = False
            sentry_options["disabled_integrations"] = [ModulesIntegration()]
        if unlimited:
            sentry_options["transport_queue_size"] = 1_000_000
        if before_send is not None:
            sentry_options["before_send"] = before_send
        sentry_sdk.init(dsn, **sentry_options)

        def close(timeout: float) -> None:
            sentry_sdk.get_client().close(timeout=timeout)

        stats: Callable[[], dict[str, int]] = dict
        if sdk == SENTRY_PLUS:
            from selfreport.integrations import sentry as selfreport_sentry

            stats = selfreport_sentry.stats
        return Sdk(
            sdk,
            flush=lambda timeout: sentry_sdk.flush(timeout=timeout),
            close=close,
            capture_exception=sentry_sdk.capture_exception,
            stats=stats,
        )
    raise ValueError(f"unknown SDK {sdk!r}")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
