"""The reporting-path flag: contextvar and thread-local semantics, and propagation to new work."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

from selfreport import guarded, is_reporting, reporting_path
from selfreport._core import guard as _guard
from selfreport._core.guard import (
    ReportingPath,
    enter_thread_for_life,
    install_propagation,
    mark_exception,
    originated_in_reporting_path,
    thread_is_reporting,
    uninstall_propagation,
)

T = TypeVar("T")


@pytest.fixture
def propagation() -> Iterator[None]:
    install_propagation()
    yield
    uninstall_propagation()


def in_thread(func: Any) -> Any:
    """Run ``func`` on a fresh thread and return what it returned."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(func()))
    thread.start()
    thread.join(5)
    return result[0]


def escaping(exc: BaseException) -> BaseException:
    try:
        with reporting_path():
            raise exc
    except BaseException as caught:
        return caught


# --- the flag itself ---------------------------------------------------------------------------


def test_flag_is_set_inside_and_reset_after() -> None:
    assert not is_reporting()
    with reporting_path() as path:
        assert isinstance(path, ReportingPath)
        assert is_reporting()
        with reporting_path():
            assert is_reporting()
        assert is_reporting()  # the inner exit leaves the outer in force
    assert not is_reporting()


def test_flag_is_reset_when_the_body_raises() -> None:
    with pytest.raises(ValueError, match="inner"), reporting_path():
        raise ValueError("inner")
    assert not is_reporting()


def test_thread_local_depth_survives_a_fresh_context() -> None:
    # Code run synchronously in a new Context (C callbacks, Context().run) is still in the path.
    with reporting_path():
        assert contextvars.Context().run(is_reporting)
    assert not contextvars.Context().run(is_reporting)


def test_flag_does_not_leak_into_other_threads_without_propagation() -> None:
    with reporting_path():
        assert in_thread(is_reporting) is False


def test_enter_thread_for_life() -> None:
    def worker() -> tuple[bool, bool]:
        before = is_reporting()
        enter_thread_for_life()
        return before, is_reporting()

    assert in_thread(worker) == (False, True)
    assert not is_reporting()


# --- exceptions escaping the path --------------------------------------------------------------


def test_exceptions_escaping_are_marked() -> None:
    exc = escaping(ValueError("escaped"))
    assert originated_in_reporting_path(exc)
    assert not originated_in_reporting_path(ValueError("elsewhere"))
    assert not originated_in_reporting_path(None)


def test_exceptions_chained_from_a_marked_one_count_as_marked() -> None:
    inner = escaping(OSError("in the path"))
    with pytest.raises(RuntimeError) as explicit:
        raise RuntimeError("outside") from inner
    assert originated_in_reporting_path(explicit.value)

    def handle_it() -> None:
        try:
            raise inner
        except OSError:
            raise KeyError("while handling it")  # noqa: B904

    with pytest.raises(KeyError) as implicit:
        handle_it()
    assert originated_in_reporting_path(implicit.value)


def test_chain_walk_is_bounded() -> None:
    exc: BaseException = escaping(ValueError("deep"))
    for n in range(20):
        outer = ValueError(n)
        outer.__cause__ = exc
        exc = outer
    assert not originated_in_reporting_path(exc)  # 16 links at most: no unbounded walk


def test_mark_exception_directly() -> None:
    exc = KeyError("x")
    mark_exception(exc)
    assert originated_in_reporting_path(exc)


# --- guarded -----------------------------------------------------------------------------------


def test_guarded_sync_function() -> None:
    @guarded
    def work(a: int, b: int = 2) -> tuple[int, bool]:
        """Docstring kept."""
        return a + b, is_reporting()

    assert work(1, b=3) == (4, True)
    assert not is_reporting()
    assert work.__name__ == "work"
    assert work.__doc__ == "Docstring kept."


def test_guarded_marks_what_escapes() -> None:
    @guarded
    def fail() -> None:
        raise ValueError("from a guarded function")

    with pytest.raises(ValueError, match="guarded") as info:
        fail()
    assert originated_in_reporting_path(info.value)
    assert not is_reporting()


def test_guarded_method() -> None:
    class Exporter:
        @guarded
        def export(self) -> bool:
            return is_reporting()

    assert Exporter().export()


