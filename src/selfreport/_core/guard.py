"""The reporting-path flag: a contextvars flag plus a thread-local depth, propagated to new work."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import os
import subprocess
import sys
import threading
import types
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, cast

import wrapt  # its stubs cover Python 3.10+ only: mypy --python-version 3.9 sees no names

from .excgroups import BUILTIN_GROUP, group_members
from .patching import Patches, Replace

__all__ = [
    "RECORD_MARK",
    "ReportingPath",
    "SyncAndAsync",
    "context_is_reporting",
    "enter_thread_for_life",
    "guarded",
    "in_nested_log_record",
    "install_propagation",
    "is_reporting",
    "mark_exception",
    "on_own_thread",
    "originated_in_reporting_path",
    "process_born_in_path",
    "record_born_in_path",
    "record_in_path",
    "reporting_path",
    "thread_is_reporting",
    "uninstall_propagation",
]

F = TypeVar("F", bound=Callable[..., Any])

# The contextvar follows asyncio tasks, callbacks and copy_context().run(); the thread-local
# depth survives code that runs synchronously in a fresh Context (C callbacks, Context().run).
_in_path: contextvars.ContextVar[bool] = contextvars.ContextVar("selfreport_in_path", default=False)


_local = threading.local()

# Attribute set on exceptions that escaped the reporting path and on threads started inside it,
# so a hook that runs later, outside the path, still recognises them.
_MARK = "__selfreport_reporting_path__"
# On log records (``record.__dict__``): survives copies, pickling and QueueHandler.prepare.
RECORD_MARK = "selfreport_reporting_path"
# In the environment of processes started inside the path: what they report is the path's.
ENVIRON_MARK = "SELFREPORT_REPORTING_PATH"


def _running_loop_or_none() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# The private getter answers "no loop" without raising, which matters on a path taken for every
# report; the public one is the fallback should an interpreter not have it.
_get_running_loop: Callable[[], Optional[asyncio.AbstractEventLoop]] = getattr(
    asyncio, "_get_running_loop", _running_loop_or_none
)


def is_reporting() -> bool:
    """Whether the calling code runs inside selfreport's reporting path."""
    return _in_path.get() or getattr(_local, "depth", 0) > 0


def context_is_reporting(context: object) -> bool:
    """Whether ``context`` (a ``contextvars.Context``, say an asyncio handle's) is in the path."""
    return isinstance(context, contextvars.Context) and bool(context.get(_in_path, False))


def mark_exception(exc: BaseException) -> None:
    """Tag ``exc`` as raised inside the reporting path; later captures of it are dropped."""
    try:
        setattr(exc, _MARK, True)
    except Exception:  # pragma: no cover - exceptions with __slots__ and no __dict__ are exotic
        pass


def originated_in_reporting_path(exc: Optional[BaseException]) -> bool:
    """Whether ``exc`` (or any exception it was chained from) escaped the reporting path.

    An exception group did when it was marked itself or when every member did: a TaskGroup
    outside the path gathers what tasks started in the path raised (each of them marked).
    """
    seen = 0
    while exc is not None and seen < 16:  # the usual case: a short chain, no group in it
        if getattr(exc, _MARK, False):
            return True
        if BUILTIN_GROUP is None or isinstance(exc, BUILTIN_GROUP):
            members = group_members(exc)
            if members and _group_from_path(members, [64]):
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _group_from_path(members: tuple[BaseException, ...], budget: list[int]) -> bool:
    """Whether every member (or what it was chained from) escaped the path, looking at no
    more than ``budget`` exceptions in all: a stranger's group may be huge or deep."""
    return all(_from_path(member, budget) for member in members)


def _from_path(exc: Optional[BaseException], budget: list[int]) -> bool:
    seen = 0
    while exc is not None and seen < 16 and budget[0] > 0:
        budget[0] -= 1
        if getattr(exc, _MARK, False):
            return True
        members = group_members(exc)
        if members and _group_from_path(members, budget):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class SyncAndAsync:
    """A context manager for ``with`` and ``async with`` alike: the async side runs the sync
    one (neither awaits anything)."""

    __slots__ = ()

    if TYPE_CHECKING:  # what every subclass has

        def __enter__(self) -> Any: ...
        def __exit__(self, exc_type: object, exc: object, tb: object, /) -> None: ...

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)


