"""Text from any object, never raising and bounded: for events, fingerprints and messages."""

from __future__ import annotations

__all__ = ["MAX_STRING", "safe_repr", "safe_str"]

MAX_STRING = 8192


def safe_str(value: object, limit: int = MAX_STRING) -> str:
    """``str(value)``, never raising, cut to ``limit`` characters."""
    try:
        text = value if isinstance(value, str) else str(value)
    except BaseException as exc:
        text = f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_repr(value: object, limit: int = 1024) -> str:
    """``repr(value)``, never raising, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except BaseException as exc:
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