@pytest.mark.asyncio
async def test_guarded_async_function() -> None:
    @guarded
    async def work() -> bool:
        await asyncio.sleep(0)
        return is_reporting()

    @guarded
    async def fail() -> None:
        await asyncio.sleep(0)
        raise KeyError("async guarded")

    assert asyncio.iscoroutinefunction(work)
    assert await work()
    assert not is_reporting()
    with pytest.raises(KeyError) as info:
        await fail()
    assert originated_in_reporting_path(info.value)


# --- async semantics -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_with_in_a_coroutine_does_not_leak_to_other_tasks() -> None:
    entered, checked = asyncio.Event(), asyncio.Event()
    seen: dict[str, bool] = {}

    async def in_path() -> None:
        with reporting_path():
            entered.set()
            await checked.wait()  # another task runs on this thread meanwhile
            seen["in_path_after_await"] = is_reporting()
        seen["in_path_after_exit"] = is_reporting()

    async def bystander() -> None:
        await entered.wait()
        seen["bystander"] = is_reporting()
        checked.set()

    await asyncio.gather(in_path(), bystander())
    assert seen == {"in_path_after_await": True, "in_path_after_exit": False, "bystander": False}
    assert not is_reporting()


@pytest.mark.asyncio
async def test_async_with_marks_and_resets() -> None:
    async with reporting_path():
        await asyncio.sleep(0)
        assert is_reporting()
    assert not is_reporting()
    with pytest.raises(ValueError) as info:
        async with reporting_path():
            raise ValueError("async escaped")
    assert originated_in_reporting_path(info.value)


@pytest.mark.asyncio
async def test_tasks_inherit_the_flag_through_their_context() -> None:
    async def check() -> bool:
        return is_reporting()

    with reporting_path():
        inside = asyncio.ensure_future(check())
    outside = asyncio.ensure_future(check())
    assert await inside
    assert not await outside


def run_in_a_new_loop(coro: Coroutine[Any, Any, T]) -> T:
    # Not asyncio.run(): on 3.9 it leaves the policy without a loop for pytest-asyncio.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def test_the_running_loop_fallback_answers_like_the_private_getter() -> None:
    assert _guard._running_loop_or_none() is None

    async def inside() -> bool:
        return _guard._running_loop_or_none() is asyncio.get_running_loop()

    assert run_in_a_new_loop(inside())


@pytest.mark.parametrize("getter", ["private", "fallback"])
def test_the_thread_depth_is_only_used_outside_an_event_loop(
    monkeypatch: pytest.MonkeyPatch, getter: str
) -> None:
    if getter == "fallback":
        monkeypatch.setattr(_guard, "_get_running_loop", _guard._running_loop_or_none)
    else:
        assert _guard._get_running_loop is getattr(asyncio, "_get_running_loop", None)

    def depth() -> int:
        return int(getattr(_guard._local, "depth", 0))

    with reporting_path():
        assert depth() == 1

    async def in_loop() -> int:
        with reporting_path():
            await asyncio.sleep(0)
            return depth()

    assert run_in_a_new_loop(in_loop()) == 0
    assert depth() == 0


# --- propagation into new work ---------------------------------------------------------------


@pytest.mark.usefixtures("propagation")
def test_threads_started_inside_are_in_the_path() -> None:
    results: list[bool] = []
    with reporting_path():
        inside = threading.Thread(target=lambda: results.append(is_reporting()))
        inside.start()
    inside.join(5)
    outside = threading.Thread(target=lambda: results.append(is_reporting()))
    outside.start()
    outside.join(5)
    assert results == [True, False]
    assert thread_is_reporting(inside)
    assert not thread_is_reporting(outside)
    assert not thread_is_reporting(None)


@pytest.mark.usefixtures("propagation")
def test_exceptions_of_such_threads_are_marked() -> None:
    seen: list[BaseException] = []
    saved = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)  # type: ignore[assignment,return-value]
    try:

        def fail() -> None:
            raise ValueError("in a propagated thread")

        with reporting_path():
            thread = threading.Thread(target=fail)
            thread.start()
        thread.join(5)
    finally:
        threading.excepthook = saved
    assert len(seen) == 1
    assert originated_in_reporting_path(seen[0])


@pytest.mark.usefixtures("propagation")
def test_executor_work_submitted_inside_is_in_the_path() -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        with reporting_path():
            inside = pool.submit(is_reporting)
        assert inside.result(5)
        # The pool thread started by that submit is not in the path for life.
        assert pool.submit(is_reporting).result(5) is False


