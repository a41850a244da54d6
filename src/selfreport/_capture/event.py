"""Snapshotting an error on the caller's thread and building the Sentry event from it later."""

from __future__ import annotations

import linecache
import logging
import os
import platform
import random
import socket
import sys
import sysconfig
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from itertools import islice
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from selfreport._core.excgroups import group_members
from selfreport._core.guard import originated_in_reporting_path
from selfreport._core.text import MAX_STRING, safe_repr, safe_str
from selfreport._version import __version__

if TYPE_CHECKING:
    from selfreport._admission.admission import Fingerprint
    from selfreport._capture.scope import ScopeState

__all__ = [
    "SDK_INFO",
    "Capture",
    "ExcInfo",
    "add_request",
    "build_event",
    "capture_from_exception",
    "capture_from_message",
    "capture_from_record",
    "plain_copy",
    "plain_mapping",
    "safe_repr",  # re-exported from _core.text, where they live
    "safe_str",
]

ExcInfo = tuple[type[BaseException], BaseException, Optional[TracebackType]]

SDK_NAME = "selfreport.python"
SDK_INFO = {"name": SDK_NAME, "version": __version__}

MAX_FRAMES = 100
MAX_CHAINED = 10
MAX_EXCEPTIONS = 50  # values in one event: chained and group members together
MAX_ITEMS = 100  # entries kept of each container in extra data
MAX_TAG = 200  # Sentry's limit for tag keys and values
CONTEXT_LINES = 5

_LEVELS = {
    logging.CRITICAL: "fatal",
    logging.ERROR: "error",
    logging.WARNING: "warning",
    logging.INFO: "info",
    logging.DEBUG: "debug",
}
_VALID_LEVELS = frozenset(("fatal", "error", "warning", "info", "debug"))

# Attributes every LogRecord has; anything else came from ``extra=`` and goes to event.extra.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)


# _RENDERING: a user's __str__ or __repr__ may raise anything, SystemExit and KeyboardInterrupt
# included. Plain logging with a handler that renders nothing (NullHandler) would not have
# raised, so neither does selfreport: the object is shown as unprintable. (logging's own
# handlers catch only Exception, but they render for the application, not for a reporter.)


def _json_safe(value: object) -> object:
    """Keep JSON scalars as they are; render anything else now, as it is at call time."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else safe_str(value)
    return safe_repr(value)


def plain_copy(
    value: object,
    depth: int = 8,
    redact: Optional[Callable[[str], bool]] = None,
    replacement: str = "[Filtered]",
) -> object:
    """``value`` as JSON data rendered now: mappings and lists copied (``MAX_ITEMS`` entries,
    ``depth`` levels), anything else as :func:`_json_safe` renders it; the values of keys for
    which ``redact`` is true are ``replacement``."""
    if isinstance(value, Mapping) and depth > 0:
        return plain_mapping(value, depth, redact, replacement)
    if isinstance(value, (list, tuple)) and depth > 0:
        return [plain_copy(item, depth - 1, redact, replacement) for item in value[:MAX_ITEMS]]
    return _json_safe(value)


def plain_mapping(
    value: Mapping[Any, object],
    depth: int = 8,
    redact: Optional[Callable[[str], bool]] = None,
    replacement: str = "[Filtered]",
) -> dict[str, object]:
    """:func:`plain_copy` of a mapping: keys as strings, values copied ``depth - 1`` levels."""
    out: dict[str, object] = {}
    for key, item in islice(value.items(), MAX_ITEMS):
        name = safe_str(key, MAX_TAG)
        redacted = redact is not None and redact(name)
        out[name] = replacement if redacted else plain_copy(item, depth - 1, redact, replacement)
    return out


def level_name(levelno: int) -> str:
    if levelno in _LEVELS:
        return _LEVELS[levelno]
    if levelno >= logging.CRITICAL:
        return "fatal"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"


class Capture:
    """What is taken on the caller's thread: cheap, rendered as it was at call time."""

    __slots__ = (
        "context",
        "event_id",
        "exc_info",
        "exc_values",
        "extra",
        "fingerprint",
        "formatted",
        "handled",
        "level",
        "logger",
        "mechanism",
        "message",
        "params",
        "repeats",
        "request",
        "scope",
        "tags",
        "thread",
        "timestamp",
        "vars",
    )

    def __init__(self, level: str) -> None:
        # Not uuid4(): os.urandom releases the GIL, and a busy worker then keeps the caller
        # waiting for a whole switch interval. Event ids need to be unique, not secret.
        self.event_id = f"{random.getrandbits(128):032x}"
        self.timestamp = time.time()
        self.level = level
        self.logger: Optional[str] = None
        self.message: Optional[str] = None
        self.params: Optional[list[object]] = None
        self.formatted: Optional[str] = None
        self.exc_info: Optional[ExcInfo] = None
        # str() of the chain and group members, with notes, rendered at call time
        self.exc_values: Optional[list[str]] = None
        self.mechanism = "generic"
        self.handled = True
        self.extra: Optional[dict[str, object]] = None
        self.tags: Optional[dict[str, str]] = None
        self.thread: Optional[str] = None
        self.repeats = 0
        # Its dedupe key, when dedupe is on: the event carries its grouping as "fingerprint".
        self.fingerprint: Optional[Fingerprint] = None
        self.context: Any = None  # the caller's contextvars.Context, for before_send
        self.vars: Optional[list[Optional[dict[str, str]]]] = None
        self.request: Optional[dict[str, Any]] = None  # an HTTP request, already filtered
        self.scope: Optional[ScopeState] = None  # tags, user, breadcrumbs... at capture time


