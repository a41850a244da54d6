"""Scopes: tags, user, contexts, extra and breadcrumbs per context, immutable, replaced on write."""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import time
import types
from collections.abc import Mapping
from itertools import islice
from typing import Any, Callable, NamedTuple, Optional

from selfreport._capture.event import _RECORD_ATTRS, iso_time, level_name, safe_repr, safe_str
from selfreport._core.diag import Diagnostics
from selfreport._core.guard import ReportingPath, SyncAndAsync, is_reporting
from selfreport._core.patching import Patches

__all__ = [
    "NewScope",
    "ScopeState",
    "add_breadcrumb",
    "apply_scope",
    "configure",
    "current_state",
    "install_propagation",
    "new_scope",
    "record_log_breadcrumb",
    "set_context",
    "set_extra",
    "set_tag",
    "set_tags",
    "set_user",
    "uninstall_propagation",
    "use_state",
]

# Limits, as Sentry and Relay apply them (tags: 200 characters a key or value), or as
# sentry-sdk's serializer trims data (depth); everything a caller hands us is bounded.
MAX_TAG_LENGTH = 200
MAX_TAGS = 200
MAX_KEYS = 100  # contexts, extra keys, user fields
MAX_DEPTH = 5
MAX_ITEMS = 50  # per dict or list in data
MAX_VALUE = 1024  # characters of a string in data, and of a breadcrumb's message
MAX_BREADCRUMBS = 1000  # the largest max_breadcrumbs accepted
DEFAULT_MAX_BREADCRUMBS = 100

_LEVEL_ALIASES = {
    "fatal": "fatal",
    "critical": "fatal",
    "error": "error",
    "warning": "warning",
    "warn": "warning",
    "info": "info",
    "debug": "debug",
}
_LOG_LEVELS = {50: "fatal", 40: "error", 30: "warning", 20: "info", 10: "debug"}

# Told through the ``selfreport`` logger only (bad input is the caller's, not ours to print),
# at most once a minute per kind of mistake.
_diagnostics = Diagnostics(stream=lambda: None)


class _Fields:
    """Tags, user, contexts and extra of one scope; never changed once published in the var."""

    __slots__ = ("contexts", "extra", "tags", "user")

    def __init__(
        self,
        tags: dict[str, str],
        user: Optional[dict[str, Any]],
        contexts: dict[str, dict[str, Any]],
        extra: dict[str, Any],
    ) -> None:
        self.tags = tags
        self.user = user
        self.contexts = contexts
        self.extra = extra

    def replace(self, **changes: Any) -> _Fields:
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return _Fields(**values)


_EMPTY = _Fields({}, None, {}, {})

# A breadcrumb is a node of a persistent list, newest first: (timestamp, type, category, level,
# message, data, previous node, length). Adding one allocates one tuple; a snapshot is a
# reference; no context ever writes into a node another context can see.
_Crumb = tuple[float, str, Optional[str], str, Optional[str], Optional[dict[str, Any]], Any, int]

_fields: contextvars.ContextVar[_Fields] = contextvars.ContextVar(
    "selfreport_scope", default=_EMPTY
)
_crumbs: contextvars.ContextVar[Optional[_Crumb]] = contextvars.ContextVar(
    "selfreport_breadcrumbs", default=None
)
_limit = [DEFAULT_MAX_BREADCRUMBS]
# A context's chain grows to _SLACK times the limit before it is cut back to the limit: the
# copy that cutting takes is spread over (_SLACK - 1) * limit breadcrumbs.
_SLACK = 4


class ScopeState(NamedTuple):
    """The scope of a context at one moment: taken in O(1), never changed afterwards."""

    fields: _Fields
    crumbs: Optional[_Crumb]
    max_breadcrumbs: int = DEFAULT_MAX_BREADCRUMBS  # how many of them an event carries

    def apply(self, event: dict[str, Any]) -> None:
        """Put this scope into ``event`` (see :func:`apply_scope`)."""
        apply_scope(event, self)


def current_state(max_breadcrumbs: int = DEFAULT_MAX_BREADCRUMBS) -> ScopeState:
    """The calling context's scope, as it is now (what a capture keeps)."""
    return ScopeState(_fields.get(), _crumbs.get(), max_breadcrumbs)


def _not_counted() -> None:
    pass


# Set by selfreport.init (the capture stage knows no client): counts a breadcrumb dropped
# because it was added inside the reporting path.
_count_reentrant_breadcrumb: list[Callable[[], None]] = [_not_counted]


def configure(max_breadcrumbs: int, count_reentrant: Callable[[], None] = _not_counted) -> None:
    """How many breadcrumbs each context keeps (the global client's ``max_breadcrumbs``),
    and what counts one added inside the reporting path (the current client's counter)."""
    _limit[0] = max_breadcrumbs
    _count_reentrant_breadcrumb[0] = count_reentrant