@pytest.mark.usefixtures("propagation")
def test_executor_exceptions_escaping_are_marked() -> None:
    def fail() -> None:
        raise KeyError("in the pool")

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        with reporting_path():
            future = pool.submit(fail)
        exc = future.exception(5)
    assert exc is not None
    assert originated_in_reporting_path(exc)


@pytest.mark.asyncio
@pytest.mark.usefixtures("propagation")
async def test_run_in_executor_inside_is_in_the_path() -> None:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        with reporting_path():
            inside = loop.run_in_executor(pool, is_reporting)
        outside = loop.run_in_executor(pool, is_reporting)
        assert await inside
        assert not await outside


@pytest.mark.asyncio
@pytest.mark.usefixtures("propagation")
async def test_tasks_created_inside_tag_their_exceptions() -> None:
    async def fail() -> None:
        raise ValueError("task failed")

    loop = asyncio.get_running_loop()
    with reporting_path():
        inside = loop.create_task(fail())
    outside = loop.create_task(fail())
    await asyncio.wait([inside, outside])
    assert originated_in_reporting_path(inside.exception())
    assert not originated_in_reporting_path(outside.exception())


@pytest.mark.asyncio
@pytest.mark.usefixtures("propagation")
async def test_task_created_by_keyword_is_in_the_path() -> None:
    async def check() -> bool:
        return is_reporting()

    with reporting_path():
        task = asyncio.get_running_loop().create_task(coro=check())
    assert await task


@pytest.mark.skipif(sys.version_info < (3, 11), reason="create_task(context=) is new in 3.11")
@pytest.mark.asyncio
@pytest.mark.usefixtures("propagation")
async def test_task_with_its_own_context_is_still_in_the_path() -> None:
    async def check() -> bool:
        return is_reporting()

    with reporting_path():
        task = asyncio.get_running_loop().create_task(check(), context=contextvars.Context())
    assert await task


@pytest.mark.usefixtures("propagation")
def test_installs_share_one_patch_layer() -> None:
    start = threading.Thread.__dict__["start"]
    install_propagation()  # a second user: the same patch, not a second layer
    assert threading.Thread.__dict__["start"] is start
    uninstall_propagation()  # the fixture's own install still holds it
    assert threading.Thread.__dict__["start"] is start


def test_thread_started_in_path_keeps_a_bound_run_for_other_patches() -> None:
    # sentry-sdk's threading integration calls run.__func__(thread): keep run a bound method.
    seen: list[bool] = []

    class Worker(threading.Thread):
        def run(self) -> None:
            seen.append(is_reporting())

    install_propagation()
    try:
        thread = Worker()
        with reporting_path():
            thread.start()
        thread.join()
        assert seen == [True]
        run = thread.run
        assert run.__self__ is thread  # type: ignore[attr-defined]
        seen.clear()
        run.__func__(thread)  # type: ignore[attr-defined]
        assert seen == [True]
    finally:
        uninstall_propagation()


def test_propagation_is_shared_by_counted_installs() -> None:
    original = threading.Thread.__dict__["start"]
    install_propagation()
    install_propagation()
    uninstall_propagation()
    assert threading.Thread.__dict__["start"] is not original  # one user left
    uninstall_propagation()
    assert threading.Thread.__dict__["start"] is original
    uninstall_propagation()  # an extra uninstall is harmless
    assert threading.Thread.__dict__["start"] is original


@pytest.mark.usefixtures("propagation")
def test_pool_thread_started_in_the_path_runs_later_jobs_in_their_own_context() -> None:
    # Like anyio's worker threads: started once (here, inside the path), then running each job
    # in the context copied from whoever submitted it.
    jobs: queue.Queue[Any] = queue.Queue()
    results: list[bool] = []

    def pool_thread() -> None:
        results.append(is_reporting())  # the thread's own start-up is in the path
        while (job := jobs.get()) is not None:
            context, func = job
            results.append(context.run(func))

    with reporting_path():
        thread = threading.Thread(target=pool_thread)
        thread.start()
        jobs.put((contextvars.copy_context(), is_reporting))  # submitted inside the path
    jobs.put((contextvars.copy_context(), is_reporting))  # submitted outside it
    jobs.put(None)
    thread.join()
    assert results == [True, True, False]


def test_guarded_refuses_generator_functions() -> None:
    def numbers() -> Iterator[int]:
        yield 1

    async def stream() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        guarded(numbers)
    with pytest.raises(TypeError, match="generator function"):
        guarded(stream)