def _kept_frame(index: int, count: int) -> bool:
    """Whether frame ``index`` of ``count`` is in the event: both ends of a deep traceback."""
    half = MAX_FRAMES // 2
    return count <= MAX_FRAMES or index < half or index >= count - half


def _snapshot_vars(tb: Optional[TracebackType]) -> list[Optional[dict[str, str]]]:
    entries: list[TracebackType] = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    out: list[Optional[dict[str, str]]] = []
    for index, entry in enumerate(entries):
        frame = entry.tb_frame
        if _kept_frame(index, len(entries)) and _in_app(frame.f_code.co_filename):
            out.append({k: safe_repr(v, 256) for k, v in list(frame.f_locals.items())[:50]})
        else:
            out.append(None)
    return out


def _exc_info_of(exc: BaseException) -> ExcInfo:
    return (type(exc), exc, exc.__traceback__)


class _Node(NamedTuple):
    """One exception of an event: where it sits in the tree of causes and group members."""

    exc: BaseException
    exception_id: int
    parent_id: Optional[int]
    source: Optional[str]  # "__cause__", "__context__" or "exceptions[i]", as sentry-sdk says
    is_group: bool


def _chained_from(exc: BaseException) -> tuple[Optional[BaseException], str]:
    if exc.__cause__ is not None:
        return exc.__cause__, "__cause__"
    if exc.__suppress_context__:
        return None, ""
    return exc.__context__, "__context__"


def _exception_tree(exc: BaseException) -> list[_Node]:
    """``exc``, what it was raised from or during, and the members of exception groups, depth
    first (Python's order of printing them; sentry-sdk's numbering). Members that escaped the
    reporting path are left out: they are the path's, not the application's."""
    nodes: list[_Node] = []
    seen: set[int] = set()
    # (exception, parent id, source, links of its cause chain so far)
    pending: list[tuple[BaseException, Optional[int], Optional[str], int]] = [(exc, None, None, 0)]
    while pending and len(nodes) < MAX_EXCEPTIONS:
        current, parent, source, links = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        members = group_members(current)
        node = _Node(current, len(nodes), parent, source, members is not None)
        nodes.append(node)
        later: list[tuple[BaseException, Optional[int], Optional[str], int]] = []
        cause, how = _chained_from(current)
        if cause is not None and links + 1 < MAX_CHAINED:
            later.append((cause, node.exception_id, how, links + 1))
        for index, member in enumerate(members or ()):
            if not originated_in_reporting_path(member):
                later.append((member, node.exception_id, f"exceptions[{index}]", 0))
        pending.extend(reversed(later))
    return nodes


def _render(exc: BaseException, is_group: bool = False) -> str:
    """``str(exc)`` with its PEP 678 notes, as Python prints them and sentry-sdk sends them; a
    group by its message alone (its members are values of their own, so is their count)."""
    try:
        message = getattr(exc, "message", None) if is_group else None
    except BaseException:  # a property of the user's own may raise anything
        message = None
    text = message if isinstance(message, str) else safe_str(exc)
    try:
        notes = getattr(exc, "__notes__", None)
        if isinstance(notes, list) and notes:
            text += "".join("\n" + note for note in notes[:20] if isinstance(note, str))
    except BaseException:  # a __getattr__ of the user's own may raise anything
        pass
    return safe_str(text)