class ReportingPath(SyncAndAsync):
    """Context manager marking its body as part of the reporting path (sync and async)."""

    __slots__ = ("_thread_depth", "_token")

    def __init__(self) -> None:
        self._token: Optional[contextvars.Token[bool]] = None
        self._thread_depth = False

    def __enter__(self) -> ReportingPath:
        self._token = _in_path.set(True)
        # Inside an event loop the body may await, and a thread-local would leak into every
        # other task on this thread; the task's own context carries the flag there instead.
        if _get_running_loop() is None:
            _local.depth = getattr(_local, "depth", 0) + 1
            self._thread_depth = True
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._thread_depth:
            _local.depth -= 1
            self._thread_depth = False
        if self._token is not None:
            _in_path.reset(self._token)
            self._token = None
        if exc is not None and isinstance(exc, BaseException):
            mark_exception(exc)

    async def __aenter__(self) -> ReportingPath:
        self._token = _in_path.set(True)
        return self


def reporting_path() -> ReportingPath:
    """Mark the code inside ``with reporting_path():`` (or ``async with``) as reporting path.

    Errors logged or raised there, and in threads, executor work and asyncio tasks started
    there, are never reported by selfreport. Other logging handlers still see them.
    """
    return ReportingPath()


@contextmanager
def _thread_in_path() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    token = _in_path.set(True)
    try:
        yield
    except BaseException as exc:
        mark_exception(exc)
        raise
    finally:
        _in_path.reset(token)
        _local.depth -= 1


def guarded(func: F) -> F:
    """Decorator: run ``func`` (a plain or ``async`` function) inside the reporting path.

    Generator functions are refused: their bodies run later, step by step, outside the call;
    use ``with reporting_path():`` inside them instead.
    """
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(
            "guarded() cannot wrap a generator function: its body runs after the call returns; "
            "use `with reporting_path():` inside it instead"
        )
    if inspect.iscoroutinefunction(func):

        @wrapt.decorator  # type: ignore[attr-defined,untyped-decorator,unused-ignore]
        async def async_wrapper(
            wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
        ) -> Any:
            async with ReportingPath():
                return await wrapped(*args, **kwargs)

        return cast(F, async_wrapper(func))

    @wrapt.decorator  # type: ignore[attr-defined,untyped-decorator,unused-ignore]
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        with ReportingPath():
            return wrapped(*args, **kwargs)

    return cast(F, wrapper(func))


# --- propagation into threads, executors and asyncio tasks started inside the path ----------


