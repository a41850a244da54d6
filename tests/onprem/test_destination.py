"""Destinations: isolation, scrubbing, limits, spool and replay against real HTTP endpoints."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from tests.conftest import FAST_OPTIONS, closed_port, settle, wait_until

import selfreport
from selfreport import Client, ConfigError, Destination
from selfreport._delivery.envelope import serialize_envelope
from selfreport._delivery.spool import Spool
from selfreport._delivery.transport import Response
from selfreport._onprem.destination import DESTINATION_STAT_KEYS, plain_copy
from selfreport.testing import FakeCollector, MemoryTransport


def event(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": f"{n:032x}",
        "level": "error",
        "platform": "python",
        "logentry": {"message": f"event {n}"},
        **fields,
    }


def messages(collector: FakeCollector, since: int = 0) -> list[str]:
    """The messages of the events in requests ``since`` onwards (earlier ones were refused)."""
    envelopes = [r.envelope for r in collector.requests[since:] if r.envelope is not None]
    return [e["logentry"]["message"] for env in envelopes for e in env.events()]


def wait_for_messages(collector: FakeCollector, count: int, since: int = 0) -> list[str]:
    wait_until(lambda: len(messages(collector, since)) >= count)
    return messages(collector, since)


@pytest.fixture
def destinations() -> Iterator[Callable[..., Destination]]:
    made: list[Destination] = []

    def make(dsn: Any = None, **options: Any) -> Destination:
        options.setdefault("retry_backoff", 0.0)
        options.setdefault("rate_limit", 0)
        options.setdefault("replay_backoff", 0.05)
        options.setdefault("replay_max_backoff", 0.2)
        destination = Destination(dsn, **options)
        made.append(destination)
        return destination

    yield make
    for destination in made:
        destination.close(1.0)


# --- on its own, as a server uses it ---------------------------------------------------------


def test_send_event_delivers_a_built_event(collector: FakeCollector, destinations: Any) -> None:
    upstream = destinations(collector.dsn, name="vendor")
    assert upstream.send_event(event(1, extra={"k": "v"}))
    assert upstream.flush(5)
    assert collector.wait_for(1)
    (received,) = collector.events
    assert received["event_id"] == f"{1:032x}"
    assert received["extra"] == {"k": "v"}
    stats = upstream.stats()
    assert set(stats) == set(DESTINATION_STAT_KEYS)
    assert stats["accepted"] == 1
    assert stats["sent"] == 1
    assert repr(upstream) == "Destination('vendor')"


def test_scrubbing_is_per_destination(destinations: Any) -> None:
    with FakeCollector() as local, FakeCollector() as vendor:
        raw = destinations(local.dsn)
        scrubbed = destinations(vendor.dsn, scrub=True)
        secret = event(1, extra={"password": "hunter2"}, user={"email": "a@example.com"})
        assert raw.send_event(secret, copy=True)
        assert scrubbed.send_event(secret, copy=True)
        assert local.wait_for(1)
        assert vendor.wait_for(1)
        assert local.events[0]["extra"] == {"password": "hunter2"}
        assert vendor.events[0]["extra"] == {"password": "[Filtered]"}
        assert vendor.events[0]["user"] == {"email": "[email]"}
    assert secret["extra"] == {"password": "hunter2"}  # the caller's event is untouched


def test_a_custom_scrubber_and_a_failing_one(collector: FakeCollector, destinations: Any) -> None:
    def broken(event: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("bug")

    def not_a_dict(event: dict[str, Any]) -> Any:
        return ["nope"]

    custom = destinations(collector.dsn, scrub=lambda e: {**e, "tags": {"scrubbed": "yes"}})
    failing = destinations(collector.dsn, scrub=broken, name="broken")
    wrong = destinations(collector.dsn, scrub=not_a_dict, name="wrong")
    for destination in (custom, failing, wrong):
        assert destination.send_event(event(1))
        assert destination.flush(5)
    # All three flushed: whatever they were going to send has reached the collector.
    assert [e["tags"] for e in collector.events] == [{"scrubbed": "yes"}]
    assert failing.stats()["dropped_error"] == 1
    assert wrong.stats()["dropped_error"] == 1
    assert failing.stats()["sent"] == 0


def test_a_slow_destination_does_not_hold_up_the_others(destinations: Any) -> None:
    with FakeCollector() as stuck, FakeCollector() as healthy:
        stuck.blackhole = True
        slow = destinations(stuck.dsn, http_timeout=30)
        fast = destinations(healthy.dsn)
        for n in range(5):
            slow.send_event(event(n))
            fast.send_event(event(n))
        assert healthy.wait_for(5, timeout=5)
        assert messages(healthy) == [f"event {n}" for n in range(5)]
        assert slow.stats()["sent"] == 0
        started = time.monotonic()
        slow.close(0.5)  # bounded even though its upstream never answers
        assert time.monotonic() - started < 3


def test_queue_and_rate_limits_are_per_destination(destinations: Any) -> None:
    with FakeCollector() as stuck:
        stuck.blackhole = True
        small = destinations(stuck.dsn, max_queue=1, http_timeout=30)
        results = [small.send_event(event(n)) for n in range(5)]
        assert results[0]
        assert not all(results)
        assert small.stats()["dropped_queue_full"] >= 3
    limited = destinations(transport=MemoryTransport(), rate_limit=0.001, rate_burst=2)
    assert [limited.send_event(event(n)) for n in range(4)] == [True, True, False, False]
    assert limited.stats()["dropped_rate_limited"] == 2


@pytest.mark.parametrize(
    ("status", "headers", "key"),
    [
        (400, {}, "send_failed"),
        (429, {"Retry-After": "60"}, "dropped_rate_limited"),
        (503, {}, "send_failed"),
    ],
)
def test_refusals_without_a_spool(
    collector: FakeCollector, destinations: Any, status: int, headers: dict[str, str], key: str
) -> None:
    collector.status = status
    collector.response_headers = headers
    upstream = destinations(collector.dsn, max_retries=2)
    upstream.send_event(event(1))
    assert upstream.flush(5)
    stats = upstream.stats()
    assert stats[key] == 1
    assert stats["sent"] == 0
    assert stats["retried"] == (2 if status == 503 else 0)
    if status == 429:  # the next one is not even tried
        upstream.send_event(event(2))
        assert upstream.flush(5)
        assert upstream.stats()["dropped_rate_limited"] == 2
        assert len(collector.requests) == 1


def test_an_unreachable_upstream_without_a_spool(destinations: Any) -> None:
    upstream = destinations(f"http://k@127.0.0.1:{closed_port()}/1", max_retries=1)
    upstream.send_event(event(1))
    assert upstream.flush(5)
    assert upstream.stats()["send_failed"] == 1
    assert upstream.stats()["retried"] == 1


def test_odd_calls_never_raise(destinations: Any) -> None:
    upstream = destinations(transport=MemoryTransport())
    assert not upstream.send_event(["not", "a", "dict"])

    class Exploding(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            raise RuntimeError("boom")

    assert not upstream.send_event(Exploding(a=1), copy=True)
    assert upstream.stats()["dropped_error"] == 2
    upstream.close(1)
    upstream.close(1)  # twice is fine
    assert not upstream.send_event(event(1))
    assert upstream.stats()["dropped_closed"] == 1


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({}, "dsn"),
        ({"dsn": "nope"}, "dsn"),
        ({"dsn": "http://k@h/1", "name": ""}, "name"),
        ({"dsn": "http://k@h/1", "rate_limit": -1}, "rate_limit"),
        ({"dsn": "http://k@h/1", "max_queue": 0}, "max_queue"),
        ({"dsn": "http://k@h/1", "max_retries": 1.5}, "max_retries"),
        ({"dsn": "http://k@h/1", "scrub": "yes"}, "scrub"),
        ({"dsn": "http://k@h/1", "replay_backoff": "1"}, "replay_backoff"),
    ],
)
def test_invalid_options_are_config_errors(kwargs: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        Destination(**kwargs)
    assert info.value.option == option


def test_plain_copy_copies_containers_only() -> None:
    shared = object()
    original = {"a": [1, {"b": (2, shared)}]}
    copied = plain_copy(original)
    assert copied == {"a": [1, {"b": [2, shared]}]}
    assert copied["a"] is not original["a"]
    assert copied["a"][1]["b"][1] is shared
    deep: Any = []
    for _ in range(100):
        deep = [deep]
    assert plain_copy(deep) == deep


# --- with a spool -------------------------------------------------------------------------------


def test_spooled_while_failing_and_replayed_in_order(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    collector.status = 503
    upstream = destinations(collector.dsn, spool_dir=tmp_path, replay_backoff=0.2)
    for n in range(5):
        assert upstream.send_event(event(n))
    assert upstream.flush(5)
    stats = upstream.stats()
    assert stats["spooled"] == 5
    assert stats["spool_size"] == 5
    assert stats["send_failed"] == 0
    refused = len(collector.requests)
    assert refused <= 2  # down after the first failure: no hammering
    collector.status = 200
    assert wait_for_messages(collector, 5, refused) == [f"event {n}" for n in range(5)]
    assert wait_until(lambda: upstream.stats()["replayed"] == 5)
    assert upstream.stats()["sent"] == 5
    assert upstream.stats()["spool_size"] == 0


@pytest.mark.slow
def test_429_goes_to_the_spool_and_waits_for_retry_after(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    collector.status = 429
    collector.response_headers = {"Retry-After": "1"}
    upstream = destinations(collector.dsn, spool_dir=tmp_path)
    started = time.monotonic()
    upstream.send_event(event(1))
    upstream.send_event(event(2))  # not tried: we were told to wait
    assert upstream.flush(5)
    assert upstream.stats()["spooled"] == 2
    assert len(collector.requests) == 1
    collector.status = 200
    collector.response_headers = {}
    assert wait_for_messages(collector, 2, 1) == ["event 1", "event 2"]
    assert time.monotonic() - started >= 0.9


def test_a_rate_limit_announced_by_an_accepted_replay_holds_the_rest_back(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    """Replay reads X-Sentry-Rate-Limits on a 2xx too (it used to read them on errors only, so
    it sent the whole spool into a limit the upstream had just announced)."""
    collector.status = 503
    upstream = destinations(collector.dsn, spool_dir=tmp_path)
    for n in range(3):
        upstream.send_event(event(n))
    assert upstream.flush(5)
    assert upstream.stats()["spool_size"] == 3
    collector.response_headers = {"X-Sentry-Rate-Limits": "60:error:organization:quota"}
    collector.status = 200
    replayer = upstream.upstream.replayer
    assert replayer is not None
    assert wait_until(lambda: upstream.stats()["replayed"] == 1 and not replayer._busy)
    stats = upstream.stats()
    assert (stats["replayed"], stats["spool_size"]) == (1, 2)  # the round stopped there
    assert upstream.upstream.limits.seconds_left("error") > 50
    sent = len(collector.requests)
    upstream.send_event(event(3))  # a live event waits in the spool too
    assert upstream.flush(5)
    assert (upstream.stats()["spool_size"], len(collector.requests)) == (3, sent)


def test_a_spooled_envelope_the_upstream_refuses_is_quarantined_and_counted(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    collector.status = 503
    upstream = destinations(collector.dsn, spool_dir=tmp_path)
    upstream.send_event(event(1))
    assert upstream.flush(5)
    collector.status = 400
    # The file leaves the spool, then the counter moves: wait for both.
    assert wait_until(lambda: upstream.stats()["quarantined"] == 1)
    assert upstream.stats()["spool_size"] == 0
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    assert upstream.stats()["replayed"] == 0


def test_unreachable_upstream_spools_and_close_keeps_the_queue(
    destinations: Any, tmp_path: Path
) -> None:
    dsn = f"http://k@127.0.0.1:{closed_port()}/1"
    upstream = destinations(dsn, spool_dir=tmp_path, replay_backoff=30)
    for n in range(3):
        upstream.send_event(event(n))
    upstream.close(5)
    assert upstream.stats()["spooled"] == 3
    # A new process (or a restart) finds them and replays them when the upstream is back.
    with FakeCollector() as collector:
        again = destinations(collector.dsn, spool_dir=tmp_path)
        assert collector.wait_for(3)
        assert messages(collector) == ["event 0", "event 1", "event 2"]
        assert wait_until(lambda: again.stats()["replayed"] == 3)


def test_close_spools_what_is_still_queued(destinations: Any, tmp_path: Path) -> None:
    with FakeCollector() as stuck:
        stuck.blackhole = True
        upstream = destinations(stuck.dsn, spool_dir=tmp_path, http_timeout=30)
        for n in range(4):
            upstream.send_event(event(n))
        assert stuck.wait_for(1)  # the first is in flight, never answered
        # close(0.3) leaves 0.03 s to spool the interrupted envelope: 3 == 4 under load, 5 runs
        # out of 100 with 4 busy loops on 2 cores (the sleep it replaced did no better)
        upstream.close(2.0)
    stats = upstream.stats()
    assert stats["dropped_closed"] == 0
    assert stats["spooled"] == 4  # the one in flight and the three still queued


def test_an_envelope_too_big_for_the_spool(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    collector.status = 503
    upstream = destinations(collector.dsn, spool_dir=tmp_path, spool_max_bytes=1024)
    upstream.send_event(event(1, extra={"blob": "x" * 5000}))
    assert upstream.flush(5)
    assert upstream.stats()["dropped_spool_full"] == 1
    assert upstream.stats()["send_failed"] == 0


def test_a_spool_that_cannot_be_written_counts_a_failed_send(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    collector.status = 503
    upstream = destinations(collector.dsn, spool_dir=tmp_path)
    (tmp_path / "tmp").rmdir()
    (tmp_path / "tmp").write_text("in the way")
    upstream.send_event(event(1))
    assert upstream.flush(5)
    assert upstream.stats()["send_failed"] == 1
    assert upstream.stats()["spooled"] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads, on 3.12+
def test_a_forked_child_sends_through_its_own_destination(
    collector: FakeCollector, destinations: Any
) -> None:
    upstream = destinations(collector.dsn)
    upstream.send_event(event(1))
    assert upstream.flush(5)
    pid = os.fork()
    if pid == 0:  # the child: a fresh queue and thread, counting from zero
        code = 1
        try:
            fresh = upstream.stats()["sent"] == 0
            upstream.send_event(event(2))
            code = 0 if fresh and upstream.flush(5) and upstream.stats()["sent"] == 1 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert collector.wait_for(2)
    assert sorted(messages(collector)) == ["event 1", "event 2"]


# --- wired into the client ---------------------------------------------------------------------


def test_client_sends_to_its_dsn_and_every_destination(make_client: Any) -> None:
    with FakeCollector() as local, FakeCollector() as vendor, FakeCollector() as third:
        client = make_client(
            local.dsn, destinations=[Destination(vendor.dsn, scrub=True), third.dsn]
        )
        client.capture_message("mail a@example.com")
        assert client.flush(5)
        assert local.wait_for(1)
        assert vendor.wait_for(1)
        assert third.wait_for(1)
        assert local.events[0]["logentry"]["message"] == "mail a@example.com"
        assert vendor.events[0]["logentry"]["message"] == "mail [email]"
        assert third.events[0]["logentry"]["message"] == "mail a@example.com"
        assert local.events[0]["event_id"] == vendor.events[0]["event_id"]
        client.close(2)
        assert all(d._closed.is_set() for d in client.destinations)


def test_client_without_a_dsn_sends_to_destinations_only(
    make_client: Any, collector: FakeCollector
) -> None:
    client = make_client(destinations=Destination(collector.dsn))
    assert client.enabled
    assert client.transport is None
    client.capture_message("only here")
    assert client.flush(5)
    assert collector.wait_for(1)
    assert client.stats()["sent"] == 0


def test_a_rate_limited_primary_still_feeds_the_destinations(make_client: Any) -> None:
    with FakeCollector() as primary, FakeCollector() as other:
        primary.status = 429
        primary.response_headers = {"Retry-After": "60"}
        client = make_client(primary.dsn, destinations=[other.dsn])
        client.capture_message("first")
        assert client.flush(5)
        client.capture_message("second")
        assert client.flush(5)
        assert other.wait_for(2)
        assert len(primary.requests) == 1
        assert client.stats()["dropped_rate_limited"] == 2


def test_client_destination_options_are_checked(make_client: Any) -> None:
    with pytest.raises(ConfigError) as info:
        make_client("http://k@127.0.0.1:9/1", destinations=[42])
    assert info.value.option == "destinations"
    with pytest.raises(ConfigError) as info:
        make_client(None, spool_dir="/tmp/nowhere-needed")
    assert info.value.option == "spool_dir"


@pytest.mark.slow
def test_client_spools_while_its_collector_fails_and_replays_later(
    make_client: Any, collector: FakeCollector, tmp_path: Path
) -> None:
    collector.status = 502
    client = make_client(collector.dsn, spool_dir=tmp_path)
    for n in range(4):
        client.capture_message(f"message {n}")
    assert client.flush(5)
    stats = client.stats()
    assert stats["spooled"] == 4
    assert stats["send_failed"] == 0
    assert stats["sent"] == 0
    refused = len(collector.requests)
    collector.status = 200
    # replayed after about a second of backoff
    assert wait_for_messages(collector, 4, refused) == [f"message {n}" for n in range(4)]
    assert wait_until(lambda: client.stats()["replayed"] == 4)
    assert client.stats()["sent"] == 4
    client.capture_message("live again")
    assert client.flush(5)
    assert wait_for_messages(collector, 5, refused)[-1] == "live again"


def test_client_spools_on_429_and_on_an_unreachable_collector(
    make_client: Any, collector: FakeCollector, tmp_path: Path
) -> None:
    collector.status = 429
    collector.response_headers = {"Retry-After": "60"}
    limited = make_client(collector.dsn, spool_dir=tmp_path / "a")
    limited.capture_message("one")
    limited.capture_message("two")
    assert limited.flush(5)
    assert limited.stats()["spooled"] == 2
    assert limited.stats()["dropped_rate_limited"] == 0
    gone = make_client(f"http://k@127.0.0.1:{closed_port()}/1", spool_dir=tmp_path / "b")
    gone.capture_message("three")
    assert gone.flush(5)
    assert gone.stats()["spooled"] == 1
    assert gone.stats()["send_failed"] == 0


def test_client_close_spools_the_envelope_in_flight(tmp_path: Path) -> None:
    with FakeCollector() as stuck:
        stuck.blackhole = True
        client = Client(stuck.dsn, spool_dir=tmp_path, **{**FAST_OPTIONS, "http_timeout": 30})
        client.capture_message("in flight")
        assert wait_until(lambda: len(stuck.requests) == 1)
        # 0.5 s was not always enough to abort and spool on a loaded 2-core machine (failed
        # twice in one make test-all with two suites at once, on 3.10 and 3.12)
        client.close(2.0)
    assert client.stats()["spooled"] == 1
    assert client.stats()["send_failed"] == 0


@pytest.mark.slow
def test_reports_from_the_reporting_path_never_reach_the_endpoint(tmp_path: Path) -> None:
    """Everything new at once, failing in every way it can, with the root logger at DEBUG: the
    endpoint receives exactly the events the application captured, nothing more."""

    def broken(event: dict[str, Any]) -> dict[str, Any]:
        logging.getLogger("app.scrubber").error("the scrubber fails and logs about it")
        raise RuntimeError("scrubber bug")

    def noisy_before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        logging.getLogger("app.hooks").error("before_send logs an error")
        return event

    logging.getLogger().setLevel(logging.DEBUG)
    spool_dir = tmp_path / "spool"
    left_over = {"event_id": "ab" * 16, "logger": "left.over", "logentry": {"message": "old"}}
    Spool(spool_dir).put(serialize_envelope(left_over, None, "2024-01-01T00:00:00Z"))
    (spool_dir / f"{time.time_ns() - 1:019d}-000000-1-deadbeef.env").write_bytes(b"junk")
    with FakeCollector() as endpoint, FakeCollector() as failing:
        failing.status = 500
        selfreport.init(
            endpoint.dsn,
            before_send=noisy_before_send,
            spool_dir=spool_dir,
            destinations=[
                Destination(f"http://k@127.0.0.1:{closed_port()}/1", spool_dir=tmp_path / "d1"),
                Destination(failing.dsn, scrub=broken, name="broken"),
                Destination(failing.dsn, max_retries=1, retry_backoff=0, name="failing"),
            ],
            statsd={"host": "127.0.0.1", "port": closed_port(), "interval": 0.05},
            rate_limit=0,
            dedupe_window=0,
            debug=True,
        )
        for n in range(5):
            logging.getLogger("app").error("application error %d", n)
        assert wait_until(lambda: selfreport.stats()["replayed"] == 1)  # the one left spooled
        assert settle(selfreport, endpoint) == 6  # and the five
        stats = selfreport.stats()
        selfreport.close(5)  # every thread stopped: what the endpoint holds is all it gets
        assert sorted(str(e.get("logger")) for e in endpoint.events) == ["app"] * 5 + ["left.over"]
        assert len(endpoint.requests) == 6
        assert not [r for r in endpoint.requests if r.error]
        assert all(e.get("logger") == "app" for e in failing.events)
    assert stats["captured"] == 5
    assert stats["sent"] == 6
    assert stats["replayed"] == 1
    assert stats["dropped_reentrant"] >= 5  # the errors logged inside the reporting path
    assert any((spool_dir / "quarantine").iterdir())


# --- less travelled paths ----------------------------------------------------------------------


class FlakyTransport:
    """A transport of our own (the public extension point): refuses ``failures`` sends."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def send(self, body: bytes, timeout: float) -> Response:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise ConnectionRefusedError("not yet")
            self.bodies.append(body)
            return Response(200)

    def close(self) -> None:
        pass


