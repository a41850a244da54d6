"""OpenTelemetry: selfreport's own sends are never traced; events carry the active trace ids."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from selfreport._core.processors import add_event_processor, add_send_wrapper
from selfreport.integrations import requires

with requires(__name__, "opentelemetry-api", "otel"):
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace


__all__ = ["add_trace_context", "suppress_instrumentation", "suppression_keys", "trace_context"]

# The key names OpenTelemetry's instrumentations check. The API module holds the real keys
# (made by create_key, so unique objects); older instrumentations read a plain string key.
_KEY_NAMES = ("_SUPPRESS_INSTRUMENTATION_KEY", "_SUPPRESS_HTTP_INSTRUMENTATION_KEY")
_PLAIN_KEY = "suppress_instrumentation"


def suppression_keys() -> tuple[str, ...]:
    """Every context key that tells OpenTelemetry instrumentations to stay quiet."""
    keys = [getattr(otel_context, name, None) for name in _KEY_NAMES]
    # Instrumentation packages older than the API's own keys kept theirs in their utils module.
    utils = sys.modules.get("opentelemetry.instrumentation.utils")
    if utils is not None:
        keys += [getattr(utils, name, None) for name in _KEY_NAMES]
    keys.append(_PLAIN_KEY)
    return tuple(dict.fromkeys(key for key in keys if isinstance(key, str)))


@contextmanager
def suppress_instrumentation() -> Iterator[None]:
    """Run the body with OpenTelemetry instrumentation suppressed (HTTP clients included).

    selfreport wraps each of its sends in this, on its worker thread, whenever the application
    has loaded OpenTelemetry: instrumented HTTP clients then neither trace nor log them.
    """
    try:
        ctx = otel_context.get_current()
        for key in suppression_keys():
            ctx = otel_context.set_value(key, True, ctx)
        token: Optional[object] = otel_context.attach(ctx)
    except Exception:  # pragma: no cover - a broken OpenTelemetry must not stop a send
        token = None
    try:
        yield
    finally:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]


def trace_context() -> Optional[dict[str, str]]:
    """The active span's ids in Sentry's ``contexts.trace`` shape, or None outside a span."""
    span_context = otel_trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return {
        "trace_id": format(span_context.trace_id, "032x"),
        "span_id": format(span_context.span_id, "016x"),
        "type": "trace",
    }


def add_trace_context(event: dict[str, Any]) -> None:
    """Put the active trace and span id into ``event`` unless it names a trace already.

    selfreport calls this while building an event on its worker thread, inside the caller's
    copied contextvars Context, so the span active where the error happened is the current one.
    """
    try:
        trace = trace_context()
    except Exception:  # pragma: no cover - a broken tracer must not cost the event
        return
    if trace is None:
        return
    contexts = event.get("contexts")
    if not isinstance(contexts, dict):
        contexts = event["contexts"] = {}
    contexts.setdefault("trace", trace)


# Registered at import: the core never imports integrations; selfreport imports this module
# (see selfreport/__init__.py) once the application has imported OpenTelemetry.
add_event_processor(add_trace_context)
add_send_wrapper(suppress_instrumentation)
