"""Admission: what makes two events the same (Fingerprint), dedupe, then the token bucket."""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from types import TracebackType
from typing import Callable, NamedTuple, Optional

from selfreport._core.diag import Diagnostics
from selfreport._core.excgroups import BUILTIN_GROUP, first_leaf
from selfreport._core.text import safe_str

from .ratelimit import Clock, TokenBucket

__all__ = ["LABEL_CHARS", "Admission", "Deduper", "Fingerprint"]

# Characters of each text in a fingerprint that dedupe keeps, to describe it in summaries.
LABEL_CHARS = 200


class Fingerprint(NamedTuple):
    """What makes two events "the same" for dedupe: logger, message template, exception type
    and where it was raised (``level`` tells plain messages apart; ``module`` and ``function``
    of the raising frame name the place in :meth:`grouping`).

    :meth:`grouping` is the Sentry ``fingerprint`` every admitted event and its repeat summary
    carry, so a collector counts the repeats under the original issue.
    """

    logger: Optional[str]
    template: Optional[str]
    exc_type: Optional[type] = None
    filename: str = ""
    lineno: int = 0
    level: Optional[str] = None
    module: str = ""
    function: str = ""

    @classmethod
    def of(
        cls, logger: Optional[str], template: Optional[str], exc: Optional[BaseException]
    ) -> Fingerprint:
        """The fingerprint of an event from ``logger`` with ``template`` and/or ``exc``."""
        # tuple.__new__: this runs for every captured event; NamedTuple's own __new__ is a
        # Python function, twice as slow.
        if exc is None:
            return _new(cls, (logger, template, None, "", 0, None, "", ""))
        # A group is the same error as its first leaf: every TaskGroup's group is raised at
        # the same line of asyncio, which would fold unrelated failures into one.
        if BUILTIN_GROUP is None or isinstance(exc, BUILTIN_GROUP):
            exc = first_leaf(exc)
        where = _innermost_location(exc.__traceback__)
        return _new(cls, (logger, template, type(exc), where[0], where[1], None, *where[2:]))

    def label(self) -> Fingerprint:
        """This fingerprint with its texts cut to ``LABEL_CHARS``: enough to describe it."""
        logger, template, exc_type, filename, lineno, level, module, function = self
        if (
            (logger is None or len(logger) <= LABEL_CHARS)
            and (template is None or len(template) <= LABEL_CHARS)
            and len(filename) <= LABEL_CHARS
            and len(module) <= LABEL_CHARS
            and len(function) <= LABEL_CHARS
        ):
            return self  # the usual case: short already, and immutable
        return _new(
            Fingerprint,
            (
                None if logger is None else logger[:LABEL_CHARS],
                None if template is None else template[:LABEL_CHARS],
                exc_type,
                filename[-LABEL_CHARS:],
                lineno,
                level,
                module[:LABEL_CHARS],
                function[:LABEL_CHARS],
            ),
        )

    def grouping(self) -> list[str]:
        """The Sentry ``fingerprint`` list: the same for an event and its repeat summary,
        stable across processes (Python's ``hash`` is not) and hosts (module and function,
        not file path and line, like the collector's default grouping), from the label."""
        label = self.label()
        parts = ["selfreport", label.logger or "", label.template or ""]
        if label.exc_type is not None:
            parts += [_type_name(label.exc_type), label.module, label.function]
        if label.level is not None:
            parts.append(label.level)
        return parts

    def describe(self) -> str:
        """Words for a repeat summary: exception type and place, and/or the message."""
        described = []
        if self.exc_type is not None:
            where = f" at {os.path.basename(self.filename)}:{self.lineno}" if self.filename else ""
            described.append(f"{_type_name(self.exc_type)}{where}")
        if self.template is not None:
            described.append(repr(safe_str(self.template, LABEL_CHARS)))
        return " logged as ".join(described) or "an event"

    def summary_text(self, repeats: int) -> str:
        """The message of the event that reports ``repeats`` folded, never-sent repeats."""
        return (
            f"selfreport: {repeats} more occurrence(s) of {self.describe()} were folded by "
            "dedupe and not sent"
        )