class HangingTransport:
    """Never answers until closed, and cannot be interrupted."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def send(self, body: bytes, timeout: float) -> Response:
        self.calls += 1
        self.release.wait(10)
        raise ConnectionAbortedError("gave up")

    def close(self) -> None:
        self.release.set()


def test_a_replay_that_fails_again_backs_off_and_retries(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    collector.status = 503
    upstream = destinations(collector.dsn, spool_dir=tmp_path)
    upstream.send_event(event(1))
    assert wait_until(lambda: len(collector.requests) >= 3)  # the live try and two replays
    assert upstream.stats()["spool_size"] == 1
    refused = len(collector.requests)
    collector.status = 200
    assert wait_for_messages(collector, 1, refused) == ["event 1"]


def test_a_custom_transport_is_shared_with_the_replay(destinations: Any, tmp_path: Path) -> None:
    transport = FlakyTransport(failures=1)
    upstream = destinations(transport=transport, spool_dir=tmp_path)
    upstream.send_event(event(1))
    upstream.send_event(event(2))
    assert wait_until(lambda: len(transport.bodies) == 2)
    assert [b.split(b"\n")[2] for b in transport.bodies] == [
        json.dumps(event(n), separators=(",", ":")).encode() for n in (1, 2)
    ]
    # Counted just after the transport returns: wait for it rather than race it.
    assert wait_until(lambda: upstream.stats()["replayed"] == 2)


def test_close_while_waiting_to_retry(collector: FakeCollector, destinations: Any) -> None:
    collector.status = 503
    upstream = destinations(collector.dsn, max_retries=3, retry_backoff=30)
    upstream.send_event(event(1))
    assert wait_until(lambda: len(collector.requests) == 1)
    started = time.monotonic()
    upstream.close(2)
    assert time.monotonic() - started < 1.5
    assert upstream.stats()["send_failed"] == 1


def test_close_with_a_transport_that_cannot_be_interrupted(destinations: Any) -> None:
    transport = HangingTransport()
    upstream = destinations(
        transport=transport, scrub=lambda e: 1 / 0 if e["event_id"][-1] == "2" else e
    )
    upstream.send_event(event(1))
    upstream.send_event(event(2))
    assert wait_until(lambda: transport.calls == 1)
    started = time.monotonic()
    upstream.close(0.3)
    assert time.monotonic() - started < 1.0
    assert upstream.stats()["dropped_closed"] == 1
    transport.release.set()


def test_queued_events_that_cannot_be_scrubbed_are_dropped_at_close(
    destinations: Any, tmp_path: Path
) -> None:
    transport = HangingTransport()
    upstream = destinations(
        transport=transport,
        spool_dir=tmp_path,
        scrub=lambda e: 1 / 0 if e["event_id"][-1] == "2" else e,
    )
    upstream.send_event(event(1))
    upstream.send_event(event(2))
    upstream.send_event(event(3))
    assert wait_until(lambda: transport.calls == 1)
    upstream.close(0.3)
    transport.release.set()
    stats = upstream.stats()
    assert stats["dropped_error"] == 1
    assert stats["spooled"] >= 1


def test_resetting_after_a_fork(
    destinations: Any, collector: FakeCollector, tmp_path: Path
) -> None:
    upstream = destinations(collector.dsn, spool_dir=tmp_path)
    upstream._count("sent", 3)
    upstream.after_fork_in_child()  # what a forked child runs, before anything started
    assert upstream.stats()["sent"] == 0
    upstream.send_event(event(1))
    assert upstream.flush(5)
    assert collector.wait_for(1)
    assert upstream.stats()["sent"] == 1


class NonsenseTransport:
    """Answers with something that is not a Response."""

    def send(self, body: bytes, timeout: float) -> Response:
        return object()  # type: ignore[return-value]

    def close(self) -> None:
        pass


def test_a_delivery_that_raises_is_counted(destinations: Any) -> None:
    upstream = destinations(transport=NonsenseTransport())
    assert upstream.send_event(event(1))
    assert upstream.flush(5)
    assert upstream.stats()["send_failed"] == 1


def test_a_scrubber_raising_system_exit_drops_and_counts(destinations: Any) -> None:
    def scrub(event: Any) -> Any:
        raise SystemExit("in the scrubber")

    transport = MemoryTransport()
    upstream = destinations(transport=transport, scrub=scrub)
    assert upstream.send_event(event(1))
    assert upstream.flush(5)
    assert transport.events == []
    assert upstream.stats()["dropped_error"] == 1


def test_a_refused_envelope_that_cannot_be_quarantined_is_counted_as_send_failed(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    # Disk full or read-only: the quarantine write fails and the envelope is gone, so it must
    # show in stats() (before, only the spool's own write_failed moved, which stats() omits).
    collector.status = 400
    upstream = destinations(collector.dsn, spool_dir=tmp_path)
    (tmp_path / "quarantine").rmdir()
    (tmp_path / "quarantine").write_text("in the way")  # fails for root too, unlike chmod
    upstream.send_event(event(1))
    assert upstream.flush(5)
    stats = upstream.stats()
    assert (stats["quarantined"], stats["send_failed"]) == (0, 1)


def test_an_envelope_refused_at_once_is_quarantined_when_there_is_a_spool(
    collector: FakeCollector, destinations: Any, tmp_path: Path
) -> None:
    collector.status = 400
    upstream = destinations(collector.dsn, spool_dir=tmp_path)
    upstream.send_event(event(1))
    upstream.send_event(event(2))
    assert upstream.flush(5)
    stats = upstream.stats()
    assert (stats["quarantined"], stats["send_failed"], stats["spool_size"]) == (2, 0, 0)
    kept = sorted((tmp_path / "quarantine").iterdir())
    assert len(kept) == 2
    assert kept[0].stat().st_mode & 0o777 == 0o600
    assert Spool(tmp_path).pending() == []  # kept aside, never replayed