def _warn(kind: str, message: str) -> None:
    _diagnostics.warn("scope:" + kind, message + " (dropped)")


# --- bounding what callers hand us -------------------------------------------------------------


def _text(value: object, limit: int) -> str:
    return safe_str(value, limit)


def _plain(value: object, depth: int = MAX_DEPTH) -> object:
    """``value`` as JSON data, rendered now and bounded (depth, items, string lengths)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 3] + "..."
    if depth > 0 and isinstance(value, Mapping):
        return {
            _text(k, MAX_TAG_LENGTH): _plain(v, depth - 1)
            for k, v in islice(value.items(), MAX_ITEMS)
        }
    if depth > 0 and isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth - 1) for v in islice(value, MAX_ITEMS)]
    return safe_repr(value, MAX_VALUE)


def _data(value: object) -> object:
    """:func:`_plain` inside the reporting path: a user's ``__repr__`` that logs is not reported."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return _plain(value)
    with ReportingPath():
        return _plain(value)


def _mapping(what: str, value: object) -> Optional[dict[str, Any]]:
    if not isinstance(value, Mapping):
        _warn(what, f"{what} must be a dict or None, got {type(value).__name__}")
        return None
    data = _data(dict(islice(value.items(), MAX_KEYS)))
    assert isinstance(data, dict)
    return data


def _key(what: str, key: object) -> Optional[str]:
    if isinstance(key, str) and 0 < len(key) <= MAX_TAG_LENGTH:
        return key
    _warn(what, f"{what} names must be strings of 1 to {MAX_TAG_LENGTH} characters: {key!r:.80}")
    return None


def _tag_value(key: str, value: object) -> Optional[str]:
    text = _text(value, MAX_TAG_LENGTH)
    if "\n" in text or "\r" in text:  # Relay refuses tag values with line breaks
        text = text.replace("\r", " ").replace("\n", " ")
    if not text:
        _warn("tag", f"tag {key!r} has an empty value")
        return None
    return text


# --- the public functions ------------------------------------------------------------------------


