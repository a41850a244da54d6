"""sys, threading, unraisable and asyncio exception hooks: chained, and removed on close."""

from __future__ import annotations

import asyncio
import sys
import threading
from types import TracebackType
from typing import Any, Callable, Optional

from selfreport._core.guard import (
    context_is_reporting,
    install_propagation,
    mark_exception,
    thread_is_reporting,
    uninstall_propagation,
)
from selfreport._core.patching import Patches, Replace

__all__ = ["Hooks"]

# What a hook hands to the client: the exception, a mechanism name, and whether the
# reporting-path flag of the calling context means anything (not in GC finalizers).
CaptureFn = Callable[[BaseException, str, bool], None]
ReentrantFn = Callable[[str], None]


# threading.__excepthook__ exists from Python 3.10 on.
_threading_default = getattr(threading, "__excepthook__", threading.excepthook)


def handle_context(handle: object) -> object:
    """The ``contextvars.Context`` an asyncio callback handle runs in, or None if unknown."""
    # Handle.get_context() is public from Python 3.12 on; before, only the private attribute
    # holds it. Neither may be there on other event loops (uvloop's handles differ), or later.
    get_context = getattr(handle, "get_context", None)
    if callable(get_context):
        try:
            return get_context()
        except Exception:
            return None
    return getattr(handle, "_context", None)


def _reportable(exc: Optional[BaseException]) -> bool:
    # KeyboardInterrupt, SystemExit and GeneratorExit are control flow, not errors.
    return isinstance(exc, Exception)


class Hooks:
    """Installs selfreport's exception hooks; each still calls the hook it replaced."""

    def __init__(self, capture: CaptureFn, reentrant: ReentrantFn) -> None:
        self._capture = capture
        self._reentrant = reentrant
        self.active = False
        # Replace(...): the hooks are our bound methods themselves; each chains to what
        # self._patches.replaced() says it replaced.
        self._patches = Patches(
            (sys, "excepthook", Replace(lambda previous: self._sys_hook)),
            (threading, "excepthook", Replace(lambda previous: self._threading_hook)),
            (sys, "unraisablehook", Replace(lambda previous: self._unraisable_hook)),
            (asyncio.BaseEventLoop, "call_exception_handler", self._asyncio_handler),
        )

    def _safe_capture(self, exc: BaseException, mechanism: str, context_meaningful: bool) -> None:
        try:
            self._capture(exc, mechanism, context_meaningful)
        except Exception:  # pragma: no cover - capture never raises; belt and braces
            pass

    def _sys_hook(
        self,
        exc_type: type[BaseException],
        exc: BaseException,
        tb: Optional[TracebackType],
    ) -> None:
        if self.active and _reportable(exc):
            self._safe_capture(exc, "excepthook", True)
        previous = self._patches.replaced(sys, "excepthook") or sys.__excepthook__
        previous(exc_type, exc, tb)

    def _threading_hook(self, args: Any) -> None:
        if self.active and _reportable(args.exc_value):
            if thread_is_reporting(args.thread):
                self._reentrant("thread exception")
            else:
                self._safe_capture(args.exc_value, "threading", True)
        previous = self._patches.replaced(threading, "excepthook") or _threading_default
        previous(args)

    def _unraisable_hook(self, unraisable: Any) -> None:
        if self.active and _reportable(unraisable.exc_value):
            # Unraisable errors surface in finalizers, whatever code the GC interrupted.
            self._safe_capture(unraisable.exc_value, "unraisablehook", False)
        previous = self._patches.replaced(sys, "unraisablehook") or sys.__unraisablehook__
        previous(unraisable)

    def _asyncio_handler(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        context = args[0] if args else kwargs.get("context", {})
        exc = context.get("exception") if isinstance(context, dict) else None
        if self.active and isinstance(exc, Exception):
            handle = context.get("handle")
            if context_is_reporting(handle_context(handle)):
                # A callback scheduled from the path (call_soon, call_later...): it ran in its
                # own copy of the path's context, but the handler is called outside it. Tagged,
                # so the "Exception in callback" record the default handler logs is dropped too.
                mark_exception(exc)
                self._reentrant("asyncio callback exception")
            else:
                # "Task exception was never retrieved" comes from the task's finalizer, so the
                # calling context says nothing; a task started in the path has it tagged.
                from_finalizer = "future" in context or "task" in context
                self._safe_capture(exc, "asyncio", not from_finalizer)
        return wrapped(*args, **kwargs)

    def install(self) -> None:
        if self.active:
            return
        self._patches.install()
        install_propagation()
        self.active = True

    def uninstall(self) -> None:
        """Restore the previous hooks; where another library has chained on top of ours since,
        ours stays in its chain as a pass-through instead of cutting that library off."""
        if not self.active:
            return
        self.active = False
        self._patches.uninstall()
        uninstall_propagation()
