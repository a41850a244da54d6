"""Parsing Sentry envelopes (for the test collector and the collector's ingestion)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from selfreport._core.untrusted_json import loads

__all__ = ["Envelope", "EnvelopeError", "Item", "parse_envelope"]


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
