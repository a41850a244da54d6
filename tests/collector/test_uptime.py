"""Uptime probes against real HTTP servers on loopback that answer, fail, hang and go away."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from tests.conftest import wait_until

from selfreport.collector.alerting.config import UptimeConfig
from selfreport.collector.alerting.uptime import ProbeResult, UptimeProber, probe


def Check(url: str, **fields: Any) -> UptimeConfig:
    """The configuration's ``UptimeConfig``, every 30.0 s, 1 failure(s) in a row
    making it down, unless said otherwise."""
    fields.setdefault("interval", 30.0)
    fields.setdefault("timeout", 5.0)
    fields.setdefault("consecutive", 1)
    return UptimeConfig(url, **fields)


class Site:
    """A loopback HTTP server whose answer the test sets; it records the requests' headers."""

    def __init__(self) -> None:
        self.status = 200
        self.headers: list[dict[str, str]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.headers.append(dict(self.headers.items()))
                self.send_response(site.status)
                if site.status in (301, 302):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def site() -> Iterator[Site]:
    running = Site()
    yield running
    running.stop()


def test_up_then_500_then_gone_then_back(site: Site) -> None:
    clock = iter(range(100, 200))
    prober = UptimeProber([Check(site.url, consecutive=2)], clock=lambda: float(next(clock)))
    assert prober.status()[0].up is None
    prober.probe_all()
    first = prober.status()[0]
    assert (first.up, first.down, first.since, first.name) == (True, False, 100.0, site.url)
    assert first.last is not None
    assert first.last.status == 200
    assert first.last.latency >= 0
    site.status = 500
    prober.probe_all()
    once = prober.status()[0]
    assert (once.up, once.down, once.consecutive_failures) == (False, False, 1)
    assert once.last is not None
    assert once.last.error == "HTTP 500"
    prober.probe_all()
    twice = prober.status()[0]
    assert (twice.down, twice.consecutive_failures, twice.since) == (True, 2, 101.0)
    assert twice.failing
    site.stop()
    prober.probe_all()
    gone = prober.status()[0]
    assert gone.consecutive_failures == 3
    assert gone.last is not None
    assert gone.last.status is None
    assert gone.last.error is not None
    assert "Connection" in gone.last.error or "refused" in gone.last.error


def test_recovery_resets_the_streak(site: Site) -> None:
    prober = UptimeProber([Check(site.url, name="api")])
    site.status = 503
    prober.probe_all()
    assert prober.status()[0].down
    site.status = 200
    prober.probe_all()
    back = prober.status()[0]
    assert (back.up, back.down, back.consecutive_failures, back.subject) == (True, False, 0, "api")


def test_redirects_are_not_followed_and_expected_status_may_be_a_list(site: Site) -> None:
    site.status = 302
    assert not probe(Check(site.url)).up
    assert probe(Check(site.url, expect_status=(200, 302))).up


def test_probe_carries_no_selfreport_marks(site: Site) -> None:
    probe(Check(site.url))
    sent = {key.lower() for key in site.headers[0]}
    assert sent <= {"host", "user-agent", "connection", "accept-encoding"}
    assert not any("selfreport" in key or "sentry" in key for key in sent)


def test_hanging_server_times_out_and_bad_urls_are_down() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts into the backlog, never answers
        port = listener.getsockname()[1]
        result = probe(Check(f"http://127.0.0.1:{port}/", timeout=0.2))
    assert not result.up
    assert result.error is not None
    assert "timed out" in result.error.lower() or "Timeout" in result.error
    assert "not an http(s) URL" in str(probe(Check("ftp://127.0.0.1/")).error)


def test_https_against_a_plain_server_is_down(site: Site) -> None:
    result = probe(Check(site.url.replace("http:", "https:"), timeout=2))
    assert not result.up
    assert result.status is None


def test_thread_probes_on_the_interval_and_stops(site: Site) -> None:
    seen: list[ProbeResult] = []
    prober = UptimeProber([Check(site.url, interval=0.05)], on_result=lambda _n, r: seen.append(r))
    prober.start()
    try:
        wait_until(lambda: len(seen) >= 3)
        assert len(seen) >= 3
        assert all(result.up for result in seen)
    finally:
        prober.close(5)
    assert len(prober._threads) == 1
    assert not prober._threads[0].is_alive()
    prober.start()  # closed: not started again
    assert len(prober._threads) == 1
    idle = UptimeProber([])
    idle.start()  # no checks: no thread
    assert idle._threads == []


def test_a_hanging_url_delays_no_other(site: Site) -> None:
    seen: list[str] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts into the backlog, never answers
        hanging = Check(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=30, name="hang")
        fine = Check(site.url, interval=0.05, name="fine")
        prober = UptimeProber([hanging, fine], on_result=lambda name, _r: seen.append(name))
        prober.start()
        try:
            wait_until(lambda: seen.count("fine") >= 3)
            assert seen.count("fine") >= 3
            assert "hang" not in seen
        finally:
            prober.close(0.5)  # the hanging probe's thread is a daemon; close() is bounded


def test_a_failing_result_callback_is_logged_not_raised(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(name: str, result: ProbeResult) -> None:
        raise RuntimeError("disk full")

    prober = UptimeProber([Check(site.url)], on_result=broken)
    with caplog.at_level("WARNING", logger="selfreport"):
        prober.probe_all()
    assert prober.probes == 1
    assert "disk full" in caplog.text