def _safely(func: Callable[..., None]) -> Callable[..., None]:
    """Never raise into the caller: a failure is told through the ``selfreport`` logger."""

    def call(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except Exception as error:
            _warn("error", f"{func.__name__} failed: {error!r}")

    call.__name__ = func.__name__
    call.__qualname__ = func.__qualname__
    call.__doc__ = func.__doc__
    call.__wrapped__ = func  # type: ignore[attr-defined]
    return call


def _put_tags(items: Any) -> None:
    fields = _fields.get()
    tags = dict(fields.tags)
    for key, value in items:
        name = _key("tag", key)
        text = _tag_value(name, value) if name is not None else None
        if name is None or text is None:
            continue
        if name not in tags and len(tags) >= MAX_TAGS:
            _warn("tags", f"more than {MAX_TAGS} tags: {name!r} not set")
            continue
        tags[name] = text
    _fields.set(fields.replace(tags=tags))


@_safely
def set_tag(key: str, value: object) -> None:
    """Set tag ``key`` to ``str(value)`` on every later event of this context (and the threads,
    tasks and executor jobs it starts). Keys and values are cut at 200 characters."""
    _put_tags([(key, value)])


@_safely
def set_tags(tags: Mapping[str, object]) -> None:
    """Set several tags at once, as :func:`set_tag` does each."""
    if not isinstance(tags, Mapping):
        _warn("tags", f"set_tags takes a dict, got {type(tags).__name__}")  # type: ignore[unreachable]
        return
    _put_tags(list(islice(tags.items(), MAX_TAGS)))


@_safely
def set_user(user: Optional[Mapping[str, object]]) -> None:
    """Set the user of later events (``id``, ``email``, ``username``, ``ip_address``, ...);
    ``None`` clears it."""
    value = None if user is None else _mapping("user", user)
    if user is not None and value is None:
        return
    _fields.set(_fields.get().replace(user=value))


def _put_keyed(what: str, name: object, value: object, *, mapping: bool) -> None:
    key = _key(what, name)
    if key is None:
        return
    fields = _fields.get()
    current: dict[str, Any] = getattr(fields, what)
    updated = dict(current)
    if value is None and mapping:
        updated.pop(key, None)
    else:
        data = _mapping(what, value) if mapping else _data(value)
        if mapping and data is None:
            return
        if key not in updated and len(updated) >= MAX_KEYS:
            _warn(what, f"more than {MAX_KEYS} {what} keys: {key!r} not set")
            return
        updated[key] = data
    _fields.set(fields.replace(**{what: updated}))


@_safely
def set_context(name: str, context: Optional[Mapping[str, object]]) -> None:
    """Set context ``name`` (a dict, shown as its own section of the event); ``None`` removes
    it. The runtime and os contexts selfreport adds can be overridden."""
    _put_keyed("contexts", name, context, mapping=True)


@_safely
def set_extra(key: str, value: object) -> None:
    """Set ``extra[key]`` of later events; ``value`` is rendered now, as JSON data, bounded."""
    _put_keyed("extra", key, value, mapping=False)


def _push(
    timestamp: float,
    kind: str,
    category: Optional[str],
    level: str,
    message: Optional[str],
    data: Optional[dict[str, Any]],
) -> None:
    limit = _limit[0]
    if limit <= 0:
        return
    previous = _crumbs.get()
    length = previous[7] + 1 if previous is not None else 1
    if length > _SLACK * limit:  # keep the newest ``limit``: amortized O(1) per breadcrumb
        previous, length = _trimmed(previous, limit - 1), limit
    _crumbs.set((timestamp, kind, category, level, message, data, previous, length))


def _trimmed(node: Optional[_Crumb], keep: int) -> Optional[_Crumb]:
    newest: list[_Crumb] = []
    while node is not None and len(newest) < keep:
        newest.append(node)
        node = node[6]
    rebuilt: Optional[_Crumb] = None
    for index, old in enumerate(reversed(newest)):
        rebuilt = (*old[:6], rebuilt, index + 1)
    return rebuilt


def _level(level: object) -> str:
    if isinstance(level, str):
        known = _LEVEL_ALIASES.get(level.lower())
        if known is not None:
            return known
    elif isinstance(level, int) and level in _LOG_LEVELS:
        return _LOG_LEVELS[level]
    _warn("level", f"unknown breadcrumb level {level!r:.40}, recorded as 'info'")
    return "info"


@_safely
def add_breadcrumb(
    message: Optional[str] = None,
    *,
    category: Optional[str] = None,
    level: str = "info",
    data: Optional[Mapping[str, object]] = None,
    type: str = "default",
) -> None:
    """Record a breadcrumb: later events of this context carry the newest ``max_breadcrumbs``.

    Breadcrumbs recorded inside the reporting path (a ``before_send`` that logs, say) are
    dropped and counted in ``stats()["breadcrumbs_dropped_reentrant"]``.
    """
    if is_reporting():
        _count_reentrant_breadcrumb[0]()
        return
    text = None if message is None else _text(message, MAX_VALUE)
    crumb_data = None if data is None else _mapping("breadcrumb data", data)
    kind = _text(type, 64) if type else "default"
    name = None if category is None else _text(category, MAX_TAG_LENGTH)
    _push(time.time(), kind, name, _level(level), text, crumb_data)


def record_log_breadcrumb(record: logging.LogRecord) -> None:
    """A log record as a breadcrumb, rendered now (its message only) and bounded; the caller
    (the logging handler) has checked levels and the reporting path."""
    try:
        message = record.getMessage()
    except BaseException:  # a user's __str__ may raise anything; plain logging would not fail
        message = _text(record.msg, MAX_VALUE)
    if len(message) > MAX_VALUE:
        message = message[: MAX_VALUE - 3] + "..."
    data = _log_extra(record) if len(record.__dict__) > _RECORD_SIZE else None
    levelno = record.levelno
    level = _LOG_LEVELS[levelno] if levelno in _LOG_LEVELS else level_name(levelno)
    # _push, inlined: this runs for every breadcrumb-level log record.
    limit = _limit[0]
    if limit <= 0:
        return
    previous = _crumbs.get()
    length = previous[7] + 1 if previous is not None else 1
    if length > _SLACK * limit:
        previous, length = _trimmed(previous, limit - 1), limit
    _crumbs.set((record.created, "log", record.name, level, message, data, previous, length))


_RECORD_SIZE = len(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


def _log_extra(record: logging.LogRecord) -> Optional[dict[str, Any]]:
    """What ``extra=`` added to the record (sentry-sdk sends it as the breadcrumb's data)."""
    extra = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}
    return _mapping("breadcrumb data", extra) if extra else None


# --- new_scope ---------------------------------------------------------------------------------


class NewScope(SyncAndAsync):
    """``with new_scope():`` / ``async with new_scope():``, see :func:`new_scope`."""

    __slots__ = ("_saved", "_tokens")

    def __init__(self) -> None:
        self._tokens: list[tuple[contextvars.Token[Any], ...]] = []
        self._saved: list[ScopeState] = []

    def __enter__(self) -> NewScope:
        state = current_state()
        # The same immutable values: the first write inside replaces them in this context only.
        self._saved.append(state)
        self._tokens.append((_fields.set(state.fields), _crumbs.set(state.crumbs)))
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._tokens:
            return
        fields_token, crumbs_token = self._tokens.pop()
        saved = self._saved.pop()
        try:
            _fields.reset(fields_token)
            _crumbs.reset(crumbs_token)
        except ValueError:  # left in another context (a generator resumed elsewhere)
            _fields.set(saved.fields)
            _crumbs.set(saved.crumbs)


def new_scope() -> NewScope:
    """A context manager (``with`` or ``async with``) isolating what is set inside it.

    Inside, tags, user, contexts, extra and breadcrumbs start as they were outside; whatever
    is set or recorded inside is gone when the block ends, and was never visible to any other
    thread, task or request. Threads, asyncio tasks and executor jobs get the same isolation
    by themselves: each starts with its parent's scope and keeps its changes to itself.
    """
    return NewScope()


class use_state:
    """Run a block in ``state`` (a WSGI response iterated after the app returned), then keep
    what the block changed as ``self.state`` for the next block."""

    __slots__ = ("_tokens", "state")

    def __init__(self, state: ScopeState) -> None:
        self.state = state
        self._tokens: Optional[tuple[contextvars.Token[Any], ...]] = None

    def __enter__(self) -> use_state:
        self._tokens = (_fields.set(self.state.fields), _crumbs.set(self.state.crumbs))
        return self

    def __exit__(self, *exc: object) -> None:
        self.state = current_state()
        if self._tokens is not None:
            _fields.reset(self._tokens[0])
            _crumbs.reset(self._tokens[1])
            self._tokens = None


# --- applying a state to an event (worker thread) -----------------------------------------------


def _breadcrumbs(node: Optional[_Crumb], limit: int) -> list[dict[str, Any]]:
    newest: list[_Crumb] = []
    while node is not None and len(newest) < limit:
        newest.append(node)
        node = node[6]
    out = []
    for timestamp, kind, category, level, message, data, _, _ in reversed(newest):
        crumb: dict[str, Any] = {"timestamp": iso_time(timestamp), "type": kind, "level": level}
        if category is not None:
            crumb["category"] = category
        if message is not None:
            crumb["message"] = message
        if data:
            crumb["data"] = data
        out.append(crumb)
    return out


def apply_scope(event: dict[str, Any], state: ScopeState) -> None:
    """Put ``state`` into ``event``: what the event set itself (its request's tags, its log
    record's extra) wins over the scope's, as in sentry-sdk."""
    fields = state.fields
    if fields.tags:
        event["tags"] = {**fields.tags, **event.get("tags", {})}
    if fields.user is not None:
        event["user"] = dict(fields.user)
    if fields.contexts:
        event.setdefault("contexts", {}).update(
            {name: dict(value) for name, value in fields.contexts.items()}
        )
    if fields.extra:
        event["extra"] = {**fields.extra, **event.get("extra", {})}
    crumbs = _breadcrumbs(state.crumbs, state.max_breadcrumbs)
    if crumbs:
        event["breadcrumbs"] = {"values": crumbs}


# --- isolation for threads and executor jobs ------------------------------------------------------


def _entering(state: ScopeState, func: Callable[..., Any]) -> Callable[..., Any]:
    def run_in_scope(*args: Any, **kwargs: Any) -> Any:
        tokens = (_fields.set(state.fields), _crumbs.set(state.crumbs))
        try:
            return func(*args, **kwargs)
        finally:
            _fields.reset(tokens[0])
            _crumbs.reset(tokens[1])

    return run_in_scope


def _thread_start(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    state = current_state()
    # A new thread starts in an empty context: it needs the parent's scope only if there is one.
    if (state.fields is not _EMPTY or state.crumbs is not None) and isinstance(
        instance, threading.Thread
    ):
        run: Callable[..., Any] = instance.run
        func = getattr(run, "__func__", None)
        # A bound method still, for other patches of Thread.start (see guard._thread_start).
        if func is not None and getattr(run, "__self__", None) is instance:
            setattr(instance, "run", types.MethodType(_entering(state, func), instance))  # noqa: B010
        else:
            setattr(instance, "run", _entering(state, run))  # noqa: B010
    return wrapped(*args, **kwargs)


def _executor_submit(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    # Always: a pool thread runs job after job in one context, so every job gets its own.
    if args:
        args = (_entering(current_state(), args[0]), *args[1:])
    return wrapped(*args, **kwargs)


_propagation = Patches(
    (threading.Thread, "start", _thread_start),
    (concurrent.futures.ThreadPoolExecutor, "submit", _executor_submit),
)


def install_propagation() -> None:
    """Give threads and executor jobs their parent's scope, each isolated (with the hooks)."""
    _propagation.install()


def uninstall_propagation() -> None:
    """Undo :func:`install_propagation`."""
    _propagation.uninstall()
