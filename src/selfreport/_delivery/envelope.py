"""Sentry envelopes both ways: written by the SDK, parsed by the test and real collectors."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from selfreport._capture.event import SDK_INFO, safe_repr
from selfreport._core.dsn import Dsn
from selfreport._core.untrusted_json import loads

__all__ = [
    "Envelope",
    "EnvelopeError",
    "Item",
    "parse_envelope",
    "serialize_checkin",
    "serialize_envelope",
]


class EnvelopeError(ValueError):
    """The body is not a valid Sentry envelope; the message says where and why."""


@dataclass
class Item:
    headers: dict[str, Any]
    payload: bytes

    @property
    def type(self) -> str:
        return str(self.headers.get("type", ""))

    def json(self) -> Any:
        return loads(self.payload)


@dataclass
class Envelope:
    headers: dict[str, Any]
    items: list[Item] = field(default_factory=list)

    def events(self) -> list[dict[str, Any]]:
        return [item.json() for item in self.items if item.type == "event"]


def _json_object(line: bytes, what: str) -> dict[str, Any]:
    try:
        value = loads(line)
    except ValueError as exc:  # UnicodeDecodeError and JSONDepthError are ValueErrors
        raise EnvelopeError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EnvelopeError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_envelope(body: bytes, max_items: int = 1000) -> Envelope:
    """Parse ``body``; raises :class:`EnvelopeError` saying what is malformed."""
    if not body.strip():
        raise EnvelopeError("envelope is empty")
    end = body.find(b"\n")
    first = body if end < 0 else body[:end]
    envelope = Envelope(_json_object(first, "envelope header"))
    pos = len(body) if end < 0 else end + 1
    while pos < len(body):
        if len(envelope.items) >= max_items:
            raise EnvelopeError(f"envelope has more than {max_items} items")
        end = body.find(b"\n", pos)
        line = body[pos:] if end < 0 else body[pos:end]
        pos = len(body) if end < 0 else end + 1
        if not line.strip():
            continue
        what = f"item {len(envelope.items) + 1} header"
        headers = _json_object(line, what)
        length: Optional[Any] = headers.get("length")
        if length is not None:
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise EnvelopeError(f"{what}: length must be a non-negative integer")
            if pos + length > len(body):
                raise EnvelopeError(f"{what}: length {length} runs past the end of the envelope")
            payload = body[pos : pos + length]
            pos += length
            if pos < len(body) and body[pos : pos + 1] == b"\n":
                pos += 1
        else:
            end = body.find(b"\n", pos)
            payload = body[pos:] if end < 0 else body[pos:end]
            pos = len(body) if end < 0 else end + 1
        envelope.items.append(Item(headers, payload))
    return envelope


# --- writing ---------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Replace what JSON cannot carry (NaN, infinities, arbitrary objects) after a failed dump."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return safe_repr(value)


def _dumps(value: Any) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        text = json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "replace")


def _serialize_item(
    kind: str, value: Mapping[str, Any], event_id: Any, dsn: Optional[Dsn], sent_at: str
) -> bytes:
    """One JSON item of type ``kind`` as a Sentry envelope: header, item header, payload."""
    header: dict[str, Any] = {
        "event_id": event_id,
        "sent_at": sent_at,
        "sdk": SDK_INFO,
    }
    if dsn is not None:
        header["dsn"] = str(dsn.public())  # never the secret key: envelopes get spooled
    payload = _dumps(value)
    item = {"type": kind, "length": len(payload), "content_type": "application/json"}
    return b"\n".join((_dumps(header), _dumps(item), payload)) + b"\n"


def serialize_envelope(event: Mapping[str, Any], dsn: Optional[Dsn], sent_at: str) -> bytes:
    """One event as a Sentry envelope: envelope header, item header, payload."""
    return _serialize_item("event", event, event.get("event_id"), dsn, sent_at)


def serialize_checkin(
    checkin: Mapping[str, Any], event_id: str, dsn: Optional[Dsn], sent_at: str
) -> bytes:
    """One cron check-in as a Sentry envelope with a ``check_in`` item (as sentry-sdk sends
    it); ``event_id`` is the envelope's own, the check-in's id is ``check_in_id`` inside."""
    return _serialize_item("check_in", checkin, event_id, dsn, sent_at)
