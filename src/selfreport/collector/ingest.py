"""Sentry-compatible ingestion: the envelope and store endpoints, auth, bodies, limits."""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from selfreport._core.dsn import parse_dsn
from selfreport._core.guard import is_reporting
from selfreport._core.untrusted_json import JSONDepthError
from selfreport._delivery.envelope import Envelope, EnvelopeError, Item, parse_envelope
from selfreport.exceptions import ConfigError

from .alerting.monitors import CheckInError, CheckInItem, parse_checkin
from .events import (
    EventError,
    PreparedEvent,
    json_type,
    normalize_event_id,
    parse_event_text,
    parse_id,
    prepare_event,
)
from .limits import DEFAULT_MAX_BODY
from .metrics import CollectorMetrics
from .store import EventOutcome, Project, StorageError, StorageFull, Store

__all__ = [
    "DEFAULT_MAX_BODY",
    "ClientDisconnected",
    "IngestEndpoint",
    "IngestError",
    "KeyCache",
    "OnStored",
    "Processor",
    "StoredEnvelope",
    "parse_auth_header",
    "read_body",
]

logger = logging.getLogger("selfreport.collector")

# Bodies larger than this are parsed and prepared in a worker thread, not on the event loop.
PREPARE_INLINE_MAX = 64 * 1024

# ``processor(event, project) -> event or None``: runs on every event before it is stored
# (in a worker thread when the body is over PREPARE_INLINE_MAX).
Processor = Callable[[dict[str, Any], Project], Optional[dict[str, Any]]]


class IngestError(Exception):
    """A request refused with ``status``; ``reason`` labels the metric, ``detail`` tells why."""

    def __init__(
        self, status: int, reason: str, detail: str, headers: Optional[dict[str, str]] = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}


class ClientDisconnected(Exception):
    """The sender went away before its body arrived."""


@dataclass
class StoredEnvelope:
    """What an ``on_stored`` hook receives after the events were committed."""

    project: Project
    events: list[PreparedEvent]
    stored: list[bool]  # per event: False when it was a duplicate of a stored event_id
    body: bytes  # the decompressed request body (an envelope, or an event for /store/)
    own_report: bool  # sent by this collector's own self-reporter
    headers: dict[str, str] = field(default_factory=dict)
    # Per event, what storing it did (issue, new issue, regression): for alert rules.
    outcomes: list[EventOutcome] = field(default_factory=list)


OnStored = Callable[[StoredEnvelope], None]


def parse_auth_header(value: str) -> dict[str, str]:
    """``Sentry sentry_key=..., sentry_version=7`` as a dict (keys lowercased)."""
    text = value.strip()
    if text[:7].lower() == "sentry ":
        text = text[7:]
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, val = part.strip().partition("=")
        if sep:
            out[key.strip().lower()] = val.strip()
    return out


class _Zlib:
    """gzip or deflate, inflated in bounded steps: never more than the limit in memory."""

    def __init__(self, wbits: Optional[int]) -> None:
        # None: deflate, zlib-wrapped (RFC 9110) or raw (some clients): decided on the first
        # bytes; a zlib header's first byte is 0x?8 and the pair is a multiple of 31.
        self._decoder: Any = None if wbits is None else zlib.decompressobj(wbits)

    @property
    def finished(self) -> bool:
        return self._decoder is None or bool(self._decoder.eof)

    def feed(self, chunk: bytes, out: bytearray, max_size: int) -> None:
        if self._decoder is None:
            if not chunk:
                return
            wrapped = (
                len(chunk) >= 2 and chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
            )
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        data = chunk
        while data and not self._decoder.eof:
            try:
                piece = self._decoder.decompress(data, max_size - len(out) + 1)
            except zlib.error as exc:
                raise _undecodable(exc) from None
            out += piece
            if len(out) > max_size:
                raise _too_large(max_size, "the decompressed body")
            data = self._decoder.unconsumed_tail


class _Brotli:
    """br (sentry-sdk's choice when the brotli module is installed), in bounded steps."""

    def __init__(self) -> None:
        try:
            import brotli
        except ImportError:
            raise IngestError(
                415,
                "unsupported_encoding",
                "Content-Encoding br needs the brotli module on the collector "
                "(pip install 'selfreport[collector]'); send gzip instead",
            ) from None
        self._module: Any = brotli
        self._decoder: Any = brotli.Decompressor()

    @property
    def finished(self) -> bool:
        return bool(self._decoder.is_finished())

    def feed(self, chunk: bytes, out: bytearray, max_size: int) -> None:
        data = chunk
        while True:
            try:
                piece = self._decoder.process(data, output_buffer_limit=max_size - len(out) + 1)
            except self._module.error as exc:
                raise _undecodable(exc) from None
            out += piece
            if len(out) > max_size:
                raise _too_large(max_size, "the decompressed body")
            data = b""
            if self._decoder.can_accept_more_data():
                return


