"""Event processors and send wrappers that integrations register, so the core imports none."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Callable

from .diag import Diagnostics
from .fork import on_fork_child

__all__ = [
    "activate_on_import",
    "add_event_processor",
    "add_send_wrapper",
    "process_event",
    "remove_event_processor",
    "remove_send_wrapper",
    "unobserved",
]

EventProcessor = Callable[[dict[str, Any]], None]
SendWrapper = Callable[[], AbstractContextManager[Any]]

_processors: list[EventProcessor] = []
_send_wrappers: list[SendWrapper] = []
# (module the application imports, module of ours that registers for it), not yet imported.
_pending: list[tuple[str, str]] = []
_diagnostics = Diagnostics()
on_fork_child(_diagnostics.reset_after_fork)


def add_event_processor(processor: EventProcessor) -> None:
    """Run ``processor(event)`` on every event a client builds, on its worker thread, inside the
    caller's copied contextvars Context, before ``before_send``; it changes the event in place."""
    if processor not in _processors:
        _processors.append(processor)


def remove_event_processor(processor: EventProcessor) -> None:
    if processor in _processors:
        _processors.remove(processor)


def add_send_wrapper(wrapper: SendWrapper) -> None:
    """Enter ``wrapper()`` around every send of an envelope (to keep tracers off our traffic)."""
    if wrapper not in _send_wrappers:
        _send_wrappers.append(wrapper)


def remove_send_wrapper(wrapper: SendWrapper) -> None:
    if wrapper in _send_wrappers:
        _send_wrappers.remove(wrapper)


def activate_on_import(trigger: str, module: str) -> None:
    """Import ``module`` (which registers processors) once the application has imported
    ``trigger``; never imports ``trigger`` on our account."""
    if (trigger, module) not in _pending:
        _pending.append((trigger, module))


def _activate() -> None:
    for entry in list(_pending):
        trigger, module = entry
        if trigger not in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except Exception as error:  # too old or broken to use: report without it, from now on
            _diagnostics.once("activate:" + module, f"not using {module}: {error!r}")
        with contextlib.suppress(ValueError):  # another worker thread was as quick
            _pending.remove(entry)


def process_event(event: dict[str, Any]) -> None:
    """Run every registered processor on ``event``; one that raises is skipped, not fatal."""
    if _pending:
        _activate()
    for processor in list(_processors):
        try:
            processor(event)
        except Exception as error:
            _diagnostics.once(f"processor:{processor!r}", f"an event processor raised {error!r}")


@contextmanager
def unobserved() -> Iterator[None]:
    """Run the body inside every registered send wrapper (OpenTelemetry's suppression...)."""
    if _pending:
        _activate()
    if not _send_wrappers:
        yield
        return
    with ExitStack() as stack:
        for wrapper in list(_send_wrappers):
            try:
                stack.enter_context(wrapper())
            except Exception:  # pragma: no cover - a broken wrapper must not stop a send
                pass
        yield