_new = tuple.__new__


def _type_name(exc_type: type) -> str:
    return exc_type.__qualname__


def _innermost_location(tb: Optional[TracebackType]) -> tuple[str, int, str, str]:
    """File, line, module and function of the frame that raised."""
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return ("", 0, "", "")
    frame = last.tb_frame
    module = frame.f_globals.get("__name__")
    code = frame.f_code
    return (
        code.co_filename,
        last.tb_lineno,
        module if isinstance(module, str) else "",
        code.co_name,
    )


def _label(fingerprint: object) -> object:
    """``fingerprint`` with every text cut to ``LABEL_CHARS``: enough to describe it."""
    if isinstance(fingerprint, Fingerprint):
        return fingerprint.label()
    if isinstance(fingerprint, str):
        return fingerprint[:LABEL_CHARS]
    if isinstance(fingerprint, tuple):
        return tuple(p[:LABEL_CHARS] if isinstance(p, str) else p for p in fingerprint)
    return fingerprint


class _Seen:
    # ``label`` only once there are repeats to describe: most fingerprints of a storm of
    # distinct errors are seen once, and cutting their texts would be wasted work.
    __slots__ = ("first", "label", "repeats")

    def __init__(self, first: float) -> None:
        self.first = first
        self.label: object = None
        self.repeats = 0


class Deduper:
    """Sends the first event of a fingerprint, folds repeats within ``window`` seconds.

    :meth:`admit` returns ``None`` for a repeat (to be dropped) or the number of earlier repeats
    that the admitted event should carry. ``window <= 0`` disables dedupe. Memory is bounded in
    bytes, not only in keys: per fingerprint, a 64-bit digest (Python's ``hash``: keyed
    SipHash for texts, cached per string) and its texts cut to ``LABEL_CHARS`` characters (for
    the repeat summaries), however long the message was.
    """

    def __init__(self, window: float, max_keys: int = 10_000, clock: Clock = time.monotonic):
        self.window = float(window)
        self.max_keys = max_keys
        self._clock = clock
        self._seen: OrderedDict[int, _Seen] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, fingerprint: object) -> Optional[int]:
        if self.window <= 0:
            return 0
        key = hash(fingerprint)
        with self._lock:
            now = self._clock()
            entry = self._seen.get(key)
            if entry is not None and now - entry.first < self.window:
                if not entry.repeats:
                    entry.label = _label(fingerprint)
                entry.repeats += 1
                return None
            if entry is None:
                self._seen[key] = _Seen(now)
                carried = 0
            else:  # its repeats are carried by this event: start afresh
                carried = entry.repeats
                entry.first = now
                entry.repeats = 0
                self._seen.move_to_end(key)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return carried

    def fold(self, fingerprint: object) -> bool:
        """Fold ``fingerprint`` if it is a repeat (as :meth:`admit` would); False, changing
        nothing, if it is not: for an event dropped whatever dedupe says."""
        if self.window <= 0:
            return False
        key = hash(fingerprint)
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or self._clock() - entry.first >= self.window:
                return False
            if not entry.repeats:
                entry.label = _label(fingerprint)
            entry.repeats += 1
            return True

    def forget(self, fingerprint: object, carried: int) -> None:
        """Undo :meth:`admit` for an event dropped after all (rate limit, full queue): the next
        occurrence is admitted as a first one and carries ``carried`` plus any repeats since."""
        if self.window <= 0:
            return
        key = hash(fingerprint)
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                return
            entry.first = -math.inf
            entry.repeats += carried  # carried > 0 only after a repeat, which set the label

    def pending(self) -> dict[object, int]:
        """Fingerprints (texts cut to ``LABEL_CHARS``) with repeats not yet carried by any
        event, and how many; clears them."""
        out: dict[object, int] = {}
        with self._lock:
            for seen in self._seen.values():
                if seen.repeats:
                    out[seen.label] = out.get(seen.label, 0) + seen.repeats
                    seen.repeats = 0
        return out

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()