# --- exception groups ------------------------------------------------------------------------

needs_groups = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="ExceptionGroup and TaskGroup are builtins from 3.11"
)


@needs_groups
def test_a_group_of_the_paths_own_errors_originated_in_the_path() -> None:
    own = [escaping(RuntimeError("a")), escaping(KeyError("b"))]
    group = ExceptionGroup("g", own)  # type: ignore[name-defined]  # noqa: F821
    assert originated_in_reporting_path(group)
    nested = ExceptionGroup("outer", [group, escaping(ValueError("c"))])  # type: ignore[name-defined]  # noqa: F821
    assert originated_in_reporting_path(nested)


@needs_groups
def test_a_group_with_one_real_error_did_not() -> None:
    group = ExceptionGroup("g", [escaping(RuntimeError("a")), ValueError("real")])  # type: ignore[name-defined]  # noqa: F821
    assert not originated_in_reporting_path(group)


@needs_groups
def test_a_task_group_outside_the_path_gathering_the_paths_errors_is_dropped(
    make_client: Any,
) -> None:
    from selfreport.testing import MemoryTransport

    sent: list[Any] = []
    client = make_client(transport=MemoryTransport(sent), rate_limit=0, dedupe_window=0)

    async def own_error() -> None:
        async with reporting_path():
            raise RuntimeError("raised in the path")

    async def gathered(*jobs: Any) -> BaseException:
        try:
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                for job in jobs:
                    group.create_task(job())
        except BaseException as exc:  # an ExceptionGroup
            return exc
        raise AssertionError("the group did not raise")

    client.capture_exception(asyncio.run(gathered(own_error, own_error)))

    async def real_error() -> None:
        raise ValueError("the application's")

    client.capture_exception(asyncio.run(gathered(own_error, real_error)))
    assert client.flush(timeout=5.0)
    assert client.stats()["dropped_reentrant"] == 1
    (event,) = sent
    types = [value["type"] for value in event["exception"]["values"]]
    assert types == ["ValueError", "ExceptionGroup"]  # the path's member is left out


# --- the mark travels with what the path hands to someone else -------------------------------
# Each test: the path hands work or a record over; whoever runs it later, elsewhere, reports
# an error; that report is the path's own and must be dropped, and counted.


@pytest.fixture
def reported() -> Iterator[Any]:
    from selfreport.testing import capture_events

    install_propagation()
    try:
        with capture_events() as events:
            yield events
    finally:
        uninstall_propagation()


def _dropped(events: Any) -> int:
    events.flush()
    return int(events.client.stats()["dropped_reentrant"])


def test_a_record_logged_in_the_path_and_handled_on_a_listener_thread(reported: Any) -> None:
    import logging.handlers
    import queue as queue_module

    records: queue_module.Queue[logging.LogRecord] = queue_module.Queue()
    logger = logging.getLogger("tests.handoff.queue")
    logger.propagate = False
    logger.addHandler(logging.handlers.QueueHandler(records))
    from selfreport import LoggingHandler

    ours = [h for h in logging.getLogger().handlers if isinstance(h, LoggingHandler)]
    listener = logging.handlers.QueueListener(records, *ours)
    listener.start()
    try:
        with reporting_path():
            logger.error("born in the path")
        logger.error("born outside")
    finally:
        listener.stop()
        logger.handlers.clear()
        logger.propagate = True
    assert reported.messages() == ["born outside"]
    assert _dropped(reported) == 1


def test_a_record_buffered_in_the_path_and_flushed_outside_it(reported: Any) -> None:
    import logging.handlers

    from selfreport import LoggingHandler

    (target,) = [h for h in logging.getLogger().handlers if isinstance(h, LoggingHandler)]
    buffer = logging.handlers.MemoryHandler(capacity=100, flushLevel=logging.CRITICAL + 1)
    buffer.setTarget(target)
    logger = logging.getLogger("tests.handoff.buffer")
    logger.propagate = False
    logger.addHandler(buffer)
    try:
        with reporting_path():
            logger.error("buffered in the path")
        logger.error("buffered outside")
        buffer.flush()
    finally:
        logger.handlers.clear()
        logger.propagate = True
    assert reported.messages() == ["buffered outside"]
    assert _dropped(reported) == 1