def _decoder(encoding: str) -> Optional[Union[_Zlib, _Brotli]]:
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return _Zlib(None)
    if encoding == "br":
        return _Brotli()
    raise IngestError(
        415,
        "unsupported_encoding",
        f"unsupported Content-Encoding {encoding!r}: send gzip, deflate, br or no encoding",
    )


def _undecodable(exc: Exception) -> IngestError:
    return IngestError(400, "malformed", f"the body cannot be decompressed: {exc}")


def _too_large(limit: int, what: str) -> IngestError:
    return IngestError(
        413,
        "too_large",
        f"{what} is larger than the limit of {limit} bytes",
        {"Connection": "close"},
    )


async def read_body(
    receive: Receive, headers: Mapping[str, str], max_size: int = DEFAULT_MAX_BODY
) -> bytes:
    """Read and decompress the request body, chunk by chunk, never holding more than
    ``max_size`` bytes of it (compressed or not): a larger body or a decompression bomb raises
    :class:`IngestError` 413 as soon as the limit is crossed."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise IngestError(400, "malformed", "Content-Length is not a number") from None
        if length > max_size:
            raise _too_large(max_size, "the body")
    decoder = _decoder(headers.get("content-encoding", "").strip().lower())
    out = bytearray()
    received = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected before sending the whole body")
        chunk: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        received += len(chunk)
        if received > max_size:
            raise _too_large(max_size, "the body")
        if decoder is None:
            out += chunk
        else:
            decoder.feed(chunk, out, max_size)
    if decoder is not None and received and not decoder.finished:
        raise IngestError(400, "malformed", "the compressed body is truncated")
    return bytes(out)


class IngestEndpoint:
    """The ASGI endpoint for ``POST /api/{project_id}/envelope/`` and ``.../store/``."""

    def __init__(
        self,
        storage: Store,
        metrics: CollectorMetrics,
        *,
        kind: str,
        max_body: int = DEFAULT_MAX_BODY,
        processors: Sequence[Processor] = (),
        on_stored: Optional[list[OnStored]] = None,
        keys: Optional[KeyCache] = None,
    ) -> None:
        if kind not in ("envelope", "store"):
            raise ValueError(f"kind must be 'envelope' or 'store', not {kind!r}")
        self.storage = storage
        self.metrics = metrics
        self.kind = kind
        self.max_body = max_body
        self.processors = list(processors)
        self.on_stored: list[OnStored] = on_stored if on_stored is not None else []
        self.keys = keys or KeyCache(storage)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS":
            await _respond(send, 200, {}, _CORS_PREFLIGHT)
            return
        if scope["method"] != "POST":
            await _respond(
                send, 405, {"detail": "use POST to send events"}, {"Allow": "POST, OPTIONS"}
            )
            return
        headers = _headers(scope)
        try:
            status, body = await self._ingest(scope, receive, headers)
        except IngestError as error:
            self.metrics.rejected(error.reason)
            extra = {"X-Sentry-Error": error.detail[:200], **error.headers}
            await _respond(send, error.status, {"detail": error.detail}, extra)
            return
        except ClientDisconnected:
            self.metrics.rejected("disconnected")
            return
        except Exception:
            self.metrics.rejected("internal_error")
            raise
        await _respond(send, status, body, {})

    async def _ingest(
        self, scope: Scope, receive: Receive, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        project_id = _project_id(scope)
        key = _key_from_request(scope, headers)
        if key is None and self.kind == "store":
            raise _missing_auth()
        body = await read_body(receive, headers, self.max_body)
        started = time.perf_counter()
        envelope_event_id: Optional[str] = None
        envelope: Optional[Envelope] = None
        if self.kind == "envelope":
            try:
                envelope = parse_envelope(body)
            except EnvelopeError as exc:
                raise IngestError(400, "malformed", f"malformed envelope: {exc}") from None
            if key is None:
                key = _key_from_envelope_dsn(envelope.headers.get("dsn"), project_id)
            header_id = envelope.headers.get("event_id")
            envelope_event_id = header_id if isinstance(header_id, str) else None
            raw_events, others = _split_items(envelope)
        else:
            raw_events, others = [(0, body)], []
        if key is None:
            raise _missing_auth()
        project = await self.keys.authorize(key, project_id)
        checkins = self._other_items(others) if others else []
        self.metrics.received(len(raw_events))
        if len(body) > PREPARE_INLINE_MAX:  # parsing and trimming it would stall the loop
            events = await run_in_threadpool(
                self._prepare_all, raw_events, project, envelope_event_id
            )
        else:
            events = self._prepare_all(raw_events, project, envelope_event_id)
        if checkins:  # stored once every item was found valid
            await self._store_checkins(project, checkins)
        kept = [event for event in events if event is not None]
        if len(kept) < len(events):
            self.metrics.rejected("filtered", len(events) - len(kept))
        if not kept:
            return 200, {"id": _valid_event_id(envelope_event_id)}
        first_id = kept[0].event_id
        try:
            outcomes = await self.storage.store_outcomes_async(project.id, kept)
        except StorageFull as exc:
            raise IngestError(503, "overloaded", str(exc), {"Retry-After": "1"}) from None
        except StorageError as exc:  # the database as a whole: senders should retry later
            raise IngestError(503, "storage_unavailable", str(exc), {"Retry-After": "5"}) from None
        elapsed = time.perf_counter() - started
        stored = [outcome.stored for outcome in outcomes]
        self.metrics.stored(sum(stored), len(stored) - sum(stored), elapsed)
        self._notify(StoredEnvelope(project, kept, stored, body, is_reporting(), headers, outcomes))
        return 200, {"id": first_id}

    # --- items other than events ----------------------------------------------------------

    def _other_items(self, others: list[tuple[int, Item]]) -> list[CheckInItem]:
        """The check-ins, checked (IngestError 400 naming the item); every other item type
        that is not an event is counted as dropped under its type in /metrics."""
        checkins: list[CheckInItem] = []
        for index, item in others:
            if item.type == "check_in":
                checkins.append(_checkin(index, item))
            else:
                self.metrics.item_dropped(item.type)
        return checkins

    async def _store_checkins(self, project: Project, checkins: list[CheckInItem]) -> None:
        """Stored before the events: a sender retrying after a 503 sends them again, and one
        check_in_id is one check-in however often it comes."""
        for checkin in checkins:
            try:
                kept = await self.storage.checkin_async(project.id, checkin, time.time())
            except StorageFull as exc:
                raise IngestError(503, "overloaded", str(exc), {"Retry-After": "1"}) from None
            except StorageError as exc:
                detail = str(exc)
                raise IngestError(
                    503, "storage_unavailable", detail, {"Retry-After": "5"}
                ) from None
            self.metrics.checkin("stored" if kept else "monitor_limit")

    def _prepare_all(
        self,
        raw_events: list[tuple[int, bytes]],
        project: Project,
        default_id: Optional[str],
    ) -> list[Optional[PreparedEvent]]:
        return [self._prepare(index, payload, project, default_id) for index, payload in raw_events]

    def _prepare(
        self, index: int, payload: bytes, project: Project, default_id: Optional[str]
    ) -> Optional[PreparedEvent]:
        where = f"item {index} (event)" if self.kind == "envelope" else "the event"
        try:
            # The text stored as is (``original``) has its lone surrogates replaced too.
            text, event = parse_event_text(payload)
        except JSONDepthError as exc:
            raise IngestError(400, "too_deep", f"{where}: {exc}") from None
        except ValueError as exc:  # UnicodeDecodeError is one
            raise IngestError(400, "malformed", f"{where} is not valid JSON: {exc}") from None
        if not isinstance(event, dict):
            kind = json_type(event)
            raise IngestError(400, "malformed", f"{where} must be a JSON object, not {kind}")
        original: Optional[str] = text
        for processor in self.processors:
            original = None  # it may change the event
            event = processor(event, project)
            if event is None:
                return None
        try:
            return prepare_event(event, default_event_id=default_id, original=original)
        except EventError as exc:
            raise IngestError(400, "malformed", f"{where}: {exc}") from None

    def _notify(self, stored: StoredEnvelope) -> None:
        for hook in list(self.on_stored):
            try:
                hook(stored)
            except Exception:
                # The events are committed and acknowledged: a hook (forwarding) failing must
                # not turn that into an error for the sender; it is reported here instead.
                logger.exception("an on_stored hook failed")


def _split_items(envelope: Envelope) -> tuple[list[tuple[int, bytes]], list[tuple[int, Item]]]:
    """The events' payloads and the other items, each with its position (1-based)."""
    events: list[tuple[int, bytes]] = []
    others: list[tuple[int, Item]] = []
    for index, item in enumerate(envelope.items, 1):
        if item.headers.get("type") == "event":
            events.append((index, item.payload))
        else:
            others.append((index, item))
    return events, others