def _run_in_path(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def run_in_path(*args: Any, **kwargs: Any) -> Any:
        with _thread_in_path():
            return func(*args, **kwargs)

    return run_in_path


def _thread_run_in_path(func: Callable[..., Any]) -> Callable[..., Any]:
    # The contextvar only, in the new thread's own context: a pool thread (anyio's, say) started
    # here runs each later job in that job's own copied context, and must not stay in the path
    # for life the way a thread-local depth would keep it.
    @functools.wraps(func)
    def run_in_path(*args: Any, **kwargs: Any) -> Any:
        token = _in_path.set(True)
        try:
            return func(*args, **kwargs)
        except BaseException as exc:
            mark_exception(exc)
            raise
        finally:
            _in_path.reset(token)

    return run_in_path


async def _await_in_path(coro: Coroutine[Any, Any, Any]) -> Any:
    # Set here as well: a task given its own ``context=`` does not inherit the flag.
    _in_path.set(True)
    try:
        return await coro
    except BaseException as exc:
        mark_exception(exc)
        raise


def _thread_start(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if is_reporting() and isinstance(instance, threading.Thread):
        setattr(instance, _MARK, True)
        run: Callable[..., Any] = instance.run
        # Stay a bound method: other patches of Thread.start (sentry-sdk's threading
        # integration) unwrap run.__func__ and call it with the thread as first argument.
        # (setattr: mypy refuses assigning to a method.)
        func = getattr(run, "__func__", None)
        if func is not None and getattr(run, "__self__", None) is instance:
            setattr(instance, "run", types.MethodType(_thread_run_in_path(func), instance))  # noqa: B010
        else:
            setattr(instance, "run", _thread_run_in_path(run))  # noqa: B010
    return wrapped(*args, **kwargs)


def _executor_submit(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if not (is_reporting() and args):
        return wrapped(*args, **kwargs)
    args = (_run_in_path(args[0]), *args[1:])
    # The pool may start a worker thread for this submit; that thread outlives the work item
    # and must not be marked as reporting path for life, so start it from outside the path.
    with _outside_path():
        return wrapped(*args, **kwargs)


@contextmanager
def _outside_path() -> Iterator[None]:
    depth = getattr(_local, "depth", 0)
    token = _in_path.set(False)
    _local.depth = 0
    try:
        yield
    finally:
        _local.depth = depth
        _in_path.reset(token)


def _loop_create_task(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if is_reporting():
        # The task inherits the contextvar by itself; wrapping only tags what it raises, so
        # the loop's exception handler (called later, from any context) can recognise it.
        if args and inspect.iscoroutine(args[0]):
            args = (_await_in_path(args[0]), *args[1:])
        elif inspect.iscoroutine(kwargs.get("coro")):
            kwargs = {**kwargs, "coro": _await_in_path(kwargs["coro"])}
    return wrapped(*args, **kwargs)


def _counting_logger_handle(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    # A plain function, not a wrapt wrapper: this runs for every record of every logger.
    @functools.wraps(original)
    def handle(self: Any, record: Any) -> Any:
        local = _local
        if _in_path.get():
            # The record may be handled later or elsewhere (QueueListener, MemoryHandler,
            # another process through a queue): it carries where it was born. The contextvar
            # alone: every way into the path sets it, and this runs for every record logged.
            record.__dict__[RECORD_MARK] = True
        depth = getattr(local, "log_depth", 0)
        local.log_depth = depth + 1
        try:
            return original(self, record)
        finally:
            local.log_depth = depth

    return handle


def record_born_in_path(record: logging.LogRecord) -> bool:
    """Whether ``record`` was logged inside the reporting path, wherever it is handled now."""
    return bool(record.__dict__.get(RECORD_MARK, False))


def record_in_path(record: logging.LogRecord) -> bool:
    """Whether handling ``record`` is reporting-path work: it was logged inside the path (here,
    or before it was handed elsewhere), or while another record is handled on this thread.

    One call for what every record a reporting handler takes is checked against.
    """
    return (
        _in_path.get()
        or getattr(_local, "depth", 0) > 0
        or getattr(_local, "log_depth", 0) > 1
        or bool(record.__dict__.get(RECORD_MARK, False))
    )


def in_nested_log_record() -> bool:
    """Whether a record is being logged while another is being handled on this thread.

    That happens when a handler formats a log argument whose ``__str__`` logs, or a handler
    fails and logs about it: errors of the logging path, which are never reported.
    """
    return getattr(_local, "log_depth", 0) > 1


def _future_add_done_callback(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    # The callback runs on whichever thread completes the future, usually a pool's, later.
    if is_reporting() and args:
        args = (_run_in_path(args[0]), *args[1:])
    return wrapped(*args, **kwargs)


def _loop_call_soon_threadsafe(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    # asyncio copies the caller's context, which carries the contextvar; this covers a thread
    # in the path by its depth alone, in a context of its own (run_coroutine_threadsafe too).
    if is_reporting() and args and not _in_path.get():
        args = (_run_in_path(args[0]), *args[1:])
    return wrapped(*args, **kwargs)


def _popen_init(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if is_reporting():
        env_at = 9  # Popen(args, bufsize, executable, stdin, stdout, stderr, preexec_fn,
        #             close_fds, shell, cwd, env, ...): env is rarely given by position
        if len(args) > env_at + 1:
            args = (*args[: env_at + 1], _marked_environ(args[env_at + 1]), *args[env_at + 2 :])
        else:
            kwargs = {**kwargs, "env": _marked_environ(kwargs.get("env"))}
    return wrapped(*args, **kwargs)


def _marked_environ(env: Any) -> Any:
    base = dict(os.environ) if env is None else dict(env)
    base[ENVIRON_MARK] = "1"
    return base


def _process_start(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    # Pickled with the process object when spawned; a forked child inherits the thread state.
    if is_reporting():
        setattr(instance, _MARK, True)
    return wrapped(*args, **kwargs)


class _InPath:
    """A job for another process, run there inside the reporting path (picklable)."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _thread_in_path():
            return self.func(*args, **kwargs)


def _process_pool_submit(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if not (is_reporting() and args):
        return wrapped(*args, **kwargs)
    args = (_InPath(args[0]), *args[1:])
    with _outside_path():  # worker processes outlive the job, like a pool's threads
        return wrapped(*args, **kwargs)


def process_born_in_path() -> bool:
    """Whether this process was started inside another's reporting path (its env or its
    ``multiprocessing`` process object says so): everything it reports is the path's own."""
    if os.environ.get(ENVIRON_MARK) == "1":
        return True
    process = sys.modules.get("multiprocessing.process")
    current = getattr(process, "current_process", None)
    return current is not None and bool(getattr(current(), _MARK, False))


_propagation = Patches(
    (logging.Logger, "handle", Replace(_counting_logger_handle)),
    (threading.Thread, "start", _thread_start),
    (concurrent.futures.ThreadPoolExecutor, "submit", _executor_submit),
    (concurrent.futures.Future, "add_done_callback", _future_add_done_callback),
    (asyncio.BaseEventLoop, "create_task", _loop_create_task),
    (asyncio.BaseEventLoop, "call_soon_threadsafe", _loop_call_soon_threadsafe),
    (subprocess.Popen, "__init__", _popen_init),
)
# multiprocessing only once the application imported it: importing it ourselves would make
# logging look up the process name for every record of every logger (a cost of its own).
_process_propagation: Optional[Patches] = None


def _process_patches() -> Optional[Patches]:
    """The multiprocessing patches, made the first time an install finds it imported."""
    global _process_propagation
    if _process_propagation is None and "multiprocessing.process" in sys.modules:
        import concurrent.futures.process
        import multiprocessing.process

        _process_propagation = Patches(
            (concurrent.futures.process.ProcessPoolExecutor, "submit", _process_pool_submit),
            (multiprocessing.process.BaseProcess, "start", _process_start),
        )
    return _process_propagation


_propagation_users = 0
_propagation_lock = threading.Lock()


def install_propagation() -> None:
    """Patch logging dispatch, thread start, executor submit and task creation.

    Counted: every install needs its uninstall, so selfreport's hooks and the sentry-sdk
    integration can share the patches and neither removes them from under the other.
    """
    global _propagation_users
    with _propagation_lock:
        _propagation_users += 1
        _propagation.install()
        processes = _process_patches()
        if processes is not None:
            processes.install()


def uninstall_propagation() -> None:
    """Undo one :func:`install_propagation`; the patches go when the last user is gone."""
    global _propagation_users
    with _propagation_lock:
        if _propagation_users == 0:
            return
        _propagation_users -= 1
        if _propagation_users == 0:
            _propagation.uninstall()
            if _process_propagation is not None:
                _process_propagation.uninstall()


def thread_is_reporting(thread: Optional[threading.Thread]) -> bool:
    """Whether ``thread`` was started inside the reporting path."""
    return thread is not None and bool(getattr(thread, _MARK, False))


def on_own_thread() -> bool:
    """Whether the calling thread is one of selfreport's own (worker, replay, metrics)."""
    return getattr(_local, "own_thread", False)


def enter_thread_for_life() -> None:
    """Mark the calling thread (selfreport's worker) as reporting path until it ends."""
    _local.own_thread = True
    _local.depth = getattr(_local, "depth", 0) + 1
    _in_path.set(True)