def _set_exception(capture: Capture, exc: BaseException) -> None:
    # Exception messages are rendered now, like log arguments: the object may change later.
    capture.exc_values = [_render(node.exc, node.is_group) for node in _exception_tree(exc)]


def capture_from_record(record: logging.LogRecord, include_locals: bool = False) -> Capture:
    """Snapshot a log record; call inside the reporting path (argument ``__str__`` may log)."""
    capture = Capture(level_name(record.levelno))
    capture.timestamp = record.created
    capture.logger = record.name
    capture.mechanism = "logging"
    template = record.msg
    capture.message = safe_str(template)
    try:
        capture.formatted = safe_str(record.getMessage())
    except BaseException:
        capture.formatted = capture.message
    args = record.args
    if args:
        if isinstance(args, dict):
            capture.params = [_json_safe(args)]
        else:
            capture.params = [_json_safe(a) for a in args]
    if record.exc_info and record.exc_info[1] is not None:
        capture.exc_info = record.exc_info
        _set_exception(capture, record.exc_info[1])
        if include_locals:
            capture.vars = _snapshot_vars(record.exc_info[2])
    capture.thread = record.threadName
    extra = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}
    if extra:
        capture.extra = {k: _json_safe(v) for k, v in extra.items()}
    return capture


def capture_from_exception(
    exc: BaseException, mechanism: str, handled: bool, include_locals: bool = False
) -> Capture:
    capture = Capture("error")  # Sentry's convention; ``handled: false`` marks it uncaught
    capture.exc_info = _exc_info_of(exc)
    _set_exception(capture, exc)
    capture.mechanism = mechanism
    capture.handled = handled
    if include_locals:
        capture.vars = _snapshot_vars(exc.__traceback__)
    return capture


def capture_from_message(message: str, level: str) -> Capture:
    capture = Capture(level if level in _VALID_LEVELS else "error")
    capture.message = safe_str(message)
    capture.formatted = capture.message
    return capture


# --- building the event (worker thread) ------------------------------------------------------


def _not_app_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    prefixes = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    prefixes.add(os.path.dirname(os.path.abspath(__file__)))
    return tuple(os.path.join(p, "") for p in prefixes if p)


_NOT_APP = _not_app_prefixes()


def _in_app(filename: str) -> bool:
    if filename.startswith("<") or "site-packages" in filename or "dist-packages" in filename:
        return False
    return not os.path.abspath(filename).startswith(_NOT_APP)


def _frame_dict(
    frame: FrameType, lineno: int, variables: Optional[dict[str, str]]
) -> dict[str, Any]:
    code = frame.f_code
    abs_path = code.co_filename
    module = frame.f_globals.get("__name__")
    out: dict[str, Any] = {
        "filename": _short_filename(abs_path, module),
        "abs_path": abs_path,
        "function": getattr(code, "co_qualname", code.co_name),
        "lineno": lineno,
        "in_app": _in_app(abs_path),
    }
    if isinstance(module, str):  # Sentry's schema wants the key absent, not null
        out["module"] = module
    lines = linecache.getlines(abs_path, frame.f_globals) if lineno > 0 else []
    if 0 < lineno <= len(lines):
        start = max(0, lineno - 1 - CONTEXT_LINES)
        out["pre_context"] = [ln.rstrip("\r\n") for ln in lines[start : lineno - 1]]
        out["context_line"] = lines[lineno - 1].rstrip("\r\n")
        out["post_context"] = [ln.rstrip("\r\n") for ln in lines[lineno : lineno + CONTEXT_LINES]]
    if variables:
        out["vars"] = variables
    return out


def _short_filename(abs_path: str, module: object) -> str:
    if isinstance(module, str) and module and not abs_path.startswith("<"):
        base = module.split(".")[0]
        marker = os.sep + base + os.sep
        index = abs_path.rfind(marker)
        if index >= 0:
            return abs_path[index + 1 :]
        if os.path.basename(abs_path).startswith(base):
            return os.path.basename(abs_path)
    return abs_path


def _stacktrace(tb: Optional[TracebackType], variables: Optional[list[Any]]) -> dict[str, Any]:
    entries: list[tuple[int, TracebackType]] = []
    while tb is not None:
        entries.append((len(entries), tb))
        tb = tb.tb_next
    count = len(entries)  # keep both ends of a deep recursion, and build only those
    entries = [entry for entry in entries if _kept_frame(entry[0], count)]
    frames = []
    for index, entry in entries:
        frame_vars = variables[index] if variables and index < len(variables) else None
        frames.append(_frame_dict(entry.tb_frame, entry.tb_lineno, frame_vars))
    return {"frames": frames}