def _checkin(index: int, item: Item) -> CheckInItem:
    where = f"item {index} (check_in)"
    try:
        return parse_checkin(item.json())
    except JSONDepthError as exc:
        raise IngestError(400, "too_deep", f"{where}: {exc}") from None
    except CheckInError as exc:
        raise IngestError(400, "malformed", f"{where}: {exc}") from None
    except ValueError as exc:
        raise IngestError(400, "malformed", f"{where} is not valid JSON: {exc}") from None


class KeyCache:
    """Public keys to projects, in memory. An unknown key is looked up in the database (in a
    thread, off the event loop), so keys made by ``selfreport project create`` work at once.

    Keys are never removed, so a known key needs no database at all: in particular the
    collector's own reports, ingested inside the reporting path, never start a thread there.
    """

    def __init__(self, storage: Store) -> None:
        self.storage = storage
        self._keys: dict[str, int] = {}
        self._projects: dict[int, Project] = {}

    def load(self) -> None:
        """Read every key and project (blocking: at start-up, or in a thread)."""
        self._projects = {p.id: p for p in self.storage.projects()}
        self._keys = self.storage.keys()

    async def authorize(self, key: str, project_id: int) -> Project:
        """The project ``key`` may send to, or :class:`IngestError` 403/404."""
        if key not in self._keys or project_id not in self._projects:
            await run_in_threadpool(self.load)
        project = self._projects.get(project_id)
        if project is None:
            raise IngestError(404, "unknown_project", f"there is no project {project_id}")
        owner = self._keys.get(key)
        if owner is None:
            raise IngestError(403, "forbidden", "unknown key: check the DSN's public key")
        if owner != project_id:
            raise IngestError(403, "forbidden", f"the key is not valid for project {project_id}")
        return project