def test_a_future_callback_added_in_the_path(reported: Any) -> None:
    release = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(release.wait, 5)  # submitted outside: the job is not the path's

        def callback(done: concurrent.futures.Future[bool]) -> None:
            selfreport_capture(RuntimeError("from a callback the path added"))

        with reporting_path():
            future.add_done_callback(callback)
        release.set()  # the callback runs on the pool's thread, outside any path
    assert reported == []
    assert _dropped(reported) == 1


def selfreport_capture(exc: BaseException) -> None:
    import selfreport

    try:
        raise exc
    except BaseException as raised_here:
        selfreport.capture_exception(raised_here)


def test_asyncio_hand_offs_from_a_path_thread(reported: Any) -> None:
    """call_soon_threadsafe, run_coroutine_threadsafe and Future callbacks carry the context."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)  # started outside the path
    runner.start()
    try:

        async def failing() -> None:
            selfreport_capture(RuntimeError("a coroutine the path scheduled"))

        def from_the_path() -> None:
            loop.call_soon_threadsafe(selfreport_capture, RuntimeError("a callback"))
            asyncio.run_coroutine_threadsafe(failing(), loop).result(5)

        with reporting_path():
            from_the_path()
        in_thread(lambda: _in_path_then(from_the_path))  # a thread in the path by its depth
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
    assert reported == []
    assert _dropped(reported) == 4


def _in_path_then(func: Callable[[], None]) -> None:
    # What an executor job of the path runs in: the thread-local depth with its own context.
    with _guard._thread_in_path():
        contextvars.Context().run(func)


@pytest.mark.asyncio
async def test_an_asyncio_future_callback_added_in_the_path(reported: Any) -> None:
    # (pytest-asyncio's loop, not asyncio.run: on 3.9 asyncio.run would drop the loop that
    # pytest-asyncio 1.2 leaves current after an async test, unclosed.)
    future = asyncio.get_running_loop().create_future()
    async with reporting_path():
        future.add_done_callback(lambda _: selfreport_capture(RuntimeError("callback")))
    future.set_result(None)
    await asyncio.sleep(0)  # one loop turn: the callback is scheduled, then run
    assert reported == []
    assert _dropped(reported) == 1


# Processes: one started inside the path reports nothing (its client drops and counts);
# one started outside reports as usual, which shows the test can fail.


def _child_stats(output: str) -> dict[str, int]:
    return dict(json.loads(output.strip().splitlines()[-1]))


def _run_child(dsn: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_child_report.py")), dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout


def test_a_subprocess_started_in_the_path(propagation: None) -> None:
    from selfreport.testing import FakeCollector

    with FakeCollector() as collector:
        with reporting_path():
            inside = _child_stats(_run_child(collector.dsn))
        outside = _child_stats(_run_child(collector.dsn))
        assert inside["dropped_reentrant"] == 1
        assert outside["sent"] == 1
        assert len(collector.events) == 1


def _spawned(dsn: str, results: Any) -> None:
    from tests.core._child_report import report

    results.put(report(dsn))


def test_a_spawned_process_and_a_process_pool_job_started_in_the_path(propagation: None) -> None:
    import multiprocessing

    from tests.core._child_report import report

    from selfreport.testing import FakeCollector

    spawn = multiprocessing.get_context("spawn")
    with FakeCollector() as collector:
        results = spawn.Queue()
        with reporting_path():
            process = spawn.Process(target=_spawned, args=(collector.dsn, results))
            process.start()
        in_process = _child_stats(results.get(timeout=60))
        process.join(60)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            with reporting_path():
                in_job = _child_stats(pool.submit(report, collector.dsn).result(60))
            outside = _child_stats(pool.submit(report, collector.dsn).result(60))
        assert in_process["dropped_reentrant"] == 1
        assert in_job["dropped_reentrant"] == 1
        assert outside["sent"] == 1  # the pool's process itself was not marked for life
        assert len(collector.events) == 1


def test_record_in_path_is_born_in_the_path_or_logged_inside_it() -> None:
    import logging

    from selfreport._core.guard import RECORD_MARK, record_in_path

    def record(**extra: object) -> logging.LogRecord:
        made = logging.LogRecord("app", logging.ERROR, __file__, 1, "m", None, None)
        made.__dict__.update(extra)
        return made

    assert not record_in_path(record())
    assert record_in_path(record(**{RECORD_MARK: True}))  # born in the path, handled here
    with reporting_path():
        assert record_in_path(record())