def _exception_values(exc: BaseException, capture: Capture) -> list[dict[str, Any]]:
    nodes = _exception_tree(exc)
    rendered = capture.exc_values
    if rendered is None or len(rendered) != len(nodes):
        rendered = [_render(node.exc, node.is_group) for node in nodes]
    # Ids only where a group makes a tree of it, as sentry-sdk does: a plain chain stays plain.
    tree = any(node.is_group for node in nodes)
    values = []
    for node, text in zip(reversed(nodes), reversed(rendered)):  # Sentry wants the oldest first
        is_outer = node.exception_id == 0
        exc_type = type(node.exc)
        module = exc_type.__module__
        value: dict[str, Any] = {
            "type": exc_type.__qualname__,
            "value": text,
            "stacktrace": _stacktrace(node.exc.__traceback__, capture.vars if is_outer else None),
        }
        if isinstance(module, str) and module != "builtins":
            value["module"] = module
        if is_outer:
            mechanism: dict[str, Any] = {"type": capture.mechanism, "handled": capture.handled}
        else:
            mechanism = {"type": "chained", "handled": True}
        if tree:
            mechanism["exception_id"] = node.exception_id
            if node.parent_id is not None:
                mechanism["parent_id"] = node.parent_id
            if node.source is not None:
                mechanism["source"] = node.source
            if node.is_group:
                mechanism["is_exception_group"] = True
        value["mechanism"] = mechanism
        values.append(value)
    return values


def iso_time(ts: float) -> str:
    """``ts`` (seconds since the epoch) as Sentry's ISO 8601 UTC timestamp."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _static_contexts() -> dict[str, Any]:
    return {
        "runtime": {
            "name": platform.python_implementation(),
            "version": platform.python_version(),
            "build": sys.version,
        },
        "os": {"name": platform.system(), "version": platform.release()},
    }


_CONTEXTS = _static_contexts()
_SERVER_NAME = socket.gethostname()


_REQUEST_FIELDS = ("method", "url", "headers", "query_string", "data", "cookies", "env")


def add_request(event: dict[str, Any], request: Mapping[str, Any]) -> None:
    """Sentry's request interface; the route names the transaction and is a tag, as in Sentry.
    What ``event`` already has (its request, tags, transaction) wins."""
    event.setdefault("request", {k: request[k] for k in _REQUEST_FIELDS if k in request})
    tags = {k: safe_str(request[k], 200) for k in ("route", "endpoint") if request.get(k)}
    if tags:
        event["tags"] = {**tags, **event.get("tags", {})}
    if request.get("route"):
        event.setdefault("transaction", safe_str(request["route"], 200))


def build_event(
    capture: Capture,
    environment: Optional[str] = None,
    release: Optional[str] = None,
    server_name: Optional[str] = None,
) -> dict[str, Any]:
    """The Sentry event for ``capture``; runs on the worker thread, inside the reporting path."""
    event: dict[str, Any] = {
        "event_id": capture.event_id,
        "timestamp": iso_time(capture.timestamp),
        "platform": "python",
        "level": capture.level,
        "sdk": dict(SDK_INFO),
        "server_name": server_name or _SERVER_NAME,
        "contexts": {k: dict(v) for k, v in _CONTEXTS.items()},
    }
    if capture.logger is not None:
        event["logger"] = capture.logger
    if environment:
        event["environment"] = environment
    if release:
        event["release"] = release
    if capture.message is not None:
        logentry: dict[str, Any] = {"message": capture.message}
        if capture.params:
            logentry["params"] = capture.params
        if capture.formatted is not None and capture.formatted != capture.message:
            logentry["formatted"] = capture.formatted
        event["logentry"] = logentry
    if capture.exc_info is not None:
        event["exception"] = {"values": _exception_values(capture.exc_info[1], capture)}
    if capture.request:
        add_request(event, capture.request)
    extra: dict[str, Any] = dict(capture.extra) if capture.extra else {}
    if capture.thread:
        extra["thread"] = capture.thread
    if capture.repeats:
        extra["selfreport_repeats"] = capture.repeats
    if extra:
        event["extra"] = extra
    if capture.tags:  # given to capture_exception: over the request's, under none
        event["tags"] = {**event.get("tags", {}), **capture.tags}
    if capture.fingerprint is not None:
        event["fingerprint"] = capture.fingerprint.grouping()
    if capture.scope is not None:
        capture.scope.apply(event)  # a method: this module need not import the scope's
    return event