_CORS_PREFLIGHT = {
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "content-type, content-encoding, x-sentry-auth, "
    "authorization, sentry-trace, baggage",
    "Access-Control-Max-Age": "3600",
}


def _missing_auth() -> IngestError:
    return IngestError(
        401,
        "unauthorized",
        "missing authentication: send an X-Sentry-Auth header with sentry_key=..., "
        "or a sentry_key query parameter",
    )


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _project_id(scope: Scope) -> int:
    raw = str(scope.get("path_params", {}).get("project_id", ""))
    project_id = parse_id(raw)
    if project_id is None:
        raise IngestError(404, "unknown_project", f"there is no project {raw[:40]!r}")
    return project_id


def _valid_event_id(value: Optional[str]) -> Optional[str]:
    """The envelope header's event_id, echoed only when it is one (it is not checked else)."""
    try:
        return None if value is None else normalize_event_id(value)
    except EventError:
        return None


def _key_from_request(scope: Scope, headers: Mapping[str, str]) -> Optional[str]:
    for name in ("x-sentry-auth", "authorization"):
        value = headers.get(name)
        if value and value.strip()[:7].lower() == "sentry ":
            key = parse_auth_header(value).get("sentry_key")
            if key:
                return key
    query: bytes = scope.get("query_string", b"")
    for name, value in parse_qsl(query.decode("latin-1")):
        if name == "sentry_key" and value:
            return value
    return None


def _key_from_envelope_dsn(dsn: object, project_id: int) -> Optional[str]:
    """Browser SDKs tunnelling through a proxy authenticate with the envelope's ``dsn``."""
    if not isinstance(dsn, str):
        return None
    try:
        parsed = parse_dsn(dsn)
    except ConfigError as exc:
        detail = f"the envelope header's dsn is invalid: {exc}"
        raise IngestError(401, "unauthorized", detail) from None
    if parsed.project_id != str(project_id):
        raise IngestError(403, "forbidden", "the envelope header's dsn is for another project")
    return parsed.public_key


async def _respond(
    send: Send, status: int, body: Mapping[str, Any], headers: Mapping[str, str]
) -> None:
    payload = json.dumps(body).encode() if body or status != 200 else b""
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"access-control-allow-origin", b"*"),
        (b"access-control-expose-headers", b"x-sentry-error, x-sentry-rate-limits, retry-after"),
    ]
    raw += [
        (k.lower().encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers.items()
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
