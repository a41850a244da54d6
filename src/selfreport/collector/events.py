"""Normalizing incoming events and grouping them into issues by fingerprint."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Union

from selfreport._core.untrusted_json import loads, parse

__all__ = [
    "LEVELS",
    "EventColumns",
    "EventError",
    "PreparedEvent",
    "event_fingerprint",
    "exception_values",
    "json_type",
    "main_exception",
    "normalize_event_id",
    "parse_event_json",
    "parse_event_text",
    "parse_id",
    "prepare_event",
    "trim_event",
]

LEVELS = ("fatal", "error", "warning", "info", "debug")
_LEVEL_ALIASES = {"critical": "fatal", "warn": "warning", "log": "info", "exception": "error"}
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MAX_TITLE = 200
_MAX_TAG = 200
# Spellings of the default-grouping placeholder in a fingerprint, as Sentry accepts them.
_DEFAULT_FINGERPRINT = frozenset(("{{ default }}", "{{default}}"))

# Trimming before storage, after Relay's (Sentry's ingestion): the limits it applies to the
# same fields. Events whose JSON is smaller than TRIM_ABOVE are stored as they came.
MAX_EVENT_BYTES = 2**20
TRIM_ABOVE = 32 * 1024
MAX_BREADCRUMBS = 100
MAX_FRAMES = 250
MAX_STRING = 8192
MAX_TAG_VALUE = 200
MAX_DEPTH = 20
# Items kept per list or object (Relay's databag breadth): trimming never walks millions.
MAX_BREADTH = 1000
# Databags as (depth, size in characters of JSON, about): Relay's "medium", "large", "larger".
_FRAME_VARS = (5, 2048)
_BAG = (7, 8192)
_EXTRA = (7, 16384)


class EventError(ValueError):
    """An event cannot be accepted; the message says which field is wrong and why."""


@dataclass(frozen=True)
class EventColumns:
    """What a stored event is indexed by, beside its JSON; its id is unique per project."""

    event_id: str
    received: float
    timestamp: float
    level: str
    environment: Optional[str]
    release: Optional[str]


@dataclass(frozen=True)
class PreparedEvent(EventColumns):
    """An event ready to store: the indexed columns, what groups it into an issue, and the
    event itself as JSON."""

    title: str
    culprit: str
    fingerprint: str
    repeats: int
    payload: str


def _text(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    # Whitespace is collapsed in what can be shown, not in the whole of a 20 MB message.
    text = " ".join(text[: limit * 8].split())
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


def main_exception(exceptions: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The exception an issue is named after: the outermost one; for an exception group, its
    first member that is not a group itself (Python prints it first; the group only wraps)."""
    if not exceptions:
        return None
    outer = exceptions[-1]
    if not _mechanism(outer).get("is_exception_group"):
        return outer
    leaves = []
    for exception in exceptions:
        mechanism = _mechanism(exception)
        source, exception_id = mechanism.get("source"), mechanism.get("exception_id")
        is_member = isinstance(source, str) and source.startswith("exceptions[")
        if is_member and isinstance(exception_id, int) and not mechanism.get("is_exception_group"):
            leaves.append((exception_id, exception))
    return min(leaves, key=lambda leaf: leaf[0])[1] if leaves else outer


def _mechanism(exception: dict[str, Any]) -> dict[str, Any]:
    mechanism = exception.get("mechanism")
    return mechanism if isinstance(mechanism, dict) else {}


def _culprit(event: dict[str, Any], main: Optional[dict[str, Any]]) -> str:
    if main is not None:
        frames = frames_of(main)
        in_app = [f for f in frames if f.get("in_app") is True]
        chosen = (in_app or frames)[-1:] if frames else []
        if chosen:
            return _frame_location(chosen[0])
    for key in ("culprit", "transaction", "logger"):
        value = event.get(key)
        if isinstance(value, str) and value:
            return _text(value, _MAX_TITLE)
    return ""


def _title(event: dict[str, Any], main: Optional[dict[str, Any]]) -> str:
    if main is not None:
        kind = _text(main.get("type") or "Error", 100) or "Error"
        value = main.get("value")
        title = _text(f"{kind}: {value}" if value not in (None, "") else kind, _MAX_TITLE)
        return title or kind
    _, formatted = _message(event)
    lines = formatted.strip().splitlines() if formatted else []
    # Whitespace alone is no title: an issue list row must show something to click.
    return (_text(lines[0], _MAX_TITLE) if lines else "") or "<no message>"


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
    return ["title", _title(event, None)]


def event_fingerprint(
    event: dict[str, Any], exceptions: Optional[list[dict[str, Any]]] = None
) -> str:
    """The grouping key: a custom ``fingerprint`` list if the event has one, else the default
    (``exceptions``: the event's :func:`exception_values`, when the caller has them)."""
    if exceptions is None:
        exceptions = exception_values(event)
    custom = event.get("fingerprint")
    default = _default_grouping(event, exceptions)
    components: Any = default
    # ["{{ default }}"] alone is the default grouping itself, as in Sentry: the same issue.
    if (
        isinstance(custom, list)
        and custom
        and all(isinstance(p, str) for p in custom)
        and not all(p in _DEFAULT_FINGERPRINT for p in custom)
    ):
        components = [default if part in _DEFAULT_FINGERPRINT else part for part in custom]
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
    """Untrusted JSON (see :func:`selfreport._core.untrusted_json.loads`: bounded depth,
    lone surrogates replaced), refusing NaN and Infinity (Python accepts them, JSON does not)."""
    return loads(text, parse_constant=_reject_constant, repair=repair)