class Admission:
    """Per-fingerprint dedupe, then the global token bucket: whether an event may be sent.

    The one admission of the core client and the sentry-sdk integration. Drops are counted
    through ``count`` (``dropped_rate_limited``, and ``deduplicated`` for repeats) and a full
    bucket is told once through ``diagnostics``.
    """

    def __init__(
        self,
        rate_limit: float,
        rate_burst: int,
        dedupe_window: float,
        *,
        count: Callable[[str], None],
        diagnostics: Diagnostics,
        what: str = "events",
    ) -> None:
        self.bucket = TokenBucket(rate_limit, rate_burst)
        self.deduper = Deduper(dedupe_window)
        self._count = count
        self._diagnostics = diagnostics
        self._limited_message = f"rate limit reached: dropping {what}"
        # Whether repeats are folded (and so events carry their fingerprint's grouping).
        self.dedupes = self.deduper.window > 0

    def admit(self, fingerprint: Fingerprint) -> Optional[int]:
        """The repeats the admitted event carries, or None when it is dropped (and counted):
        :meth:`dedupe`, then :meth:`take`."""
        repeats = self.dedupe(fingerprint)
        if repeats is None or not self.take(fingerprint, repeats):
            return None
        return repeats

    @property
    def bucket(self) -> TokenBucket:
        return self._bucket

    @bucket.setter
    def bucket(self, bucket: TokenBucket) -> None:
        self._bucket = bucket
        # Whether the bucket is empty: whatever dedupe says, the event will not be sent (the
        # bucket's own method, not a wrapper: asked for every error of a storm).
        self.limited: Callable[[], bool] = bucket.empty

    def fold(self, fingerprint: Fingerprint) -> bool:
        """Whether ``fingerprint`` is a repeat: folded into the count the next event sent for
        it carries, and counted. What :meth:`dedupe` does for a repeat; nothing otherwise."""
        if self.deduper.fold(fingerprint):
            self._count("dropped_rate_limited")
            self._count("deduplicated")
            return True
        return False

    def drop_limited(self) -> None:
        """Count an event that is no repeat, dropped while :meth:`limited`: what :meth:`dedupe`
        followed by a refused :meth:`take` would leave, for less work (the path of every error
        of a storm)."""
        self._count("dropped_rate_limited")
        self._diagnostics.warn("rate_limited", self._limited_message)

    def dedupe(self, fingerprint: Fingerprint) -> Optional[int]:
        """The repeats a first occurrence carries, or None for a repeat (counted)."""
        repeats = self.deduper.admit(fingerprint)
        if repeats is None:
            self._count("dropped_rate_limited")
            self._count("deduplicated")
        return repeats

    def take(self, fingerprint: Fingerprint, repeats: int) -> bool:
        """A token from the bucket for an event :meth:`dedupe` let through; False (counted)
        when it is empty."""
        if self.bucket.take():
            return True
        # Not sent, so not a first occurrence either: the next one may go, carrying these.
        self.deduper.forget(fingerprint, repeats)
        self._count("dropped_rate_limited")
        self._diagnostics.warn("rate_limited", self._limited_message)
        return False

    def forget(self, fingerprint: Fingerprint, carried: int) -> None:
        """An admitted event was dropped after all (full queue): see :meth:`Deduper.forget`."""
        self.deduper.forget(fingerprint, carried)

    def pending(self) -> dict[Fingerprint, int]:
        """Fingerprints (cut to labels) with repeats no event carried yet; clears them."""
        return {
            fingerprint: repeats
            for fingerprint, repeats in self.deduper.pending().items()
            if isinstance(fingerprint, Fingerprint)
        }

    def reset_after_fork(self) -> None:
        self.bucket.reset_after_fork()
        self.deduper.reset_after_fork()
