"""Exception hooks: chained to the previous ones, removable, and never reporting control flow."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Optional

import pytest

from selfreport._capture.hooks import Hooks, handle_context
from selfreport._core.guard import reporting_path


class Recorder:
    """Stands in for the client: records what the hooks hand over."""

    def __init__(self) -> None:
        self.captured: list[tuple[BaseException, str, bool]] = []
        self.reentrant: list[str] = []

    def capture(self, exc: BaseException, mechanism: str, context_meaningful: bool) -> None:
        self.captured.append((exc, mechanism, context_meaningful))

    def drop(self, what: str) -> None:
        self.reentrant.append(what)


class PreviousHooks:
    """Hooks installed before ours (standing in for the interpreter's), recording their calls.

    pytest's own thread and unraisable hooks would turn what reaches them into warnings, so
    these replace them for the test and restore them after.
    """

    def __init__(self) -> None:
        self.sys: list[BaseException] = []
        self.threading: list[BaseException] = []
        self.unraisable: list[BaseException] = []

    def sys_hook(
        self, exc_type: type[BaseException], exc: BaseException, tb: Optional[TracebackType]
    ) -> None:
        self.sys.append(exc)

    def threading_hook(self, args: Any) -> None:
        self.threading.append(args.exc_value)

    def unraisable_hook(self, unraisable: Any) -> None:
        self.unraisable.append(unraisable.exc_value)


@pytest.fixture
def previous() -> Iterator[PreviousHooks]:
    saved = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    hooks = PreviousHooks()
    sys.excepthook = hooks.sys_hook
    threading.excepthook = hooks.threading_hook
    sys.unraisablehook = hooks.unraisable_hook
    yield hooks
    sys.excepthook, threading.excepthook, sys.unraisablehook = saved


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def hooks(recorder: Recorder, previous: PreviousHooks) -> Iterator[Hooks]:
    installed = Hooks(recorder.capture, recorder.drop)
    installed.install()
    yield installed
    installed.uninstall()


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def call_excepthook(exc: BaseException) -> None:
    sys.excepthook(type(exc), exc, exc.__traceback__)


def run_thread(target: Any) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join(5)


def boom() -> None:
    raise ValueError("in a thread")


# --- sys.excepthook ----------------------------------------------------------------------------


def test_excepthook_reports_and_chains(
    hooks: Hooks, recorder: Recorder, previous: PreviousHooks
) -> None:
    exc = raised(ValueError("uncaught"))
    call_excepthook(exc)
    assert recorder.captured == [(exc, "excepthook", True)]
    assert previous.sys == [exc]  # the previous hook still runs (prints the traceback)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1), GeneratorExit()])
def test_control_flow_is_not_reported(
    hooks: Hooks, recorder: Recorder, previous: PreviousHooks, exc: BaseException
) -> None:
    call_excepthook(exc)
    assert recorder.captured == []
    assert previous.sys == [exc]


def test_capture_errors_never_stop_the_chain(previous: PreviousHooks) -> None:
    def broken_capture(exc: BaseException, mechanism: str, meaningful: bool) -> None:
        raise RuntimeError("capture broke")

    hooks = Hooks(broken_capture, lambda what: None)
    hooks.install()
    try:
        exc = raised(ValueError("x"))
        call_excepthook(exc)
    finally:
        hooks.uninstall()
    assert previous.sys == [exc]


# --- threading.excepthook ----------------------------------------------------------------------


def test_thread_exception_reported_and_chained(
    hooks: Hooks, recorder: Recorder, previous: PreviousHooks
) -> None:
    run_thread(boom)
    assert len(recorder.captured) == 1
    exc, mechanism, meaningful = recorder.captured[0]
    assert (type(exc), mechanism, meaningful) == (ValueError, "threading", True)
    assert previous.threading == [exc]


def test_thread_started_in_reporting_path_is_dropped(
    hooks: Hooks, recorder: Recorder, previous: PreviousHooks
) -> None:
    with reporting_path():
        thread = threading.Thread(target=boom)
        thread.start()
    thread.join(5)
    assert recorder.captured == []
    assert recorder.reentrant == ["thread exception"]
    assert len(previous.threading) == 1  # still printed by the previous hook


def test_thread_system_exit_is_not_reported(
    hooks: Hooks, recorder: Recorder, previous: PreviousHooks
) -> None:
    def exit_thread() -> None:
        raise SystemExit(3)

    run_thread(exit_thread)  # threading ignores SystemExit before any hook
    assert recorder.captured == []


# --- sys.unraisablehook ------------------------------------------------------------------------


class FailsInDel:
    def __del__(self) -> None:
        raise RuntimeError("in a finalizer")


def test_unraisable_reported_without_trusting_the_context(
    hooks: Hooks, recorder: Recorder, previous: PreviousHooks
) -> None:
    with reporting_path():  # the GC may run a finalizer inside any code, even the path
        obj = FailsInDel()
        del obj
    assert len(recorder.captured) == 1
    exc, mechanism, meaningful = recorder.captured[0]
    assert (type(exc), mechanism, meaningful) == (RuntimeError, "unraisablehook", False)
    assert previous.unraisable == [exc]


# --- asyncio -----------------------------------------------------------------------------------


def test_asyncio_exception_handler_reports_and_still_handles(
    hooks: Hooks, recorder: Recorder
) -> None:
    handled: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda loop, context: handled.append(context))
        exc = raised(ValueError("in a callback"))
        loop.call_exception_handler({"message": "callback failed", "exception": exc})
        loop.call_exception_handler({"message": "no exception here"})
    finally:
        loop.close()
    assert recorder.captured == [(exc, "asyncio", True)]
    assert [c["message"] for c in handled] == ["callback failed", "no exception here"]


def test_never_retrieved_task_exception_is_reported(hooks: Hooks, recorder: Recorder) -> None:
    handled: list[dict[str, Any]] = []

    async def fail() -> None:
        raise KeyError("task")

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.done()

    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda loop, context: handled.append(context))
        loop.run_until_complete(main())
        gc.collect()  # the task's finalizer reports the never-retrieved exception
    finally:
        loop.close()
    assert len(recorder.captured) == 1
    exc, mechanism, meaningful = recorder.captured[0]
    assert (type(exc), mechanism, meaningful) == (KeyError, "asyncio", False)
    assert handled[0]["exception"] is exc


def test_a_callback_scheduled_in_the_path_is_dropped_not_reported(
    hooks: Hooks, recorder: Recorder
) -> None:
    handled: list[dict[str, Any]] = []

    def fail() -> None:
        raise ValueError("scheduled from the path")

    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda loop, context: handled.append(context))
        with reporting_path():
            loop.call_soon(fail)
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert recorder.captured == []
    assert recorder.reentrant == ["asyncio callback exception"]
    assert [type(c["exception"]) for c in handled] == [ValueError]


class PrivateContextHandle:
    """An asyncio handle before Python 3.12: the context only in a private attribute."""

    def __init__(self, context: object) -> None:
        self._context = context


class PublicContextHandle:
    """An asyncio handle from Python 3.12 on: ``get_context()``."""

    def __init__(self, context: object) -> None:
        self._ctx = context

    def get_context(self) -> object:
        return self._ctx


class BrokenContextHandle:
    def get_context(self) -> object:
        raise RuntimeError("a foreign event loop's handle")


def test_handle_context_uses_the_public_accessor_and_falls_back() -> None:
    context = contextvars.copy_context()
    assert handle_context(PrivateContextHandle(context)) is context
    assert handle_context(PublicContextHandle(context)) is context
    assert handle_context(BrokenContextHandle()) is None
    assert handle_context(object()) is None
    assert handle_context(None) is None

    loop = asyncio.new_event_loop()
    try:
        real = loop.call_soon(print, context=context)
        real.cancel()
    finally:
        loop.close()
    assert handle_context(real) is context  # whichever of the two this Python has


def test_asyncio_control_flow_is_not_reported(hooks: Hooks, recorder: Recorder) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda loop, context: None)
        loop.call_exception_handler({"message": "m", "exception": KeyboardInterrupt()})
        loop.call_exception_handler(context={"message": "m", "exception": "not an exception"})
    finally:
        loop.close()
    assert recorder.captured == []


# --- install / uninstall -----------------------------------------------------------------------


def test_install_is_idempotent_and_uninstall_restores(
    recorder: Recorder, previous: PreviousHooks
) -> None:
    hooks = Hooks(recorder.capture, recorder.drop)
    hooks.install()
    hooks.install()
    assert hooks.active
    assert sys.excepthook == hooks._sys_hook
    exc = raised(ValueError("once"))
    call_excepthook(exc)
    assert len(recorder.captured) == 1  # not chained to itself
    assert previous.sys == [exc]
    hooks.uninstall()
    hooks.uninstall()
    assert not hooks.active
    assert sys.excepthook == previous.sys_hook
    assert threading.excepthook == previous.threading_hook
    assert sys.unraisablehook == previous.unraisable_hook
    call_excepthook(exc)
    assert len(recorder.captured) == 1


def test_without_previous_hooks_ours_chain_to_the_defaults(
    recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    sys.excepthook = threading.excepthook = sys.unraisablehook = None  # type: ignore[assignment]
    hooks = Hooks(recorder.capture, recorder.drop)
    try:
        hooks.install()
        exc = raised(ValueError("to the default"))
        call_excepthook(exc)
        assert recorder.captured == [(exc, "excepthook", True)]
        assert "ValueError: to the default" in capsys.readouterr().err  # sys.__excepthook__
        hooks.uninstall()
        assert sys.excepthook is None  # what was there before, put back
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook = saved


def test_a_hook_installed_on_top_of_ours_survives_our_uninstall(
    recorder: Recorder, previous: PreviousHooks
) -> None:
    hooks = Hooks(recorder.capture, recorder.drop)
    hooks.install()
    theirs_seen: list[BaseException] = []
    ours = sys.excepthook

    def theirs(exc_type: Any, exc: BaseException, tb: Any) -> None:
        theirs_seen.append(exc)
        ours(exc_type, exc, tb)

    sys.excepthook = theirs
    hooks.uninstall()
    assert sys.excepthook is theirs  # never cut off a library chained on top of us
    first = raised(ValueError("after our uninstall"))
    call_excepthook(first)
    assert theirs_seen == [first]
    assert previous.sys == [first]  # ours passes through to the original
    assert recorder.captured == []  # ... without reporting

    # Installing again must not chain ours to theirs (which calls ours: endless recursion).
    hooks.install()
    second = raised(ValueError("after re-install"))
    call_excepthook(second)
    assert recorder.captured == [(second, "excepthook", True)]
    assert previous.sys == [first, second]
    hooks.uninstall()
    sys.excepthook = previous.sys_hook


def test_reinstall_after_the_other_hook_removed_itself_and_ours(
    recorder: Recorder, previous: PreviousHooks
) -> None:
    hooks = Hooks(recorder.capture, recorder.drop)
    hooks.install()
    sys.excepthook = lambda *args: None  # someone replaces ours outright
    hooks.uninstall()
    sys.excepthook = previous.sys_hook  # ... and later restores the original
    hooks.install()
    assert sys.excepthook == hooks._sys_hook
    exc = raised(ValueError("x"))
    call_excepthook(exc)
    assert recorder.captured == [(exc, "excepthook", True)]
    assert previous.sys == [exc]
    hooks.uninstall()
    assert sys.excepthook == previous.sys_hook