def parse_event_text(data: bytes) -> tuple[str, Any]:
    """:func:`parse_event_json` of ``data``, with its text (lone surrogates replaced): what
    is stored when the event is kept as it came."""
    return parse(data, parse_constant=_reject_constant)


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
    # The size of the text it came as, even once that text is stale: a 20 MB event is not
    # serialized whole only to learn that it needs trimming.
    size = None if original is None else len(original)
    raw_id = event.get("event_id")
    if raw_id is None:
        raw_id = default_event_id or uuid.uuid4().hex
    event_id = normalize_event_id(raw_id)
    if event.get("event_id") != event_id:  # added or normalized: the original text is stale
        event["event_id"] = event_id
        original = None
    level = _level(event.get("level"))
    exceptions = exception_values(event)
    main = main_exception(exceptions)
    # Grouped and titled by the event as it came; stored as trimmed.
    title, culprit, fingerprint = (
        _title(event, main),
        _culprit(event, main),
        event_fingerprint(event, exceptions),
    )
    payload = original
    if payload is None and (size is None or size <= TRIM_ABOVE):
        payload = _dumps(event)
        size = len(payload)
    if payload is None or len(payload) > TRIM_ABOVE or _too_many_breadcrumbs(event):
        payload = _dumps(trim_event(event, size or 0))
    return PreparedEvent(
        event_id=event_id,
        received=now,
        timestamp=_timestamp(event.get("timestamp"), now),
        level=level,
        environment=_optional_text(event.get("environment"), 64),
        release=_optional_text(event.get("release"), _MAX_TAG),
        title=title,
        culprit=culprit,
        fingerprint=fingerprint,
        repeats=_repeats(event),
        payload=payload,
    )


def _too_many_breadcrumbs(event: dict[str, Any]) -> bool:
    crumbs = event.get("breadcrumbs")
    crumbs = crumbs.get("values") if isinstance(crumbs, dict) else crumbs
    return isinstance(crumbs, list) and len(crumbs) > MAX_BREADCRUMBS


