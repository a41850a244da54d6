"""One Upstream: every answer read for limits (replays and 2xx too), spool counters, close, fork."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from tests.conftest import wait_until

from selfreport import Client, ConfigError, Destination
from selfreport._core.counters import Counters
from selfreport._core.diag import Diagnostics
from selfreport._core.dsn import parse_dsn
from selfreport._delivery.retry import Retry
from selfreport._delivery.transport import HttpTransport, Response, Transport, as_transport
from selfreport._delivery.upstream import SpoolOptions, Upstream
from selfreport._delivery.worker import Worker
from selfreport._onprem.destination import DESTINATION_STAT_KEYS
from selfreport.testing import FakeCollector

BODY = b'{"event_id":"0123456789abcdef0123456789abcdef"}\n{"type":"event"}\n{}\n'


class Owner:
    """What a Client or Destination gives its upstream: counters, diagnostics, a closed flag."""

    def __init__(self) -> None:
        self.counters = Counters(DESTINATION_STAT_KEYS)
        self.closed = threading.Event()
        self.upstreams: list[Upstream] = []

    def count(self, key: str, amount: int = 1) -> None:
        self.counters.add(key, amount)

    def upstream(self, collector: FakeCollector, **options: Any) -> Upstream:
        upstream = Upstream.connect(
            parse_dsn(collector.dsn),
            count=self.count,
            diagnostics=Diagnostics(),
            closed=self.closed,
            http_timeout=5.0,
            retry=options.pop("retry", Retry(total=0)),
            **options,
        )
        self.upstreams.append(upstream)
        return upstream


@pytest.fixture
def owner() -> Iterator[Owner]:
    made = Owner()
    yield made
    made.closed.set()
    for upstream in made.upstreams:
        upstream.close(Worker(lambda item: None, 1), 1.0, lambda left: None)


def spool(tmp_path: Path) -> SpoolOptions:
    return SpoolOptions(tmp_path, replay=Retry.for_replay(0.01, 0.05))


def test_a_2xx_announcing_a_rate_limit_holds_back_what_follows(
    collector: FakeCollector, owner: Owner
) -> None:
    collector.response_headers = {"X-Sentry-Rate-Limits": "60:error:organization:quota"}
    upstream = owner.upstream(collector)
    upstream.deliver(BODY)
    assert owner.counters.snapshot()["sent"] == 1
    assert upstream.holding_back()
    assert upstream.limits.seconds_left("error") > 50


def test_a_503_retry_after_is_waited_for_before_the_retry(
    collector: FakeCollector, owner: Owner
) -> None:
    collector.status = 503
    collector.response_headers = {"Retry-After": "1"}
    upstream = owner.upstream(collector, retry=Retry(total=1, backoff_factor=0.0))
    started = time.monotonic()
    upstream.deliver(BODY)
    assert time.monotonic() - started >= 0.9  # not the zero backoff: what the upstream asked
    stats = owner.counters.snapshot()
    assert (stats["retried"], stats["send_failed"], len(collector.requests)) == (1, 1, 2)


def test_a_replayed_429_holds_the_replay_and_live_sends_back(
    collector: FakeCollector, owner: Owner, tmp_path: Path
) -> None:
    collector.status = 503
    upstream = owner.upstream(collector, spool=spool(tmp_path))
    upstream.deliver(BODY)
    assert upstream.spool_size() == 1
    collector.status = 429
    collector.response_headers = {"Retry-After": "120"}
    assert wait_until(lambda: upstream.limits.seconds_left("error") > 100)
    replayed = len(collector.requests)
    upstream.deliver(BODY)  # spooled at once: the upstream said to wait
    assert len(collector.requests) == replayed
    assert upstream.spool_size() == 2
    assert owner.counters.snapshot()["spooled"] == 2


def test_a_refused_replay_is_quarantined_and_counted_by_a_client(
    collector: FakeCollector, make_client: Callable[..., Client], tmp_path: Path
) -> None:
    collector.status = 503
    client = make_client(collector.dsn, spool_dir=tmp_path)
    client.capture_message("refused later")
    assert client.flush(5)
    assert wait_until(lambda: client.stats()["spooled"] == 1)
    collector.status = 400
    assert wait_until(lambda: client.stats()["quarantined"] == 1)
    assert client.upstream is not None
    assert client.upstream.spool_size() == 0


def test_a_refused_replay_is_quarantined_and_counted_by_a_destination(
    collector: FakeCollector, tmp_path: Path
) -> None:
    collector.status = 503
    destination = Destination(collector.dsn, spool_dir=tmp_path, replay_backoff=0.01)
    try:
        destination.send_event({"event_id": "0" * 32, "message": "refused later"})
        assert destination.flush(5)
        assert destination.stats()["spooled"] == 1
        collector.status = 400
        assert wait_until(lambda: destination.stats()["quarantined"] == 1)
        assert destination.stats()["spool_size"] == 0
    finally:
        destination.close(1.0)


def test_close_interrupts_a_send_stuck_on_a_silent_upstream(
    collector: FakeCollector, owner: Owner
) -> None:
    collector.blackhole = True
    upstream = owner.upstream(collector)
    worker: Worker[bytes] = Worker(upstream.deliver, 10)
    worker.submit(BODY)
    worker.submit(BODY)
    assert wait_until(lambda: len(collector.requests) == 1 or worker.qsize() == 1)
    left: list[bytes] = []
    owner.closed.set()
    started = time.monotonic()
    assert not upstream.close(worker, 0.5, left.extend)
    assert time.monotonic() - started < 3.0
    assert len(left) == 1  # never taken by the worker: the owner counts or spools it
    assert not worker.alive
    assert owner.counters.snapshot()["send_failed"] == 1  # the one in flight


def test_after_fork_the_connection_is_forgotten_and_the_new_flag_used(
    collector: FakeCollector, owner: Owner
) -> None:
    upstream = owner.upstream(collector)
    upstream.deliver(BODY)
    transport = upstream.transport
    assert isinstance(transport, HttpTransport)
    assert transport._conn is not None
    connection = transport._conn
    fresh = threading.Event()
    upstream.after_fork_in_child(fresh)
    assert transport._conn is None
    assert upstream.closed is fresh
    connection.close()


# --- transports --------------------------------------------------------------------------------


class SendOnly:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def send(self, body: bytes, timeout: float) -> Response:
        self.bodies.append(body)
        return Response(200)


class OldStyle(SendOnly):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def close(self) -> None:
        self.calls.append("close")

    def interrupt(self) -> None:
        self.calls.append("interrupt")

    def forget_after_fork(self) -> None:
        self.calls.append("forget_after_fork")


def test_a_send_only_transport_gets_no_op_defaults() -> None:
    custom = SendOnly()
    transport = as_transport(custom)
    assert transport.send(BODY, 1.0).status == 200
    transport.close()
    transport.interrupt()
    transport.reset_after_fork()
    assert custom.bodies == [BODY]
    assert repr(custom) in repr(transport)


def test_a_duck_typed_transports_own_methods_are_used() -> None:
    custom = OldStyle()
    transport = as_transport(custom)
    transport.close()
    transport.interrupt()
    transport.reset_after_fork()
    assert custom.calls == ["close", "interrupt", "forget_after_fork"]


def test_a_transport_subclass_is_used_as_it_is() -> None:
    class Mine(Transport):
        def send(self, body: bytes, timeout: float) -> Response:
            return Response(204)

    mine = Mine()
    assert as_transport(mine) is mine
    mine.close()
    mine.interrupt()
    mine.reset_after_fork()
    with pytest.raises(NotImplementedError):
        Transport().send(BODY, 1.0)


@pytest.mark.parametrize("transport", [object(), type("NoSend", (), {"send": 1})()])
def test_an_object_without_send_is_refused(transport: Optional[object]) -> None:
    with pytest.raises(ConfigError, match="transport"):
        as_transport(transport)
    with pytest.raises(ConfigError, match="transport"):
        Client(transport=transport)
