"""The Celery integration with a real Redis broker, real workers (a thread, and a process for the
cross-process loop) and a real HTTP collector."""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Ignore, Reject
from tests.conftest import FAST_OPTIONS, wait_until

import selfreport
import selfreport.testing
from selfreport.integrations import celery as selfreport_celery
from selfreport.testing import FakeCollector

# kombu 5.5.2 (with celery 5.5.0, the floor) calls what redis-py 5.3+ deprecates, on the worker
# thread, where -W error would stop the worker.
pytestmark = pytest.mark.filterwarnings("ignore:Call to 'get_connection':DeprecationWarning")

HERE = Path(__file__).parent
REDIS_MISSING = (
    "redis-server is not installed (Debian: apt-get install redis-server; "
    "`make services` installs it when run as root)"
)


# --- a real Redis, started for this module ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server of its own on a free port of 127.0.0.1, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(REDIS_MISSING)
    directory = tmp_path_factory.mktemp("redis")
    for _ in range(5):  # the free port may be taken again before redis binds it
        port = _free_port()
        log = (directory / f"redis-{port}.log").open("wb")
        options = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
        server = subprocess.Popen(
            [binary, *options, "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: server.poll() is not None or _answers(port), timeout=30)  # noqa: B023
        if server.poll() is None and _answers(port):
            break
        server.wait(10)
        log.close()
    else:  # pragma: no cover - five ports taken in a row
        pytest.fail(f"redis-server did not start: {(directory / f'redis-{port}.log').read_text()}")
    try:
        yield port
    finally:
        server.terminate()
        server.wait(10)
        log.close()


@pytest.fixture
def broker(redis_port: int) -> str:
    """The broker URL, on an empty Redis."""
    redis.Redis(port=redis_port).flushall()
    return f"redis://127.0.0.1:{redis_port}/0"


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


# --- an in-process worker (a thread running the solo pool) -------------------------------------


class Runs:
    """Task runs finished on the worker (task_postrun), for waiting without sleeps."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, task_id: Any = None, **_: Any) -> None:
        with self._lock:
            self.ids.append(task_id)

    def wait(self, count: int) -> None:
        assert wait_until(lambda: len(self.ids) >= count, timeout=60), self.ids


@pytest.fixture
def runs() -> Iterator[Runs]:
    counter = Runs()
    signals.task_postrun.connect(counter, weak=False, dispatch_uid="test-runs")
    yield counter
    signals.task_postrun.disconnect(dispatch_uid="test-runs")


@pytest.fixture
def app(broker: str) -> Celery:
    # No result backend: the worker is a thread of this process, tasks hand results over in
    # lists (and Celery's Redis backend calls what redis-py 6+ deprecates, an error here).
    app = Celery("selfreport_tests", broker=broker, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


@pytest.fixture
def installed() -> Iterator[None]:
    selfreport_celery.install()
    yield
    selfreport_celery.uninstall()


@contextlib.contextmanager
def worker(app: Celery) -> Iterator[Any]:
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30) as w:
        yield w


def init(collector: FakeCollector, **options: Any) -> selfreport.Client:
    return selfreport.init(collector.dsn, **{**FAST_OPTIONS, **options})


def settled(collector: FakeCollector, count: int) -> list[dict[str, Any]]:
    """The events, once every captured one was delivered and ``count`` arrived."""
    assert selfreport.flush(10.0)
    assert collector.wait_for(count, timeout=10)
    return collector.events


class Unpicklable(Exception):
    """Pickling keeps only ``args`` (one string), so unpickling calls __init__ with one."""

    def __init__(self, user: str, detail: str) -> None:
        super().__init__(f"{user}: {detail}")


# --- what a failure is reported with ------------------------------------------------------------


@pytest.mark.slow
def test_a_failed_task_is_reported_once_with_the_job_as_sentry_sdk_shapes_it(
    app: Celery, collector: FakeCollector, installed: None, runs: Runs
) -> None:
    @app.task(name="tests.charge")
    def charge(amount: int, card: str, password: str, user: dict[str, Any]) -> None:
        raise ValueError(f"could not charge {amount}")

    init(collector)
    with worker(app) as w:
        result = charge.delay(12, "visa", password="hunter2", user={"name": "ann", "token": "t"})
        runs.wait(1)

    [event] = settled(collector, 1)
    assert event["exception"]["values"][-1]["type"] == "ValueError"
    assert event["exception"]["values"][-1]["mechanism"] == {"type": "celery", "handled": False}
    assert event["tags"] == {"celery_task_id": result.id, "celery_task_name": "tests.charge"}
    job = event["extra"]["celery-job"]
    # Celery's request.hostname: the node name ("celery@host") in a `celery worker`, which
    # precomputes it, the machine's name in this embedded worker.
    assert job.pop("hostname") in {w.hostname, socket.gethostname()}
    assert job == {
        "task_name": "tests.charge",
        "task_id": result.id,
        "args": [12, "visa"],
        "kwargs": {"password": "[Filtered]", "user": {"name": "ann", "token": "[Filtered]"}},
        "retries": 0,
    }
    stats = selfreport.stats()
    # Celery logs the failure to the root logger (whose handlers its worker replaced at start:
    # the integration put selfreport's back), with the same exception: counted, not sent.
    assert stats["captured"] == 1
    assert stats["dropped_duplicate"] == 1


@pytest.mark.slow
def test_every_task_runs_in_a_scope_of_its_own(
    app: Celery, collector: FakeCollector, installed: None, runs: Runs
) -> None:
    @app.task(name="tests.tagged")
    def tagged(customer: str) -> None:
        selfreport.set_tag("customer", customer)
        selfreport.add_breadcrumb(f"charging {customer}")
        raise ValueError(customer)

    @app.task(name="tests.plain")
    def plain() -> None:
        raise KeyError("no tags of its own")

    init(collector)
    with worker(app):  # one thread: both tasks run on it, one after the other
        tagged.delay("ann")
        runs.wait(1)
        plain.delay()
        runs.wait(2)
    first, second = settled(collector, 2)
    assert first["tags"]["customer"] == "ann"
    assert [crumb["message"] for crumb in first["breadcrumbs"]["values"]] == ["charging ann"]
    assert "customer" not in second["tags"]
    assert "charging ann" not in json.dumps(second.get("breadcrumbs", {}))


@pytest.mark.slow
def test_an_exception_celery_cannot_pickle_is_reported_as_raised_and_once(
    app: Celery, collector: FakeCollector, installed: None, runs: Runs
) -> None:
    @app.task(name="tests.unpicklable")
    def unpicklable() -> None:
        raise Unpicklable("ann", "no such account")

    init(collector)
    with worker(app):
        unpicklable.delay()
        runs.wait(1)

    [event] = settled(collector, 1)
    value = event["exception"]["values"][-1]
    assert (value["type"], value["value"]) == ("Unpicklable", "ann: no such account")
    assert value["stacktrace"]["frames"][-1]["function"].split(".")[-1] == "unpicklable"
    # Celery logs its stand-in next: marked as the exception just reported.
    assert selfreport.stats()["dropped_duplicate"] == 1


def test_send_args_false_sends_neither_args_nor_kwargs(app: Celery) -> None:
    @app.task(name="tests.secret")
    def secret(a: str, b: str = "") -> None:
        raise KeyError(a)

    selfreport_celery.install(send_args=False)
    try:
        with selfreport.testing.capture_events() as events:
            secret.apply(("s3cr3t",), {"b": "x"})
    finally:
        selfreport_celery.uninstall()
    [event] = events.flush()
    job = event["extra"]["celery-job"]
    assert (job["args"], job["kwargs"]) == ("[Filtered]", "[Filtered]")
    assert "s3cr3t" not in str(job)


def test_the_clients_scrubber_scrubs_positional_args(app: Celery, installed: None) -> None:
    @app.task(name="tests.connect")
    def connect(url: str) -> None:
        raise ConnectionError("refused")

    with selfreport.testing.capture_events(scrub=True) as events:
        connect.apply(("postgres://app:pa55word@db/prod",))
    [event] = events.flush()
    assert "pa55word" not in str(event["extra"]["celery-job"]["args"])


def test_args_that_cannot_be_described_still_report_the_failure(
    app: Celery, installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    class Unreadable(Mapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            return iter(())

        def __len__(self) -> int:
            return 0

        def items(self) -> Any:
            raise RuntimeError("unreadable")

    @app.task(name="tests.odd")
    def odd(**kwargs: Any) -> None:
        raise ValueError("odd")

    with selfreport.testing.capture_events() as events:
        odd.apply((), {"data": Unreadable()})
    [event] = events.flush()
    assert event["exception"]["values"][-1]["type"] == "ValueError"
    assert "celery-job" not in event.get("extra", {})
    assert "could not describe a failed task" in caplog.text


@pytest.mark.slow
def test_retries_ignore_reject_and_expected_errors_are_not_reported(
    app: Celery, collector: FakeCollector, installed: None, runs: Runs
) -> None:
    attempts: list[int] = []

    @app.task(name="tests.flaky", bind=True, max_retries=1)
    def flaky(self: Any) -> None:
        attempts.append(self.request.retries)
        if self.request.retries == 0:
            raise self.retry(countdown=0)

    @app.task(name="tests.ignored")
    def ignored() -> None:
        raise Ignore()

    @app.task(name="tests.rejected")
    def rejected() -> None:
        raise Reject("not now", requeue=False)

    @app.task(name="tests.expected", throws=(LookupError,))
    def expected() -> None:
        raise KeyError("an expected error")

    init(collector)
    with worker(app):
        for task in (flaky, ignored, rejected, expected):
            task.delay()
        runs.wait(5)

    assert attempts == [0, 1]
    assert selfreport.flush(10.0)
    assert selfreport.stats()["captured"] == 0
    assert collector.events == []


@pytest.mark.slow
def test_autoretry_reports_only_the_last_attempt_as_sentry_sdk_does(
    app: Celery, collector: FakeCollector, installed: None, runs: Runs
) -> None:
    @app.task(
        name="tests.autoretry",
        autoretry_for=(ConnectionError,),
        max_retries=2,
        retry_backoff=False,
        retry_kwargs={"countdown": 0},
    )
    def unreachable() -> None:
        raise ConnectionError("still down")

    init(collector)
    with worker(app):
        unreachable.delay()
        runs.wait(3)

    [event] = settled(collector, 1)
    assert event["exception"]["values"][-1]["type"] == "ConnectionError"
    assert event["extra"]["celery-job"]["retries"] == 2
    assert selfreport.stats()["captured"] == 1


# --- the reporting-path mark through the broker -------------------------------------------------


@pytest.mark.slow
def test_the_mark_travels_in_the_headers_and_on_through_what_a_marked_task_publishes(
    app: Celery, collector: FakeCollector, installed: None, runs: Runs
) -> None:
    seen: dict[str, list[Any]] = {}

    @app.task(name="tests.probe", bind=True)
    def probe(self: Any, label: str) -> None:
        mark = getattr(self.request, selfreport_celery.MARK_HEADER, None)
        seen[label] = [selfreport.is_reporting(), mark]

    @app.task(name="tests.relay")
    def relay() -> None:
        probe.delay("carried on")

    client = init(collector)
    with worker(app):
        probe.delay("outside")
        runs.wait(1)
        with selfreport.reporting_path():
            probe.delay("inside")
            relay.delay()
        runs.wait(4)
        probe.delay("after")  # the worker's thread left the path with the marked tasks
        runs.wait(5)
    assert seen == {
        "outside": [False, None],
        "inside": [True, "1:public"],
        "carried on": [True, "1:public"],
        "after": [False, None],
    }
    assert client.stats()["captured"] == 0


@contextlib.contextmanager
def published_headers() -> Iterator[list[dict[str, Any]]]:
    """The headers of every task published in the block, as the broker gets them."""
    seen: list[dict[str, Any]] = []

    def keep(headers: Any = None, **_: Any) -> None:
        seen.append(dict(headers))

    signals.before_task_publish.connect(keep, weak=False, dispatch_uid="test-published")
    try:
        yield seen
    finally:
        signals.before_task_publish.disconnect(dispatch_uid="test-published")


def test_without_a_client_the_mark_is_a_plain_flag(app: Celery, installed: None) -> None:
    with published_headers() as seen, selfreport.reporting_path():
        app.send_task("tests.nothing")
    assert seen[0][selfreport_celery.MARK_HEADER] == "1"


@pytest.mark.slow
def test_a_marked_task_that_fails_is_dropped_and_counted_and_the_next_is_reported(
    app: Celery, collector: FakeCollector, installed: None, runs: Runs
) -> None:
    @app.task(name="tests.alert")
    def alert(n: int) -> None:
        raise RuntimeError(f"alert {n} failed")

    init(collector)
    with worker(app):
        with selfreport.reporting_path():
            alert.delay(1)
        runs.wait(1)
        alert.delay(2)
        runs.wait(2)

    [event] = settled(collector, 1)
    assert event["exception"]["values"][-1]["value"] == "alert 2 failed"
    stats = selfreport.stats()
    # The marked failure: its task_failure report and Celery's log record of it.
    assert stats["dropped_reentrant"] == 2
    assert stats["captured"] == 1


def test_a_mark_in_the_request_headers_counts_too(app: Celery, installed: None) -> None:
    @app.task(name="tests.eager_probe", bind=True)
    def eager_probe(self: Any) -> bool:
        return selfreport.is_reporting()

    # An eager run keeps custom headers apart, in request.headers only.
    marked = eager_probe.apply(headers={selfreport_celery.MARK_HEADER: "1:public"})
    assert marked.get() is True
    assert eager_probe.apply().get() is False


# --- the cross-process loop: a real worker process ---------------------------------------------


@contextlib.contextmanager
def worker_process(broker: str, dsn: str, log: Path, mark: bool) -> Iterator[None]:
    env = {
        **os.environ,
        "SELFREPORT_DSN": dsn,
        "SELFREPORT_TEST_BROKER": broker,
        "SELFREPORT_TEST_MARK": "1" if mark else "0",
    }
    command = [sys.executable, "-m", "celery", "-A", "celery_loop_app", "worker", "--pool", "solo"]
    command += ["--loglevel", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover - a stuck worker
                process.kill()
                process.wait(10)


def _counter(store: Any, key: str) -> int:
    return int(store.get(key) or 0)


@pytest.mark.slow
def test_a_before_send_that_enqueues_a_failing_task_gives_one_event_across_processes(
    broker: str, collector: FakeCollector, tmp_path: Path
) -> None:
    store = redis.Redis.from_url(broker)
    publisher = Celery("publisher", broker=broker, set_as_current=False)
    with worker_process(broker, collector.dsn, tmp_path / "worker.log", mark=True):
        publisher.send_task("celery_loop_app.original")
        assert collector.wait_for(1, timeout=60), (tmp_path / "worker.log").read_text()
        # The alert task before_send enqueued has run, and failed, on the worker...
        assert wait_until(lambda: _counter(store, "alerts_run") == 1, timeout=60)
        # ... and once the worker delivered all it captured (so every before_send ran):
        publisher.send_task("celery_loop_app.settle")
        assert wait_until(lambda: store.hget("stats", "captured") is not None, timeout=60)
        stats = {k.decode(): int(v) for k, v in store.hgetall("stats").items()}
    assert len(collector.events) == 1
    assert collector.events[0]["exception"]["values"][-1]["value"] == "the original error"
    assert collector.events[0]["extra"]["celery-job"]["hostname"].startswith("celery@")
    assert stats["captured"] == 1
    assert stats["dropped_reentrant"] >= 1  # the alert's failure, born in the path
    assert _counter(store, "alerts_enqueued") == 1
    assert _counter(store, "alerts_run") == 1
    assert store.llen("celery") == 0


@pytest.mark.slow
def test_without_the_mark_the_same_before_send_loops_through_the_broker(
    broker: str, collector: FakeCollector, tmp_path: Path
) -> None:
    store = redis.Redis.from_url(broker)
    publisher = Celery("publisher", broker=broker, set_as_current=False)
    with worker_process(broker, collector.dsn, tmp_path / "worker.log", mark=False):
        publisher.send_task("celery_loop_app.original")
        # The app's alert task stops failing at its 6th run: the loop ends there.
        assert wait_until(lambda: _counter(store, "alerts_run") >= 6, timeout=120)
        assert collector.wait_for(6, timeout=60)
    values = [event["exception"]["values"][-1]["value"] for event in collector.events]
    assert values[0] == "the original error"
    assert len([v for v in values if v.startswith("alerting about")]) == 5


# --- the rest -----------------------------------------------------------------------------------


def test_a_worker_process_shutting_down_delivers_what_it_queued(
    collector: FakeCollector, installed: None
) -> None:
    init(collector)
    selfreport.capture_exception(ValueError("queued in a prefork child"))
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    assert selfreport.stats()["sent"] == 1  # no flush() here: the signal did it


def test_without_a_client_the_integration_reports_nothing_and_breaks_nothing(
    app: Celery, installed: None
) -> None:
    @app.task(name="tests.unreported")
    def unreported() -> None:
        raise ValueError("no client")

    assert unreported.apply().failed()
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    root = logging.getLogger()
    handlers = list(root.handlers)
    signals.after_setup_logger.send(sender=None, logger=root, loglevel=logging.WARNING)
    assert root.handlers == handlers


def test_uninstall_disconnects_everything(app: Celery) -> None:
    @app.task(name="tests.after_uninstall")
    def after_uninstall() -> None:
        raise ValueError("not reported by the integration")

    selfreport_celery.install()
    selfreport_celery.uninstall()
    with selfreport.testing.capture_events(logging_level=None) as events:
        after_uninstall.apply()
        with published_headers() as seen, selfreport.reporting_path():
            app.send_task("tests.nothing")
    assert events.flush() == []
    assert selfreport_celery.MARK_HEADER not in seen[0]


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "selfreport.integrations.celery")
    monkeypatch.setitem(sys.modules, "celery", None)
    with pytest.raises(ImportError, match=r"pip install 'selfreport\[celery\]'"):
        importlib.import_module("selfreport.integrations.celery")


@pytest.mark.parametrize(
    "path",
    [
        "src/selfreport/integrations/celery.py",
        "src/selfreport/_capture/event.py",
        "src/selfreport/_client.py",
        "src/selfreport/__init__.py",
        "tests/integrations/test_celery.py",
        "tests/integrations/celery_loop_app.py",
    ],
)
def test_python_3_9_syntax(path: str) -> None:
    source = (HERE.parent.parent / path).read_text()
    ast.parse(source, filename=path, feature_version=(3, 9))