def _dumps(event: dict[str, Any]) -> str:
    try:
        return json.dumps(event, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:  # NaN or Infinity, which JSON allows in Python only
        raise EventError(f"the event contains a number JSON cannot carry: {exc}") from None


def _utf8_size(text: str) -> int:
    if len(text) * 4 <= MAX_EVENT_BYTES:  # cannot be over, whatever the characters
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


# What trim_event drops, in this order, while the event is still over MAX_EVENT_BYTES.
_SHEDDABLE = (
    "breadcrumbs",
    "spans",
    "debug_meta",
    "threads",
    "extra",
    "request",
    "contexts",
    "modules",
    "sdk",
    "user",
    "tags",
)


def trim_event(event: dict[str, Any], size: int = 0) -> dict[str, Any]:
    """Trim ``event`` (in place, and return it) the way Relay does before storage: the
    newest :data:`MAX_BREADCRUMBS` breadcrumbs, at most :data:`MAX_FRAMES` frames per stack
    trace (the outermost and innermost), strings of at most :data:`MAX_STRING` characters
    (tag values :data:`MAX_TAG_VALUE`), frame variables, ``extra``, ``contexts`` and request
    data limited in depth and size, nothing nested deeper than :data:`MAX_DEPTH`. If the JSON is
    still over :data:`MAX_EVENT_BYTES`, whole interfaces are dropped (breadcrumbs first), and
    at last everything but what identifies the event and its exception types and messages.
    What was trimmed is listed in ``extra.selfreport_trimmed`` (with ``size``, the original
    size in bytes, if given)."""
    trimmed: set[str] = set()
    for key in list(event):
        value = event[key]
        if key == "breadcrumbs":
            event[key] = _trim_breadcrumbs(value, trimmed)
        elif key in ("exception", "threads"):
            event[key] = _trim_interface(value, trimmed)
        elif key == "extra":
            event[key] = _Trimmer(trimmed, *_EXTRA).value(value, "extra")
        elif key == "contexts" and isinstance(value, dict):
            event[key] = {
                k: _Trimmer(trimmed, *_BAG).value(v, "contexts") for k, v in value.items()
            }
        elif key == "request" and isinstance(value, dict):
            event[key] = {
                k: _Trimmer(trimmed, *_BAG).value(v, "request")
                if k == "data"
                else _Trimmer(trimmed).value(v, "strings")
                for k, v in value.items()
            }
        elif key == "tags":
            event[key] = _Trimmer(trimmed, string_limit=MAX_TAG_VALUE).value(value, "tags")
        else:
            event[key] = _Trimmer(trimmed).value(value, "strings")
    # Measured once; each interface dropped takes its own size off (its comma aside, so the
    # total stays an upper bound): not one serialization of the whole event per key.
    total = _utf8_size(_dumps(event))
    for key in _SHEDDABLE:
        if total <= MAX_EVENT_BYTES:
            break
        if key in event:
            total -= len(_dumps({key: event.pop(key)}).encode("utf-8", "surrogatepass")) - 2
            trimmed.add(key)
    if total > MAX_EVENT_BYTES:
        _keep_only_essentials(event)
        trimmed.add("everything but the essentials")
    if trimmed:
        extra = event.get("extra")
        if not isinstance(extra, dict):
            extra = event["extra"] = {}
        extra["selfreport_trimmed"] = sorted(trimmed) + ([f"size {size}"] if size else [])
    return event


def _trim_breadcrumbs(value: object, trimmed: set[str]) -> object:
    crumbs = value.get("values") if isinstance(value, dict) else value
    if isinstance(crumbs, list) and len(crumbs) > MAX_BREADCRUMBS:
        crumbs = crumbs[-MAX_BREADCRUMBS:]  # the newest
        trimmed.add("breadcrumbs")
    crumbs = _Trimmer(trimmed).value(crumbs, "breadcrumbs")
    if isinstance(crumbs, list):
        for crumb in crumbs:
            if isinstance(crumb, dict) and "data" in crumb:
                crumb["data"] = _Trimmer(trimmed, *_FRAME_VARS).value(crumb["data"], "breadcrumbs")
    return {"values": crumbs} if isinstance(value, dict) else crumbs


def _trim_interface(value: object, trimmed: set[str]) -> object:
    """``exception`` or ``threads``: frames per stack trace, then their variables."""
    for item in _values(value):
        stacktrace = item.get("stacktrace")
        frames = stacktrace.get("frames") if isinstance(stacktrace, dict) else None
        if not isinstance(frames, list):
            continue
        if len(frames) > MAX_FRAMES:  # keep where it started and where it failed
            half = MAX_FRAMES // 2
            stacktrace["frames"] = frames = frames[:half] + frames[-half:]
            trimmed.add("frames")
        for frame in frames:
            if isinstance(frame, dict) and "vars" in frame:
                frame["vars"] = _Trimmer(trimmed, *_FRAME_VARS).value(frame["vars"], "vars")
    return _Trimmer(trimmed).value(value, "strings")


class _Trimmer:
    """Walks a JSON value within a depth and a size budget (characters of JSON, about),
    cutting long strings and dropping what is over either, as Relay trims a databag."""

    def __init__(
        self,
        trimmed: set[str],
        depth: int = MAX_DEPTH,
        size: Optional[int] = None,
        string_limit: int = MAX_STRING,
    ) -> None:
        self.trimmed = trimmed
        self.depth = depth
        self.left = size
        self.string_limit = string_limit
        self.what = ""

    def value(self, value: Any, what: str) -> Any:
        self.what = what
        return self._walk(value, self.depth)

    def _spend(self, amount: int) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            self.trimmed.add(self.what)
            return False
        self.left -= amount
        return True

    def _walk(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            limit = self.string_limit
            if self.left is not None:
                limit = max(16, min(limit, self.left))
            self._spend(min(len(value), limit) + 2)
            if len(value) > limit:
                self.trimmed.add(self.what)
                return value[: limit - 1] + "\u2026"
            return value
        if isinstance(value, (dict, list)):
            if depth <= 0:
                self.trimmed.add(self.what)
                return "{\u2026}" if isinstance(value, dict) else "[\u2026]"
            if len(value) > MAX_BREADTH:
                self.trimmed.add(f"{self.what}: {MAX_BREADTH} items per list or object")
            if isinstance(value, dict):
                out: dict[str, Any] = {}
                for key, item in itertools.islice(value.items(), MAX_BREADTH):
                    if not self._spend(len(str(key)) + 4):
                        break
                    out[key] = self._walk(item, depth - 1)
                return out
            items: list[Any] = []
            for item in value[:MAX_BREADTH]:
                if not self._spend(2):
                    break
                items.append(self._walk(item, depth - 1))
            return items
        self._spend(8)
        return value


_ESSENTIALS = ("event_id", "timestamp", "level", "platform", "logger", "environment", "release")


def _keep_only_essentials(event: dict[str, Any]) -> None:
    """The last resort for an event that is still too large: what identifies it, its message,
    and its exceptions' types and values (without stack traces)."""
    kept = {key: event[key] for key in _ESSENTIALS if key in event}
    _, formatted = _message(event)
    if formatted:
        kept["message"] = _text(formatted, MAX_STRING)
    exceptions = exception_values(event)[-10:]
    if exceptions:
        kept["exception"] = {
            "values": [
                {
                    "type": _text(e.get("type") or "Error", 200),
                    "value": _text(e.get("value") or "", 1000),
                }
                for e in exceptions
            ]
        }
    event.clear()
    event.update(kept)


def json_type(value: object) -> str:
    """How JSON calls the type of ``value`` (for error messages)."""
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, (int, float)) else type(value).__name__
