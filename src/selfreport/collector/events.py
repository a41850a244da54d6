"""Normalizing incoming events and grouping them into issues by fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Union

from selfreport._json import loads

__all__ = [
    "LEVELS",
    "EventError",
    "PreparedEvent",
    "event_fingerprint",
    "exception_values",
    "json_type",
    "normalize_event_id",
    "parse_event_json",
    "parse_id",
    "prepare_event",
]

LEVELS = ("fatal", "error", "warning", "info", "debug")
_LEVEL_ALIASES = {"critical": "fatal", "warn": "warning", "log": "info", "exception": "error"}
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MAX_TITLE = 200
_MAX_TAG = 200
_DEFAULT_FINGERPRINT = "{{ default }}"


class EventError(ValueError):
    """An event cannot be accepted; the message says which field is wrong and why."""


@dataclass
class PreparedEvent:
    """An event ready to store: the indexed columns plus the event itself as JSON."""

    event_id: str
    received: float
    timestamp: float
    level: str
    environment: Optional[str]
    release: Optional[str]
    title: str
    culprit: str
    fingerprint: str
    repeats: int
    payload: str


def _text(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _optional_text(value: object, limit: int) -> Optional[str]:
    if value is None or value == "":
        return None
    return _text(value, limit)


def parse_id(text: str) -> Optional[int]:
    """A database id written in ASCII digits, small enough for SQLite; else None.

    (``int()`` also takes other scripts' digits, spaces and underscores.)
    """
    if 0 < len(text) <= 18 and text.isascii() and text.isdigit():
        return int(text)
    return None


def normalize_event_id(value: object) -> str:
    """32 lowercase hex digits; accepts UUIDs with dashes or braces; raises EventError."""
    if not isinstance(value, str):
        raise EventError(f"event_id must be a string of 32 hex digits, got {type(value).__name__}")
    text = value.strip().lower().replace("-", "").strip("{}")
    if not _HEX32.match(text):
        raise EventError(f"event_id must be 32 hex digits, got {value[:64]!r}")
    return text


def _level(value: object) -> str:
    if isinstance(value, str):
        text = value.strip().lower()
        text = _LEVEL_ALIASES.get(text, text)
        if text in LEVELS:
            return text
    return "error"


def _timestamp(value: object, default: float) -> float:
    """Sentry sends seconds since the epoch or an ISO 8601 string; anything else: ``default``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        return number if math.isfinite(number) and number > 0 else default
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            try:
                return _timestamp(float(text), default)
            except ValueError:
                return default
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    return default


def _values(container: object) -> list[Any]:
    """Sentry interfaces come as ``{"values": [...]}`` or as a bare list."""
    if isinstance(container, dict):
        container = container.get("values")
    return [v for v in container if isinstance(v, dict)] if isinstance(container, list) else []


def exception_values(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The exception chain of ``event``, oldest first (Sentry's order)."""
    return _values(event.get("exception"))


def frames_of(exception: dict[str, Any]) -> list[dict[str, Any]]:
    stacktrace = exception.get("stacktrace")
    if not isinstance(stacktrace, dict):
        return []
    frames = stacktrace.get("frames")
    return [f for f in frames if isinstance(f, dict)] if isinstance(frames, list) else []


def _message(event: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
    """(template, formatted) of the event's message, from ``logentry`` or ``message``."""
    for key in ("logentry", "message"):
        value = event.get(key)
        if isinstance(value, str) and value:
            return value, value
        if isinstance(value, dict):
            template = value.get("message")
            formatted = value.get("formatted")
            template = template if isinstance(template, str) and template else None
            formatted = formatted if isinstance(formatted, str) and formatted else None
            if template or formatted:
                return template or formatted, formatted or template
    return None, None


def _frame_location(frame: dict[str, Any]) -> str:
    where = frame.get("module") or frame.get("filename") or frame.get("abs_path") or "?"
    return f"{_text(where, 200)} in {_text(frame.get('function') or '?', 200)}"


def _culprit(event: dict[str, Any], exceptions: list[dict[str, Any]]) -> str:
    if exceptions:
        frames = frames_of(exceptions[-1])
        in_app = [f for f in frames if f.get("in_app") is True]
        chosen = (in_app or frames)[-1:] if frames else []
        if chosen:
            return _frame_location(chosen[0])
    for key in ("culprit", "transaction", "logger"):
        value = event.get(key)
        if isinstance(value, str) and value:
            return _text(value, _MAX_TITLE)
    return ""


def _title(event: dict[str, Any], exceptions: list[dict[str, Any]]) -> str:
    if exceptions:
        last = exceptions[-1]
        kind = _text(last.get("type") or "Error", 100)
        value = last.get("value")
        return _text(f"{kind}: {value}" if value not in (None, "") else kind, _MAX_TITLE)
    _, formatted = _message(event)
    if formatted:
        first_line = formatted.strip().splitlines()[0] if formatted.strip() else formatted
        return _text(first_line, _MAX_TITLE)
    return "<no message>"


def _default_grouping(event: dict[str, Any], exceptions: list[dict[str, Any]]) -> list[Any]:
    """Sentry's default idea: exception types plus in-app frames (without line numbers, so a
    group survives edits elsewhere in the file), else the message template."""
    if exceptions:
        parts: list[Any] = []
        for exception in exceptions:
            frames = frames_of(exception)
            in_app = [f for f in frames if f.get("in_app") is True] or frames
            parts.append(
                [
                    exception.get("type"),
                    exception.get("module"),
                    [[f.get("module") or f.get("filename"), f.get("function")] for f in in_app],
                ]
            )
            if not frames:  # without a stack trace the value is all that tells errors apart
                parts[-1].append(exception.get("value"))
        return ["exception", parts]
    template, _ = _message(event)
    if template:
        return ["message", template]
    return ["title", _title(event, exceptions)]


def event_fingerprint(event: dict[str, Any]) -> str:
    """The grouping key: a custom ``fingerprint`` list if the event has one, else the default."""
    exceptions = exception_values(event)
    custom = event.get("fingerprint")
    default = _default_grouping(event, exceptions)
    if isinstance(custom, list) and custom and all(isinstance(p, str) for p in custom):
        components: Any = [default if part == _DEFAULT_FINGERPRINT else part for part in custom]
    else:
        components = default
    text = json.dumps(components, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()


def _repeats(event: dict[str, Any]) -> int:
    """selfreport folds repeats of one error into the next event it sends (extra)."""
    extra = event.get("extra")
    value = extra.get("selfreport_repeats") if isinstance(extra, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9:
        return value
    return 0


def _reject_constant(name: str) -> Any:
    raise EventError(f"{name} is not a JSON number")


def parse_event_json(text: Union[str, bytes], repair: bool = True) -> Any:
    """Untrusted JSON (see :func:`selfreport._json.loads`: bounded depth, lone surrogates
    replaced), refusing NaN and Infinity (Python accepts them, JSON does not)."""
    return loads(text, parse_constant=_reject_constant, repair=repair)


def prepare_event(
    event: object,
    *,
    default_event_id: Optional[str] = None,
    received: Optional[float] = None,
    original: Optional[str] = None,
) -> PreparedEvent:
    """Check and index ``event``; raises :class:`EventError` saying what is wrong.

    Sentry is lenient with events: fields of the wrong type are ignored rather than refused.
    Only an event that is not a JSON object or has a malformed ``event_id`` is refused.
    ``original``: the JSON text ``event`` was parsed from (unmodified since), stored as is
    when the event already had a well-formed event_id, which saves serializing it again.
    """
    if not isinstance(event, dict):
        raise EventError(f"an event must be a JSON object, got {json_type(event)}")
    now = time.time() if received is None else received
    raw_id = event.get("event_id")
    if raw_id is None:
        raw_id = default_event_id or uuid.uuid4().hex
    event_id = normalize_event_id(raw_id)
    if event.get("event_id") != event_id:  # added or normalized: the original text is stale
        event["event_id"] = event_id
        original = None
    level = _level(event.get("level"))
    exceptions = exception_values(event)
    if original is not None:
        payload = original
    else:
        try:
            payload = json.dumps(event, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except ValueError as exc:  # NaN or Infinity, which JSON allows in Python only
            raise EventError(f"the event contains a number JSON cannot carry: {exc}") from None
    return PreparedEvent(
        event_id=event_id,
        received=now,
        timestamp=_timestamp(event.get("timestamp"), now),
        level=level,
        environment=_optional_text(event.get("environment"), 64),
        release=_optional_text(event.get("release"), _MAX_TAG),
        title=_title(event, exceptions),
        culprit=_culprit(event, exceptions),
        fingerprint=event_fingerprint(event),
        repeats=_repeats(event),
        payload=payload,
    )


def json_type(value: object) -> str:
    """How JSON calls the type of ``value`` (for error messages)."""
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, (int, float)) else type(value).__name__
