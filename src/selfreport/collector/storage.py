"""The SQLite backend of the collector's Store: one writer thread, WAL, retention."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from selfreport._core.guard import reporting_path

from .alerting.monitors import (
    CheckIn,
    CheckInItem,
    Monitor,
    MonitorConfigError,
    parse_monitor_config,
)
from .events import PreparedEvent
from .store import (
    DEFAULT_PROJECT,
    INTERNAL_PROJECT,
    ISSUE_STATUSES,
    AlertRecord,
    ApiToken,
    Event,
    EventOutcome,
    Issue,
    OutboxEntry,
    Project,
    StorageError,
    StorageFull,
    User,
)

__all__ = [
    "INTERNAL_PROJECT",
    "Event",
    "Issue",
    "Project",
    "SqliteStorage",
    "Storage",
    "StorageError",
    "StorageFull",
]

logger = logging.getLogger("selfreport.collector")

SCHEMA_VERSION = "1"
MIN_STORAGE_BYTES = 2**20
# What a stored event costs beyond its payload (row, indexes), about.
_ROW_OVERHEAD = 300
_MAX_SPACE_STEP = 32 * 2**20  # bytes of events retention by size deletes at most per step
_BATCH_SLACK = 64 * 1024
_ROOM_RECHECK = 1.0  # seconds
# The stored size of an event's payload. octet_length() (SQLite 3.43) takes it from the
# record header; length(CAST(...)) has to read the whole text.
_PAYLOAD_BYTES = (
    "octet_length(payload)"
    if sqlite3.sqlite_version_info >= (3, 43)
    else "length(CAST(payload AS BLOB))"
)
_VACUUM_PAGES = 2048  # pages given back to the disk at most per step
MAX_IGNORE_COUNT = 10**9
MAX_HISTOGRAM_BUCKETS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    internal INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    public_key TEXT PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects (id),
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS issues (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL REFERENCES projects (id),
    fingerprint TEXT NOT NULL,
    title TEXT NOT NULL,
    culprit TEXT NOT NULL,
    level TEXT NOT NULL,
    environment TEXT,
    release TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    times_seen INTEGER NOT NULL,
    last_event_id TEXT NOT NULL,
    UNIQUE (project_id, fingerprint)
);
CREATE INDEX IF NOT EXISTS issues_by_last_seen ON issues (last_seen);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL REFERENCES projects (id),
    issue_id INTEGER NOT NULL REFERENCES issues (id),
    event_id TEXT NOT NULL,
    received REAL NOT NULL,
    timestamp REAL NOT NULL,
    level TEXT NOT NULL,
    environment TEXT,
    release TEXT,
    payload TEXT NOT NULL,
    UNIQUE (project_id, event_id)
);
CREATE INDEX IF NOT EXISTS events_by_issue ON events (issue_id, id);
CREATE INDEX IF NOT EXISTS events_by_project ON events (project_id, id);
CREATE INDEX IF NOT EXISTS events_by_received ON events (received);
CREATE INDEX IF NOT EXISTS events_by_environment ON events (environment);
"""

# Who may read: users (scrypt hashes), their sessions and API tokens (sha256 of the secret
# part: a copy of the database gives no way in), and the server secret that signs CSRF tokens.
_AUTH_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
"""

# The alert engine's alerts (firing ones and the recent past), one row per key.
_ALERT_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    key TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    state TEXT NOT NULL,
    title TEXT NOT NULL,
    project TEXT,
    count INTEGER,
    fired_at REAL NOT NULL,
    last_notified REAL,
    resolved_at REAL,
    notifications INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_fired ON alerts (fired_at);
"""
# Alerts kept that are not firing any more (the Alerts page's history of what fired).
MAX_ALERTS = 1000

# Alerting's durable outbox: one row per (notification, notifier), written
# before the engine goes on, marked delivered only after the notifier took it.
_OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    notification_id TEXT NOT NULL,
    notifier TEXT NOT NULL,
    alert_key TEXT NOT NULL,
    rule TEXT NOT NULL,
    state TEXT NOT NULL,
    title TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT,
    done_at REAL,
    UNIQUE (notification_id, notifier)
);
CREATE INDEX IF NOT EXISTS outbox_by_status ON outbox (status, next_try);
"""

# Check-in monitors: one per (project, slug), made by its first check-in;
# a check-in's in_progress and closing items are one row (by check_in_id).
_MONITOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS monitors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL REFERENCES projects (id),
    slug TEXT NOT NULL,
    config TEXT,
    created REAL NOT NULL,
    UNIQUE (project_id, slug)
);
CREATE TABLE IF NOT EXISTS checkins (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    monitor_id INTEGER NOT NULL REFERENCES monitors (id),
    check_in_id TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    updated REAL NOT NULL,
    duration REAL,
    environment TEXT,
    UNIQUE (monitor_id, check_in_id)
);
CREATE INDEX IF NOT EXISTS checkins_by_monitor ON checkins (monitor_id, started);
"""

# Counts events deleted before the forwarder handed them on (see SqliteStorage.forwarding_start).
_FORWARD_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS forward_lost AFTER DELETE ON events
WHEN old.id > CAST((SELECT value FROM meta WHERE key = 'forward_cursor') AS INTEGER)
 AND (SELECT value FROM meta WHERE key = 'forward_scope') IN ('all', CAST(old.project_id AS TEXT))
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'forward_lost';
END
"""

# Columns added to databases made before issue states (ALTER TABLE ADD COLUMN is
# cheap in SQLite: only the schema changes; old rows read the default). Older versions of
# selfreport ignore them, so the schema version stays.
_ADDED_COLUMNS = (
    ("issues", "status", "TEXT NOT NULL DEFAULT 'unresolved'"),
    ("issues", "ignore_count", "INTEGER"),
    ("issues", "ignore_until", "REAL"),
    ("issues", "ignore_seen", "INTEGER"),  # times_seen when ignored (for ignore_count)
    ("issues", "resolved_at", "REAL"),
    ("events", "repeats", "INTEGER NOT NULL DEFAULT 0"),  # collapsed repeats (the chart)
)
# An issue ignored until a time that has passed reads as unresolved (its row changes at its
# next event); the one parameter is now.
_STATUS = (
    "CASE WHEN i.status = 'ignored' AND i.ignore_until <= ? THEN 'unresolved' ELSE i.status END"
)
_ISSUE_COLUMNS = (
    "i.id, i.project_id, p.name, i.title, i.culprit, i.level, i.environment, i.release,"
    " i.first_seen, i.last_seen, i.times_seen, i.last_event_id, " + _STATUS + ","
    " i.ignore_count, i.ignore_until, i.resolved_at"
)
# Event's fields but the payload, in their order.
_EVENT_COLUMNS = (
    "event_id, received, timestamp, level, environment, release, id, project_id, issue_id"
)
_OUTBOX_COLUMNS = (
    "id, notification_id, notifier, alert_key, rule, state, title, payload, status, created,"
    " attempts, next_try, last_error, done_at"
)
_SORTS = {"last_seen": "i.last_seen DESC", "first_seen": "i.first_seen DESC", "count": None}


class _WriteFailed(Exception):
    """A write of an optimistic batch raised: redo the batch one savepoint per write."""


class _ThreadDone:
    """Completes a concurrent.futures.Future (for callers on any thread)."""

    def __init__(self, future: Future[Any]) -> None:
        self.future = future

    def claim(self) -> bool:
        """The writer takes this write: False if its caller cancelled it (then it is skipped);
        once claimed it cannot be cancelled any more, so resolving it cannot fail."""
        try:
            return self.future.set_running_or_notify_cancel()
        except RuntimeError:  # already running or done: nothing left to protect
            return not self.future.done()

    def resolve(self, ok: bool, value: Any) -> None:
        if self.future.done():
            return
        with contextlib.suppress(InvalidStateError):  # cancelled this very moment
            if ok:
                self.future.set_result(value)
            else:
                self.future.set_exception(value)


class _LoopDone:
    """Completes an asyncio future on its loop; the writer wakes each loop once per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.loop = loop
        self.future = future

    def claim(self) -> bool:
        # Read from the writer thread: a future's state only moves forward, so "done" is
        # never wrong, at worst late (then the write is applied and its result ignored).
        return not self.future.done()

    def resolve(self, ok: bool, value: Any) -> None:
        if self.future.done():  # the waiting request was cancelled
            return
        if ok:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)


@dataclass
class _Write:
    """One unit of work for the writer thread: committed whole, or not at all."""

    apply: Callable[[sqlite3.Connection, _Batch], Any]
    done: Union[_ThreadDone, _LoopDone]
    size: int = 0  # bytes it adds to the database, about


def _complete(writes: list[_Write], outcomes: list[tuple[bool, Any]]) -> None:
    """Resolve each write's future. Never raises: whoever waited may have given up, cancelled,
    or closed its event loop, and none of that is the writer's business."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_LoopDone, bool, Any]]] = {}
    for write, (ok, value) in zip(writes, outcomes):
        done = write.done
        if isinstance(done, _LoopDone):
            by_loop.setdefault(done.loop, []).append((done, ok, value))
        else:
            _resolve_safely(done, ok, value)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, items)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _resolve_all(items: list[tuple[_LoopDone, bool, Any]]) -> None:
    for done, ok, value in items:
        _resolve_safely(done, ok, value)


def _resolve_safely(done: Union[_ThreadDone, _LoopDone], ok: bool, value: Any) -> None:
    try:
        done.resolve(ok, value)
    except Exception as exc:  # pragma: no cover - resolve() checks what it can; belt and braces
        with reporting_path():
            logger.debug("could not resolve a storage write: %r", exc)


def _issue_columns(event: PreparedEvent, times: int) -> list[Any]:
    """An issue's columns from title to last_event_id, as ``event`` (seen ``times`` times)
    leaves them: the order of _Batch's rows and of the INSERT of a new issue."""
    return [
        event.title,
        event.culprit,
        event.level,
        event.environment,
        event.release,
        event.received,
        event.received,
        times,
        event.event_id,
    ]


class _IssueState:
    """The writer's note of an issue that is resolved or ignored (no note: unresolved)."""

    __slots__ = ("left", "status", "until")

    def __init__(self, status: str, left: Optional[int], until: Optional[float]) -> None:
        self.status = status
        self.left = left  # events still ignored (ignored until N more events)
        self.until = until  # ignored until then


class _Batch:
    """Issue counters of one transaction, written once per issue at its end (a storm of one
    error costs one UPDATE per batch, not one per event). ``states`` notes the issues of
    ``issue_ids`` that are not unresolved (both are the writer's, forgotten together)."""

    def __init__(
        self, issue_ids: dict[tuple[int, str], int], states: dict[int, _IssueState]
    ) -> None:
        self.issue_ids = issue_ids
        self.states = states
        self.updates: dict[int, list[Any]] = {}
        self.inserted = 0

    def count(self, issue_id: int, event: PreparedEvent) -> None:
        self.inserted += 1
        times = 1 + event.repeats
        row = self.updates.get(issue_id)
        if row is None:
            self.updates[issue_id] = _issue_columns(event, times)
            return
        row[0:5] = [
            event.title,
            event.culprit,
            event.level,
            event.environment or row[3],
            event.release or row[4],
        ]
        row[5] = min(row[5], event.received)
        row[6] = max(row[6], event.received)
        row[7] += times
        row[8] = event.event_id

    def flush(self, conn: sqlite3.Connection) -> None:
        if self.updates:
            conn.executemany(
                "UPDATE issues SET title = ?, culprit = ?, level = ?,"
                " environment = coalesce(?, environment), release = coalesce(?, release),"
                " first_seen = min(first_seen, ?), last_seen = max(last_seen, ?),"
                " times_seen = times_seen + ?, last_event_id = ? WHERE id = ?",
                [(*row, issue_id) for issue_id, row in self.updates.items()],
            )
            self.updates.clear()

    def forget(self) -> None:
        self.updates.clear()
        self.issue_ids.clear()
        self.states.clear()


def _size(events: list[PreparedEvent]) -> int:
    """About the bytes ``events`` add to the database (characters of their payloads)."""
    return sum(len(event.payload) + _ROW_OVERHEAD for event in events)


def _store_events(
    project_id: int, events: list[PreparedEvent]
) -> Callable[[sqlite3.Connection, _Batch], list[bool]]:
    def apply(conn: sqlite3.Connection, batch: _Batch) -> list[bool]:
        return [_insert_event(conn, batch, project_id, event).stored for event in events]

    return apply


def _store_outcomes(
    project_id: int, events: list[PreparedEvent]
) -> Callable[[sqlite3.Connection, _Batch], list[EventOutcome]]:
    def apply(conn: sqlite3.Connection, batch: _Batch) -> list[EventOutcome]:
        return [_insert_event(conn, batch, project_id, event) for event in events]

    return apply


def _check_settings(
    synchronous: str, max_events_per_project: int, max_storage_bytes: Optional[int]
) -> None:
    if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
    if max_events_per_project < 1:
        raise ValueError("max_events_per_project must be at least 1")
    if max_storage_bytes is not None and max_storage_bytes < MIN_STORAGE_BYTES:
        raise ValueError(f"max_storage_bytes must be at least {MIN_STORAGE_BYTES} (1 MiB)")


class SqliteStorage:
    """The collector's database (SQLite in WAL mode), a :class:`~.store.Store`.

    Every write goes through one writer thread, which applies queued writes in batches, each
    write in its own savepoint inside one transaction, and resolves each write's future only
    after the transaction committed: an acknowledged event is on disk. Reads use a pool of
    read-only connections and never wait for the writer.

    Args:
        path: the database file; its directory is created if missing.
        max_events_per_project: retention by count; the oldest events go first.
        max_age_days: retention by age (of reception); 0 keeps events forever.
        max_queue: writes waiting for the writer at most; more raise :class:`StorageFull`.
        synchronous: SQLite's ``synchronous`` pragma; ``FULL`` survives power loss too.
        retention_interval: seconds between retention passes.
        linger: seconds the writer waits for more writes to join a batch.
        checkpoint_interval: seconds between background WAL checkpoints.
        retention_chunk: events deleted at most per retention step when idle; also how
            many new events start a retention round before ``retention_interval`` is up.
        max_storage_bytes: retention by size: the database (with its write-ahead log) is kept
            under this many bytes by deleting the oldest events first, in the same
            transaction as the writes that need the room. None: no limit by size.
        max_writer_pause: a writer that fails unexpectedly is restarted, again and again,
            after a pause that doubles with each failure in a row up to this many seconds
            (a data directory unmounted for a while must not end it); a committed
            transaction resets the count.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        max_events_per_project: int = 10_000,
        max_age_days: float = 30.0,
        max_queue: int = 10_000,
        max_batch: int = 256,
        synchronous: str = "FULL",
        retention_interval: float = 60.0,
        linger: float = 0.002,
        checkpoint_interval: float = 1.0,
        retention_chunk: int = 1000,
        max_storage_bytes: Optional[int] = None,
        max_writer_pause: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_settings(synchronous, max_events_per_project, max_storage_bytes)
        self.path = Path(path)
        self.max_events_per_project = max_events_per_project
        self.max_age_days = max_age_days
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.synchronous = synchronous.upper()
        self.retention_interval = retention_interval
        self.linger = linger
        self.checkpoint_interval = checkpoint_interval
        self.retention_chunk = retention_chunk
        self.max_storage_bytes = max_storage_bytes
        # Room kept for the write-ahead log, which SQLite truncates back to this size.
        self.wal_allowance = (
            0 if max_storage_bytes is None else min(64 * 2**20, max_storage_bytes // 8)
        )
        self.max_writer_pause = max_writer_pause
        self._clock = clock
        self._init_state()
        self._create()

    def _init_state(self) -> None:
        """What the writer, the readers and the operator's counters start from."""
        self.writer_restarts = 0
        self.writer_last_error: Optional[str] = None
        self.writer_last_error_at: Optional[float] = None
        self.deleted_for_space = 0
        self.checkpoints = 0  # passes of the background checkpoint that succeeded
        self._consecutive_failures = 0
        self._inflight: list[_Write] = []
        self._queue: queue.SimpleQueue[Optional[_Write]] = queue.SimpleQueue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._idle_readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._readers_lock = threading.Lock()
        self._writer: Optional[threading.Thread] = None
        self._checkpointer: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._finish_checkpoint = False
        self._retention_backlog = False
        # Measured once the writer starts: the limit may be lower than at the last run.
        self._space_backlog = self.max_storage_bytes is not None
        self._vacuum = False
        # Retention by size reads the pages in use only when the room it last found, less
        # what every batch since may have added, could be used up (or a second went by).
        self._room = 0
        self._room_checked = 0.0
        self._page_size = 0
        self._inserted_since_retention = 0
        self._last_issue_cleanup = 0.0
        # (project, fingerprint) -> issue id; the writer's alone, cleared after rollbacks
        # and retention passes (which delete issues). With it, the states of those issues
        # that are not unresolved (cleared with it).
        self._issue_ids: dict[tuple[int, str], int] = {}
        self._issue_states: dict[int, _IssueState] = {}
        self._closed = False
        self.created = False  # set by _create: True if this opened a new, empty database
        self.warning: Optional[str] = None  # for the operator, about the database file
        self.last_retention = 0.0

    # --- connections -------------------------------------------------------------------

    def _connect(self, readonly: bool = False) -> sqlite3.Connection:
        if readonly:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            if not readonly:
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _create(self) -> None:
        try:
            self._create_files()
        except OSError as exc:
            raise StorageError(f"{exc.filename or self.path}: {exc.strerror or exc}") from exc
        try:
            conn = self._connect()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"{self.path}: cannot open the database: {exc}") from exc
        try:
            if self.created:  # lets the writer give pages back when the size limit shrinks
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            with _transaction(conn):
                schema = _SCHEMA + _AUTH_SCHEMA + _ALERT_SCHEMA + _OUTBOX_SCHEMA + _MONITOR_SCHEMA
                conn.executescript("BEGIN IMMEDIATE;" + schema + "COMMIT;")
                _add_columns(conn)
                found = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if found is None:
                    conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                elif found[0] != SCHEMA_VERSION:
                    raise StorageError(
                        f"{self.path}: database schema {found[0]} is not supported "
                        f"(this version of selfreport reads schema {SCHEMA_VERSION})"
                    )
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"{self.path}: cannot open the database: {exc}") from exc
        finally:
            conn.close()

    def _create_files(self) -> None:
        """The directory (0700 when we create it) and the database file (0600 when we create
        it; SQLite gives its -wal and -shm files the database's mode), whatever the umask."""
        directory = self.path.parent
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            self.created = False
            mode = self.path.stat().st_mode
            if mode & 0o077:
                self.warning = (
                    f"{self.path} can be read by other users (mode {mode & 0o777:o}):"
                    " it holds events and project keys; chmod 600 it"
                )
                with reporting_path():
                    logger.warning("%s", self.warning)
            return
        os.close(fd)
        os.chmod(self.path, 0o600)  # the umask may have taken bits from what os.open asked
        self.created = True

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection in autocommit mode. Reads fetch all their rows: a statement
        left unfinished keeps its snapshot of the WAL, and the checkpoint cannot get past it."""
        if self._closed:
            raise StorageError("storage is closed")
        try:
            conn = self._idle_readers.get_nowait()
        except queue.Empty:
            try:
                conn = self._connect(readonly=True)
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: {exc}") from exc
            with self._readers_lock:
                self._readers.append(conn)
        try:
            yield conn
        except sqlite3.Error as exc:  # callers of the Store see its errors, not SQLite's
            raise StorageError(f"{self.path}: {exc}") from exc
        finally:
            if conn.in_transaction:  # pragma: no cover - reads run in autocommit mode
                conn.rollback()
            self._idle_readers.put(conn)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection for a write outside the writer thread (CLI, start-up,
        logins), rolled back if the body raises; SQLite's errors reach callers as
        :class:`StorageError` (IntegrityError is left to the body to explain)."""
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from exc
        try:
            with _transaction(conn):
                yield conn
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from exc
        finally:
            conn.close()

    # --- projects and keys (synchronous: CLI and start-up) -------------------------------

    def create_project(self, name: str, internal: bool = False) -> Project:
        """Create a project with a fresh key; raises ValueError if the name is taken or bad."""
        name = name.strip()
        if not name or len(name) > 100 or any(ord(c) < 32 for c in name):
            raise ValueError("a project name must be 1 to 100 printable characters")
        key = secrets.token_hex(16)
        now = self._clock()
        with self._writing() as conn:
            try:
                cursor = conn.execute(
                    "INSERT INTO projects (name, internal, created) VALUES (?, ?, ?)",
                    (name, int(internal), now),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"a project named {name!r} already exists") from None
            project_id = int(cursor.lastrowid or 0)
            conn.execute("INSERT INTO keys VALUES (?, ?, ?)", (key, project_id, now))
        return Project(project_id, name, internal, key, now)

    def ensure_defaults(self) -> tuple[Project, Project]:
        """The default project and the internal (self-monitoring) one, created if missing."""
        found = {p.name: p for p in self.projects()}
        default = found.get(DEFAULT_PROJECT) or self.create_project(DEFAULT_PROJECT)
        internal = found.get(INTERNAL_PROJECT) or self.create_project(INTERNAL_PROJECT, True)
        return default, internal

    def projects(self) -> list[Project]:
        """Every project with its first key, by id."""
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT p.id, p.name, p.internal, MIN(k.public_key), p.created"
                " FROM projects p LEFT JOIN keys k ON k.project_id = p.id"
                " GROUP BY p.id ORDER BY p.id"
            ).fetchall()
        return [Project(r[0], r[1], bool(r[2]), r[3] or "", r[4]) for r in rows]

    def keys(self) -> dict[str, int]:
        """Every public key and the project it belongs to."""
        with self._reader() as conn:
            return dict(conn.execute("SELECT public_key, project_id FROM keys").fetchall())

    def project_of_key(self, public_key: str) -> Optional[int]:
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT project_id FROM keys WHERE public_key = ?", (public_key,)
            ).fetchall()
        return int(rows[0][0]) if rows else None

    def project(self, project_id: int) -> Optional[Project]:
        return next((p for p in self.projects() if p.id == project_id), None)

    # --- users, sessions and API tokens (synchronous: CLI, login; never the writer's) --------

    def _write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement in its own transaction on a short-lived connection; rows changed."""
        with self._writing() as conn:
            return int(conn.execute(sql, params).rowcount)

    def _add_named(self, table: str, what: str, name: str, secret_hash: str) -> float:
        """Insert a user or token row; ValueError if the name is taken. Returns its time."""
        now = self._clock()
        try:
            self._write(f"INSERT INTO {table} VALUES (?, ?, ?)", (name, secret_hash, now))
        except sqlite3.IntegrityError:
            raise ValueError(f"a {what} named {name!r} already exists") from None
        return now

    def add_user(self, name: str, password_hash: str) -> User:
        """Add a user; raises ValueError if the name is taken."""
        return User(name, self._add_named("users", "user", name, password_hash))

    def set_password(self, name: str, password_hash: str, *, end_sessions: bool = True) -> bool:
        """Replace a user's password hash (and end their sessions); False if no such user."""
        with self._writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            changed = conn.execute(
                "UPDATE users SET password = ? WHERE name = ?", (password_hash, name)
            ).rowcount
            if changed and end_sessions:
                conn.execute("DELETE FROM sessions WHERE user = ?", (name,))
            conn.execute("COMMIT")
        return bool(changed)

    def remove_user(self, name: str) -> bool:
        """Remove a user and end their sessions; False if no such user."""
        return bool(self._write("DELETE FROM users WHERE name = ?", (name,)))

    def users(self) -> list[User]:
        with self._reader() as conn:
            rows = conn.execute("SELECT name, created FROM users ORDER BY name").fetchall()
        return [User(r[0], r[1]) for r in rows]

    def has_users(self) -> bool:
        with self._reader() as conn:
            return conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None

    def password_hash(self, name: str) -> Optional[str]:
        with self._reader() as conn:
            row = conn.execute("SELECT password FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def create_session(self, id_hash: str, user: str, expires: float) -> None:
        """Store a session (by the hash of its id); expired sessions are deleted on the way."""
        now = self._clock()
        with self._writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (id_hash, user, now, expires))
            conn.execute("COMMIT")

    def session_user(self, id_hash: str) -> Optional[str]:
        """The user of a live session, else None."""
        with self._reader() as conn:
            row = conn.execute(
                "SELECT user FROM sessions WHERE id_hash = ? AND expires > ?",
                (id_hash, self._clock()),
            ).fetchone()
        return None if row is None else str(row[0])

    def end_session(self, id_hash: str) -> bool:
        return bool(self._write("DELETE FROM sessions WHERE id_hash = ?", (id_hash,)))

    def add_token(self, name: str, token_hash: str) -> ApiToken:
        """Add an API token (by the hash of its secret); raises ValueError if the name is taken."""
        return ApiToken(name, self._add_named("api_tokens", "token", name, token_hash))

    def tokens(self) -> list[ApiToken]:
        with self._reader() as conn:
            rows = conn.execute("SELECT name, created FROM api_tokens ORDER BY name").fetchall()
        return [ApiToken(r[0], r[1]) for r in rows]

    def token_name(self, token_hash: str) -> Optional[str]:
        """The name of the token with this hash, else None."""
        with self._reader() as conn:
            row = conn.execute(
                "SELECT name FROM api_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return None if row is None else str(row[0])

    def revoke_token(self, name: str) -> bool:
        return bool(self._write("DELETE FROM api_tokens WHERE name = ?", (name,)))

    def auth_secret(self) -> bytes:
        """The server secret that signs CSRF tokens: made once, kept in the database."""
        with self._reader() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'auth_secret'").fetchone()
        if row is None:
            # OR IGNORE: two processes starting at once agree on whichever secret won.
            self._write(
                "INSERT OR IGNORE INTO meta VALUES ('auth_secret', ?)", (secrets.token_hex(32),)
            )
            with self._reader() as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'auth_secret'").fetchone()
        return bytes.fromhex(str(row[0]))

    # --- the writer ----------------------------------------------------------------------

    def start(self) -> SqliteStorage:
        """Start the writer thread (idempotent)."""
        if self._closed:
            raise StorageError("storage is closed")
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="selfreport-collector-writer", daemon=True
            )
            self._writer.start()
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="selfreport-collector-checkpoint", daemon=True
            )
            self._checkpointer.start()
        return self

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database in the background. Left to SQLite, a commit that
        crosses the WAL size limit does it itself, and every request waiting on that commit
        waits for the copy and its fsync too."""
        conn = self._connect()
        try:
            while not self._stopping.wait(self.checkpoint_interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # busy or I/O: the next round tries again
                    logger.debug("background checkpoint failed: %r", exc)
                else:
                    self.checkpoints += 1
                    # Under steady writes this pass never catches up with the end of the WAL,
                    # and SQLite only starts the WAL afresh once all of it was copied: the
                    # writer copies the little that came since, between two batches.
                    self._finish_checkpoint = True
        finally:
            conn.close()

    @property
    def writer_alive(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    @property
    def writer_failing(self) -> int:
        """Failures of the writer in a row, not yet followed by a commit (0: it works)."""
        return self._consecutive_failures

    @property
    def queue_size(self) -> int:
        return self._pending

    def _submit(self, write: _Write) -> None:
        if self._closed:
            raise StorageError("storage is closed")
        if not self.writer_alive:
            why = f": {self.writer_last_error}" if self.writer_last_error else ""
            raise StorageError(f"the storage writer thread is not running{why}")
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise StorageFull(f"the write queue is full ({self.max_queue} writes waiting)")
            self._pending += 1
        self._queue.put(write)

    def store(self, project_id: int, events: Sequence[PreparedEvent]) -> Future[list[bool]]:
        """Queue ``events`` for ``project_id``, stored all together or none; the future gives,
        per event, True if stored and False if it was a duplicate (same event_id)."""
        future: Future[list[bool]] = Future()
        events = list(events)
        self._submit(_Write(_store_events(project_id, events), _ThreadDone(future), _size(events)))
        return future

    async def store_async(self, project_id: int, events: Sequence[PreparedEvent]) -> list[bool]:
        """:meth:`store` for a coroutine: resolved on its event loop, once per batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bool]] = loop.create_future()
        events = list(events)
        self._submit(
            _Write(_store_events(project_id, events), _LoopDone(loop, future), _size(events))
        )
        return await future

    async def store_outcomes_async(
        self, project_id: int, events: Sequence[PreparedEvent]
    ) -> list[EventOutcome]:
        """:meth:`store_async`, answering per event what storing it did (its issue, new or
        regressed), as the writer found it in its batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[EventOutcome]] = loop.create_future()
        events = list(events)
        self._submit(
            _Write(_store_outcomes(project_id, events), _LoopDone(loop, future), _size(events))
        )
        return await future

    def probe(self) -> Future[float]:
        """A tiny write through the writer: proves the writer runs and the disk takes writes."""

        def write(conn: sqlite3.Connection, batch: _Batch) -> float:
            now = self._clock()
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (repr(now),))
            return now

        future: Future[float] = Future()
        self._submit(_Write(write, _ThreadDone(future)))
        return future

    def _write_loop(self) -> None:
        """The writer thread: serves writes until closed. An unexpected failure fails the
        writes it was applying, and the writer starts again on a fresh connection after a
        pause that doubles with each failure in a row, up to ``max_writer_pause``; it never
        gives up (``/health`` fails while it keeps failing, and says why)."""
        while True:
            try:
                self._serve_writes()
                return
            # BaseException too: a SystemExit raised by a write (a callback's sys.exit())
            # must not end the thread that every ingestion waits on.
            except BaseException as exc:
                self._writer_failed(exc)
                if self._stopping.is_set():  # closing: the writes left cannot be done
                    self._fail_pending(
                        StorageError(f"storage is closed: the writer failed: {exc!r}")
                    )
                    return
                failures = min(self._consecutive_failures, 20)  # no huge powers of two
                # Closing ends the pause: one more try to finish what is queued.
                self._stopping.wait(min(self.max_writer_pause, 0.05 * 2 ** (failures - 1)))

    def _writer_failed(self, exc: BaseException) -> None:
        """Account for a failure of the writer, which starts again after a pause."""
        self._consecutive_failures += 1
        self.writer_last_error = repr(exc)
        self.writer_last_error_at = time.time()
        self._forget_issues()
        error = StorageError(f"the storage writer failed: {exc!r}")
        inflight, self._inflight = self._inflight, []
        if inflight:
            with self._pending_lock:
                self._pending -= len(inflight)
            _complete(inflight, [(False, error)] * len(inflight))
        with reporting_path():
            logger.error(
                "the storage writer failed (%d in a row); restarting it",
                self._consecutive_failures,
                exc_info=exc,
            )
        self.writer_restarts += 1

    def _serve_writes(self) -> None:
        conn = self._connect()
        try:
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpoint thread does it
            if self.max_storage_bytes is not None:
                # After each checkpoint that lets the WAL start over, SQLite cuts it back.
                conn.execute(f"PRAGMA journal_size_limit = {self.wal_allowance}")
            while True:
                backlog = self._retention_backlog or self._space_backlog
                idle = 0.0 if backlog else self.retention_interval
                try:
                    first = self._queue.get(timeout=max(0.01, idle))
                except queue.Empty:
                    self._while_idle(conn, backlog)
                    continue
                batch, stop = self._take_batch(first)
                if batch:
                    self._inflight = batch  # failed by _writer_failed if this raises
                    self._apply_batch(conn, batch)
                    self._consecutive_failures = 0
                    self._after_batch(conn)
                if stop:
                    self._finish(conn)
                    return
        finally:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            conn.close()

    def _while_idle(self, conn: sqlite3.Connection, backlog: bool) -> None:
        """No writes came: retention and giving pages back, in transactions of their own."""
        if backlog or self._clock() - self.last_retention >= self.retention_interval:
            self._retain_safely(conn)
        if self._vacuum:
            self._give_back_pages(conn)

    def _take_batch(self, first: Optional[_Write]) -> tuple[list[_Write], bool]:
        """The writes of the next batch, starting with ``first``, and whether close() was
        asked for (the None in the queue) behind them."""
        if first is None:
            return [], True
        batch = [first]
        # Linger a moment (asleep, not woken by each new write) for more writes: one
        # commit (one fsync) and one wake-up of the waiting event loop per batch, and
        # fewer handovers of the GIL between this thread and the event loop.
        if self.linger > 0 and self._queue.qsize() < self.max_batch:
            time.sleep(self.linger)
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _after_batch(self, conn: sqlite3.Connection) -> None:
        """Housekeeping between two batches: pages given back, the end of a checkpoint, and
        retention's turn when enough was inserted or enough time passed."""
        if self._vacuum:
            self._give_back_pages(conn)
        if self._finish_checkpoint:
            self._finish_checkpoint = False
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if (
            self._inserted_since_retention >= self.retention_chunk
            or self._clock() - self.last_retention >= self.retention_interval
        ):
            # The next batches delete as they insert, a little more than they add,
            # until caught up: never a big pass that holds every waiting request.
            self._retention_backlog = True
            self._inserted_since_retention = 0

    def _finish(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):  # leave a small WAL behind
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        self._fail_pending(StorageError("storage is closed"))

    def _apply_batch(self, conn: sqlite3.Connection, writes: list[_Write]) -> None:
        """All writes in one transaction; if one fails, again one savepoint per write, so
        the others still commit and only the failing one reports its error. Writes whose
        callers cancelled them before they were taken are skipped."""
        taken = [write for write in writes if write.done.claim()]
        skipped = len(writes) - len(taken)
        if skipped:
            with self._pending_lock:
                self._pending -= skipped
            self._inflight = writes = taken
            if not writes:
                return  # _inflight is empty: nothing is left to fail if the writer fails
        try:
            try:
                outcomes = self._transaction(conn, writes, isolated=False)
            except _WriteFailed:
                outcomes = self._transaction(conn, writes, isolated=True)
        except Exception as exc:
            # Logged for operators from inside the reporting path: the requests waiting on
            # these writes fail and get reported there, once, with their own context.
            with reporting_path():
                logger.error("could not commit %d writes: %r", len(writes), exc)
            error = StorageError(f"the database refused the write: {exc}")
            error.__cause__ = exc
            outcomes = [(False, error)] * len(writes)
        with self._pending_lock:
            self._pending -= len(writes)
        self._inflight = []
        _complete(writes, outcomes)

    def _transaction(
        self, conn: sqlite3.Connection, writes: list[_Write], isolated: bool
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        batch = _Batch(self._issue_ids, self._issue_states)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Counted once committed: a rolled-back transaction (retried write by write, or
            # a failed COMMIT) deleted nothing.
            deleted_for_space = self._make_room(conn, sum(write.size for write in writes))
            for write in writes:
                if not isolated:
                    try:
                        outcomes.append((True, write.apply(conn, batch)))
                    except Exception as exc:
                        raise _WriteFailed() from exc
                    continue
                conn.execute("SAVEPOINT write")
                try:
                    result = write.apply(conn, batch)
                    batch.flush(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO write")
                    batch.forget()
                    outcomes.append((False, exc))
                else:
                    outcomes.append((True, result))
                conn.execute("RELEASE write")
            batch.flush(conn)
            if self._retention_backlog:
                deleted_for_space += self._retention_step(conn, 100 + 2 * batch.inserted)
            conn.execute("COMMIT")
            self.deleted_for_space += deleted_for_space
            self._inserted_since_retention += batch.inserted
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._forget_issues()  # ids of issues inserted in the rolled-back transaction
            raise
        return outcomes

    def _forget_issues(self) -> None:
        self._issue_ids.clear()
        self._issue_states.clear()

    def _fail_pending(self, error: Exception) -> None:
        failed = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                with self._pending_lock:
                    self._pending -= 1
                failed.append(item)
        _complete(failed, [(False, error)] * len(failed))

    # --- retention -----------------------------------------------------------------------

    def _retain_safely(self, conn: sqlite3.Connection) -> None:
        """A retention step in a transaction of its own (when no writes come)."""
        try:
            with _transaction(conn):
                conn.execute("BEGIN IMMEDIATE")
                deleted_for_space = self._retention_step(conn, self.retention_chunk)
                conn.execute("COMMIT")
            self.deleted_for_space += deleted_for_space
        except sqlite3.Error as exc:
            self._retention_failed(exc)

    def _retention_step(self, conn: sqlite3.Connection, limit: int) -> int:
        """Delete up to ``limit`` expired events inside the current transaction; returns how
        many events were deleted for space (to count once committed). Under load this rides
        along with each batch (no commit, no fsync of its own), so a minute's worth of
        expired events never holds the writer, and every waiting request, for seconds."""
        self._forget_issues()  # retention may delete issues
        conn.execute("SAVEPOINT retention")
        try:
            deleted = self._delete_expired(conn, limit)
            deleted_for_space = self._make_room(conn, 0)
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK TO retention")
            conn.execute("RELEASE retention")
            self._retention_failed(exc)
            return 0
        conn.execute("RELEASE retention")
        if deleted < limit:  # caught up
            self._retention_backlog = False
            now = self._clock()
            self.last_retention = now
            if now - self._last_issue_cleanup >= self.retention_interval:
                self._last_issue_cleanup = now
                _delete_empty_issues(conn)
        return deleted_for_space

    def _retention_failed(self, exc: Exception) -> None:
        self._retention_backlog = False  # try again at the next interval, not at once
        self._space_backlog = False
        self.last_retention = self._clock()
        with reporting_path():
            logger.error("retention pass failed: %r", exc)

    def apply_retention(self, limit: Optional[int] = None) -> int:
        """Delete events beyond the per-project count and older than the age limit, oldest
        first, at most ``limit`` of them (None: all), and the issues left without events;
        returns how many events were deleted. (The writer thread does this by itself.)"""
        with self._writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            deleted = self._delete_expired(conn, limit)
            deleted_for_space = self._make_room(conn, 0)
            deleted += deleted_for_space
            if limit is None or deleted < limit:
                _delete_empty_issues(conn)
            conn.execute("COMMIT")
        self.deleted_for_space += deleted_for_space
        return deleted

    def _delete_expired(self, conn: sqlite3.Connection, limit: Optional[int]) -> int:
        budget = -1 if limit is None else limit  # LIMIT -1: no limit
        deleted = 0
        if self.max_age_days > 0:
            cutoff = self._clock() - self.max_age_days * 86400.0
            deleted += conn.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events"
                " WHERE received < ? ORDER BY received LIMIT ?)",
                (cutoff, budget),
            ).rowcount
        for (project_id,) in conn.execute("SELECT id FROM projects").fetchall():
            left = -1 if limit is None else limit - deleted
            if left == 0:
                break
            row = conn.execute(
                "SELECT id FROM events WHERE project_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                (project_id, self.max_events_per_project),
            ).fetchone()
            if row is not None:
                deleted += conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events"
                    " WHERE project_id = ? AND id <= ? ORDER BY id LIMIT ?)",
                    (project_id, row[0], left),
                ).rowcount
        return deleted

    def _make_room(self, conn: sqlite3.Connection, incoming: int) -> int:
        """Retention by size, inside the current transaction: delete the oldest events until
        the pages in use plus ``incoming`` bytes fit under the limit (with the room kept for
        the WAL); returns how many were deleted, for the caller to count once committed.
        SQLite reuses the pages freed here before it grows the file, so the file stays about
        the limit."""
        if self.max_storage_bytes is None:
            return 0
        # At most: twice the payloads (UTF-8 of non-ASCII text, indexes) and a slack for the
        # writes that carry no size (outbox, check-ins, issue rows).
        room = self._room - 2 * incoming - _BATCH_SLACK
        if room > 0 and time.monotonic() - self._room_checked < _ROOM_RECHECK:
            self._room = room
            return 0
        target = self.max_storage_bytes - self.wal_allowance
        if not self._page_size:  # fixed when the database was made
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        page_size = self._page_size
        need = _pages_in_use(conn) * page_size + incoming - target
        if need <= 0:
            self._space_backlog = False
            self._room, self._room_checked = -need, time.monotonic()
            return 0
        self._room = 0
        need += min(target // 20, 8 * 2**20)  # a little more: not every batch has to delete
        # A database far over the limit (the limit was lowered) shrinks over several steps:
        # none holds the writer, and every request waiting on it, for long.
        self._space_backlog = need > incoming * 2 + _MAX_SPACE_STEP
        need = min(need, incoming * 2 + _MAX_SPACE_STEP)
        deleted = 0
        # Sizes are read in small, growing steps, stopping once there is room: on an SQLite
        # without octet_length() a size means reading the whole payload, inside the
        # transaction every waiting request waits on.
        step = 8
        while need > 0:
            rows = conn.execute(
                f"SELECT id, {_PAYLOAD_BYTES} FROM events ORDER BY id LIMIT ?", (step,)
            ).fetchall()
            if not rows:
                break
            step = min(step * 2, 256)
            last = rows[-1][0]
            for row_id, size in rows:
                need -= size + _ROW_OVERHEAD
                if need <= 0:
                    last = row_id
                    break
            deleted += conn.execute("DELETE FROM events WHERE id <= ?", (last,)).rowcount
        # A database made when the limit was higher gives the pages back to the disk.
        file_pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        self._vacuum = file_pages * page_size > self.max_storage_bytes
        return deleted

    def _give_back_pages(self, conn: sqlite3.Connection) -> None:
        """Between transactions: return free pages to the disk (databases created with
        ``auto_vacuum = INCREMENTAL``, i.e. by this version; older ones reuse them)."""
        self._vacuum = False
        try:
            # executescript steps the pragma to its end (execute() frees a single page).
            conn.executescript(f"PRAGMA incremental_vacuum({_VACUUM_PAGES});")
        except sqlite3.Error as exc:  # pragma: no cover - the next pass tries again
            with reporting_path():
                logger.error("could not give free pages back: %r", exc)

    # --- reads ---------------------------------------------------------------------------

    def issues(
        self,
        *,
        project_id: Optional[int] = None,
        query: str = "",
        level: str = "",
        environment: str = "",
        sort: str = "last_seen",
        limit: int = 50,
        offset: int = 0,
        status: Optional[str] = None,
    ) -> list[Issue]:
        """Issues matching the filters; ``query`` searches title and culprit."""
        now = self._clock()
        where: list[str] = []
        params: list[Any] = [now]  # _STATUS in the columns
        if status is not None:
            where.append(f"{_STATUS} = ?")
            params += [now, status]
        if project_id is not None:
            where.append("i.project_id = ?")
            params.append(project_id)
        if query:
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern += "%"
            where.append("(i.title LIKE ? ESCAPE '\\' OR i.culprit LIKE ? ESCAPE '\\')")
            params += [pattern, pattern]
        if level:
            where.append("i.level = ?")
            params.append(level)
        if environment:
            where.append(
                "EXISTS (SELECT 1 FROM events e WHERE e.issue_id = i.id AND e.environment = ?)"
            )
            params.append(environment)
        order = _SORTS.get(sort) or "i.times_seen DESC, i.last_seen DESC"
        sql = f"SELECT {_ISSUE_COLUMNS} FROM issues i JOIN projects p ON p.id = i.project_id"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order} LIMIT ? OFFSET ?"
        params += [max(0, limit), max(0, offset)]
        with self._reader() as conn:
            return [_issue(row) for row in conn.execute(sql, params).fetchall()]

    def issue(self, issue_id: int) -> Optional[Issue]:
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT {_ISSUE_COLUMNS} FROM issues i JOIN projects p ON p.id = i.project_id"
                " WHERE i.id = ?",
                (self._clock(), issue_id),
            ).fetchall()
        return _issue(rows[0]) if rows else None

    def events(self, issue_id: int, limit: int = 50, payloads: bool = True) -> list[Event]:
        """The newest events of an issue, newest first; with ``payloads=False`` their
        ``payload`` is ``""`` (lists need no payload, which may be megabytes each)."""
        payload = "payload" if payloads else "''"
        return self._select_events(
            "issue_id = ? ORDER BY id DESC LIMIT ?", (issue_id, limit), payload
        )

    def event(self, project_id: int, event_id: str) -> Optional[Event]:
        found = self._select_events("project_id = ? AND event_id = ?", (project_id, event_id))
        return found[0] if found else None

    def _select_events(
        self, where: str, params: Sequence[Any], payload: str = "payload"
    ) -> list[Event]:
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS}, {payload} FROM events WHERE {where}", params
            ).fetchall()
        return [Event(*row) for row in rows]

    def environments(self) -> list[str]:
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT DISTINCT environment FROM events WHERE environment IS NOT NULL"
                " ORDER BY environment"
            ).fetchall()
        return [r[0] for r in rows]

    def event_count(self, project_id: Optional[int] = None) -> int:
        with self._reader() as conn:
            if project_id is None:
                rows = conn.execute("SELECT COUNT(*) FROM events").fetchall()
            else:
                rows = conn.execute(
                    "SELECT COUNT(*) FROM events WHERE project_id = ?", (project_id,)
                ).fetchall()
        return int(rows[0][0])

    def size_bytes(self) -> int:
        """The database's size on disk, WAL included."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(str(self.path) + suffix)
        return total

    # --- forwarding: a cursor over the events table ----------------------------------------
    # The forwarder hands on what was committed, in id order (one writer: ids commit in
    # order), and keeps in ``meta`` the last id the upstream took or the spool holds. A
    # trigger counts events deleted (by retention) before the forwarder got to them. The
    # cursor belongs to one upstream and scope (``forward_upstream``): forwarding elsewhere,
    # or after a run without forwarding, starts afresh at the newest event.

    def forwarding_start(self, project_id: Optional[int] = None, upstream: str = "") -> int:
        """Set up forwarding (of every project, or of ``project_id`` only) to ``upstream`` (an
        identity without secrets, such as the envelope URL) and return the cursor. The first
        time, when the upstream or the scope changed, or after a run without forwarding, that
        is the newest event: only what arrives from now on goes on (and nothing counts as
        lost before)."""
        scope = "all" if project_id is None else str(project_id)
        identity = f"{scope} {upstream}"
        with self._writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            values = dict(
                conn.execute(
                    "SELECT key, value FROM meta"
                    " WHERE key IN ('forward_cursor', 'forward_upstream')"
                ).fetchall()
            )
            # A cursor without an identity was saved before identities were (kept).
            previous = values.get("forward_upstream", identity)
            if "forward_cursor" in values and previous != identity:
                conn.execute("DELETE FROM meta WHERE key IN ('forward_cursor', 'forward_lost')")
                with reporting_path():
                    logger.warning(
                        "forwarding starts afresh at the newest event: %s",
                        "it was off in the last run"
                        if not previous
                        else "the upstream or what is forwarded changed",
                    )
            conn.execute(_FORWARD_TRIGGER)
            conn.execute(
                "INSERT OR IGNORE INTO meta SELECT 'forward_cursor',"
                " CAST(coalesce(max(id), 0) AS TEXT) FROM events"
            )
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('forward_lost', '0')")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('forward_scope', ?)", (scope,))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('forward_upstream', ?)", (identity,))
            row = conn.execute("SELECT value FROM meta WHERE key = 'forward_cursor'").fetchone()
            conn.execute("COMMIT")
        return int(row[0])

    def forwarding_off(self) -> None:
        """Record a run without forwarding: retention stops counting what it deletes as lost,
        and forwarding, once back, starts afresh at the newest event (not with the backlog)."""
        with self._writing() as conn:
            if conn.execute("SELECT 1 FROM meta WHERE key = 'forward_cursor'").fetchone() is None:
                return  # never forwarded: nothing to write (no write lock at every start)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DROP TRIGGER IF EXISTS forward_lost")
            conn.execute(
                "INSERT OR REPLACE INTO meta SELECT 'forward_upstream', '' FROM meta"
                " WHERE key = 'forward_cursor'"
            )
            conn.execute("COMMIT")

    def events_to_forward(
        self, after: int, limit: int, project_id: Optional[int] = None
    ) -> tuple[list[tuple[int, str]], int]:
        """Up to ``limit`` events after id ``after`` (of ``project_id`` only, if given), oldest
        first, and the id the cursor may move to once they went on (past events of other
        projects too)."""
        with self._reader() as conn:
            conn.execute("BEGIN")  # one snapshot for both queries
            try:
                if project_id is None:
                    rows = conn.execute(
                        "SELECT id, payload FROM events WHERE id > ? ORDER BY id LIMIT ?",
                        (after, limit),
                    ).fetchall()
                else:
                    rows = conn.execute(
                        "SELECT id, payload FROM events WHERE project_id = ? AND id > ?"
                        " ORDER BY id LIMIT ?",
                        (project_id, after, limit),
                    ).fetchall()
                if len(rows) < limit:
                    newest = conn.execute("SELECT max(id) FROM events").fetchone()[0]
                    upto = max(after, int(newest or 0))
                else:
                    upto = int(rows[-1][0])
            finally:
                conn.execute("COMMIT")
        return [(int(i), str(p)) for i, p in rows], upto

    def forwarding_state(self, after: int, project_id: Optional[int] = None) -> dict[str, int]:
        """Events waiting after id ``after``, the saved cursor, and the events retention
        deleted before they were forwarded."""
        with self._reader() as conn:
            values = dict(
                conn.execute(
                    "SELECT key, value FROM meta WHERE key IN ('forward_cursor', 'forward_lost')"
                ).fetchall()
            )
            cursor = int(values.get("forward_cursor", 0))
            sql = "SELECT count(*) FROM events WHERE id > ?"
            params: tuple[int, ...] = (after,)
            if project_id is not None:
                sql += " AND project_id = ?"
                params += (project_id,)
            waiting = conn.execute(sql, params).fetchone()[0]
        return {
            "cursor": cursor,
            "waiting": int(waiting),
            "dropped_retention": int(values.get("forward_lost", 0)),
        }

    def save_forward_cursor(self, cursor: int) -> Future[None]:
        """Move the saved cursor forward to ``cursor`` (never back), through the writer."""

        def write(conn: sqlite3.Connection, batch: _Batch) -> None:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'forward_cursor'"
                " AND CAST(value AS INTEGER) < ?",
                (str(cursor), cursor),
            )

        future: Future[None] = Future()
        self._submit(_Write(write, _ThreadDone(future)))
        return future

    # --- alerts ------------------------------------------------------------------------------

    def save_alert(self, alert: AlertRecord) -> None:
        """Insert or replace the alert; keeps the newest MAX_ALERTS alerts not firing."""
        with self._writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR REPLACE INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                astuple(alert),
            )
            conn.execute(
                "DELETE FROM alerts WHERE state != 'firing' AND key NOT IN (SELECT key FROM alerts"
                " WHERE state != 'firing' ORDER BY fired_at DESC LIMIT ?)",
                (MAX_ALERTS,),
            )
            conn.execute("COMMIT")

    def alerts(self, *, firing_only: bool = False, limit: int = 200) -> list[AlertRecord]:
        """Alerts, newest first by when they fired (firing ones only, if asked)."""
        where = "WHERE state = 'firing' " if firing_only else ""
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT * FROM alerts {where}ORDER BY fired_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [AlertRecord(*row) for row in rows]

    # --- alerting: the notification outbox --------------------------------------------------

    def outbox_put(
        self, entries: Sequence[OutboxEntry], max_pending: int, keep_done: int
    ) -> list[OutboxEntry]:
        """Insert ``entries`` (pending; a row already there for the same notification and
        notifier is left as it is), then, past ``max_pending`` pending rows, mark the oldest
        ``dropped``; keep the newest ``keep_done`` finished rows. Returns the rows dropped."""
        now = self._clock()
        with self._writing() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (notification_id, notifier, alert_key, rule, state,"
                " title, payload, status, created, attempts, next_try)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, 0, ?)",
                [_outbox_values(e) for e in entries],
            )
            rows = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE status = 'pending'"
                " ORDER BY id DESC LIMIT -1 OFFSET ?",
                (max(0, max_pending),),
            ).fetchall()
            dropped = [OutboxEntry(*row) for row in rows]
            conn.executemany(
                "UPDATE outbox SET status = 'dropped', last_error = 'outbox full', done_at = ?"
                " WHERE id = ?",
                [(now, e.id) for e in dropped],
            )
            conn.execute(
                "DELETE FROM outbox WHERE status != 'pending' AND id NOT IN (SELECT id FROM"
                " outbox WHERE status != 'pending' ORDER BY id DESC LIMIT ?)",
                (max(0, keep_done),),
            )
        return dropped

    def outbox_due(self, now: float, limit: int) -> list[OutboxEntry]:
        """Pending rows whose ``next_try`` has come, the earliest first."""
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE status = 'pending'"
                " AND next_try <= ? ORDER BY next_try, id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def outbox_next_try(self) -> Optional[float]:
        """When the earliest pending row is due (None: nothing pending)."""
        with self._reader() as conn:
            row = conn.execute("SELECT min(next_try) FROM outbox WHERE status = 'pending'")
            found = row.fetchone()[0]
        return None if found is None else float(found)

    def outbox_mark(
        self,
        entry_id: int,
        status: str,
        *,
        attempts: int,
        next_try: float,
        error: Optional[str] = None,
    ) -> None:
        """Record a try: ``delivered``, ``failed`` (given up), or ``pending`` (again at
        ``next_try``)."""
        done_at = None if status == "pending" else self._clock()
        with self._writing() as conn:
            conn.execute(
                "UPDATE outbox SET status = ?, attempts = ?, next_try = ?, last_error = ?,"
                " done_at = ? WHERE id = ?",
                (status, attempts, next_try, error, done_at, entry_id),
            )

    def outbox_history(self, limit: int = 100) -> list[OutboxEntry]:
        """The newest rows, whatever their status, newest first."""
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def outbox_counts(self) -> dict[str, int]:
        """Rows by status (``pending``, ``delivered``, ``failed``, ``dropped``)."""
        with self._reader() as conn:
            rows = conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall()
        return {str(status): int(count) for status, count in rows}

    # --- issue states, the events-over-time chart, pipeline latency -------------------------

    def set_issue_status(
        self,
        issue_id: int,
        status: str,
        *,
        ignore_count: Optional[int] = None,
        ignore_until: Optional[float] = None,
        timeout: float = 10.0,
    ) -> Optional[Issue]:
        """Resolve, reopen or ignore an issue; the issue as it is now (None: no such issue).
        Through the writer, in order with the events: the writer keeps the states of the
        issues it knows, and an event committed after this sees the new one."""
        _check_status(status, ignore_count, ignore_until)
        future: Future[bool] = Future()
        apply = _set_status(issue_id, status, ignore_count, ignore_until, self._clock())
        self._submit(_Write(apply, _ThreadDone(future)))
        try:
            changed = future.result(timeout)
        except FutureTimeout as exc:  # the builtin TimeoutError from 3.11 on
            raise StorageError("the storage writer did not answer in time") from exc
        return self.issue(issue_id) if changed else None

    def issue_histogram(
        self, issue_id: int, since: float, bucket_seconds: float, until: Optional[float] = None
    ) -> list[int]:
        """Events of the issue (with their collapsed repeats) per bucket from ``since``."""
        if not bucket_seconds > 0:
            raise ValueError("bucket_seconds must be positive")
        until = self._clock() if until is None else until
        count = min(MAX_HISTOGRAM_BUCKETS, max(1, math.ceil((until - since) / bucket_seconds)))
        out = [0] * count
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT CAST((received - ?) / ? AS INTEGER), sum(1 + repeats) FROM events"
                " WHERE issue_id = ? AND received >= ? AND received < ? GROUP BY 1",
                (since, bucket_seconds, issue_id, since, since + count * bucket_seconds),
            ).fetchall()
        for bucket, events in rows:
            if 0 <= bucket < count:  # pragma: no branch - the WHERE keeps them inside
                out[int(bucket)] = int(events)
        return out

    def received_between(
        self, after: int, upto: int, project_id: Optional[int] = None
    ) -> list[float]:
        """When the events with ids in (``after``, ``upto``] were received."""
        sql = "SELECT received FROM events WHERE id > ? AND id <= ?"
        params: tuple[int, ...] = (after, upto)
        if project_id is not None:
            sql += " AND project_id = ?"
            params += (project_id,)
        with self._reader() as conn:
            return [float(row[0]) for row in conn.execute(sql, params).fetchall()]

    # --- check-in monitors ---------------------------------------------------------------

    # Bounds on what senders can make: monitors per project, check-ins kept per monitor.
    max_monitors_per_project = 1000
    checkins_per_monitor = 50

    async def checkin_async(self, project_id: int, item: CheckInItem, received: float) -> bool:
        """Record a check-in through the writer (its monitor made on the first, its config
        updated when one comes along); False when a new monitor would pass the limit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        apply = _store_checkin(
            project_id, item, received, self.max_monitors_per_project, self.checkins_per_monitor
        )
        self._submit(_Write(apply, _LoopDone(loop, future), _ROW_OVERHEAD))
        return await future

    def monitors(self, project_id: Optional[int] = None, checkins: int = 1) -> list[Monitor]:
        """Every monitor (of ``project_id``), by project and slug, each with its newest
        ``checkins`` check-ins, newest first."""
        where = "" if project_id is None else " WHERE m.project_id = ?"
        params: tuple[Any, ...] = () if project_id is None else (project_id,)
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT m.id, p.name, m.slug, m.config, m.created FROM monitors m"
                f" JOIN projects p ON p.id = m.project_id{where} ORDER BY p.name, m.slug",
                params,
            ).fetchall()
            recent = _recent_checkins(conn, where, params, checkins)
        by_monitor: dict[int, list[CheckIn]] = {}
        for monitor_id, *columns in recent:
            by_monitor.setdefault(monitor_id, []).append(CheckIn(*columns))
        return [
            Monitor(name, slug, _monitor_config(config), created, tuple(by_monitor.get(mid, ())))
            for mid, name, slug, config, created in rows
        ]

    # --- lifecycle -----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued writes (within ``timeout``), stop the writer, close connections."""
        if self._closed:
            return
        writer = self._writer
        self._stopping.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout)
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout)
        self._closed = True
        self._fail_pending(StorageError("storage is closed"))
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()

    def __enter__(self) -> SqliteStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Storage = SqliteStorage
"""The name this class had before the :class:`~.store.Store` interface (still importable)."""


def _outbox_values(e: OutboxEntry) -> tuple[Any, ...]:
    return (
        e.notification_id,
        e.notifier,
        e.alert_key,
        e.rule,
        e.state,
        e.title,
        e.payload,
        e.created,
        e.next_try,
    )


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Roll back whatever the body left open when it raises."""
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _add_columns(conn: sqlite3.Connection) -> None:
    """Add the columns of :data:`_ADDED_COLUMNS` a database made by an older version lacks."""
    for table, column, declaration in _ADDED_COLUMNS:
        names = {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}
        if column not in names:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def _pages_in_use(conn: sqlite3.Connection) -> int:
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    return pages - int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def _delete_empty_issues(conn: sqlite3.Connection) -> None:
    conn.execute(
        "DELETE FROM issues WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.issue_id = issues.id)"
    )


def _insert_event(
    conn: sqlite3.Connection, batch: _Batch, project_id: int, event: PreparedEvent
) -> EventOutcome:
    """Store one event and count it in its issue (not stored when its event_id was stored
    before); what that did to the issue."""
    key = (project_id, event.fingerprint)
    issue_id = batch.issue_ids.get(key)
    new_issue = False
    if issue_id is None:
        row = conn.execute(
            "SELECT id, status, ignore_count, ignore_until, times_seen - ignore_seen"
            " FROM issues WHERE project_id = ? AND fingerprint = ?",
            key,
        ).fetchone()
        if row is not None:
            issue_id = int(row[0])
            _note_state(batch.states, issue_id, row[1:])
        else:
            new_issue = True
            cursor = conn.execute(
                "INSERT INTO issues (project_id, fingerprint, title, culprit, level, environment,"
                " release, first_seen, last_seen, times_seen, last_event_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (project_id, event.fingerprint, *_issue_columns(event, 0)),
            )
            issue_id = int(cursor.lastrowid or 0)
        batch.issue_ids[key] = issue_id
    inserted = conn.execute(
        "INSERT OR IGNORE INTO events (project_id, issue_id, event_id, received, timestamp, level,"
        " environment, release, payload, repeats) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            project_id,
            issue_id,
            event.event_id,
            event.received,
            event.timestamp,
            event.level,
            event.environment,
            event.release,
            event.payload,
            event.repeats,
        ),
    ).rowcount
    if not inserted:
        return EventOutcome(False, issue_id, False, False, event.title, event.level)
    batch.count(issue_id, event)
    regressed = ignored = False
    if batch.states:  # else every issue the writer knows is unresolved
        regressed, ignored = _after_event(conn, batch.states, issue_id, event)
    return EventOutcome(True, issue_id, new_issue, regressed, event.title, event.level, ignored)


# --- issue states, in the writer -------------------------------------------------------------


def _issue(row: Sequence[Any]) -> Issue:
    issue = Issue(*row)
    if issue.status == "unresolved" and issue.ignore_until is not None:  # ran out
        return dataclasses.replace(issue, ignore_count=None, ignore_until=None)
    return issue


def _note_state(states: dict[int, _IssueState], issue_id: int, row: Sequence[Any]) -> None:
    """Note an issue's state as read from its row (status, ignore_count, ignore_until, events
    since it was ignored)."""
    status, count, until, seen = row
    if status == "unresolved":
        states.pop(issue_id, None)
        return
    left = None if count is None else int(count) - int(seen or 0)
    states[issue_id] = _IssueState(str(status), left, until)


def _after_event(
    conn: sqlite3.Connection,
    states: dict[int, _IssueState],
    issue_id: int,
    event: PreparedEvent,
) -> tuple[bool, bool]:
    """What an event stored on an issue that is not unresolved does to it: (regressed, still
    ignored). A resolved issue reopens (a regression); an ignored one once its count or time
    ran out (no regression)."""
    state = states.get(issue_id)
    if state is None:
        return False, False
    if state.status == "ignored":
        if state.left is not None:
            state.left -= 1 + event.repeats
            if state.left > 0:
                return False, True
        elif state.until is None or event.received < state.until:
            return False, True
    conn.execute(
        "UPDATE issues SET status = 'unresolved', resolved_at = NULL, ignore_count = NULL,"
        " ignore_until = NULL, ignore_seen = NULL WHERE id = ?",
        (issue_id,),
    )
    del states[issue_id]
    return state.status == "resolved", False


def _set_status(
    issue_id: int, status: str, count: Optional[int], until: Optional[float], now: float
) -> Callable[[sqlite3.Connection, _Batch], bool]:
    def apply(conn: sqlite3.Connection, batch: _Batch) -> bool:
        batch.flush(conn)  # ignore_seen counts from the events stored before this
        changed = conn.execute(
            "UPDATE issues SET status = ?, resolved_at = ?, ignore_count = ?, ignore_until = ?,"
            " ignore_seen = CASE WHEN ? = 'ignored' THEN times_seen END WHERE id = ?",
            (status, now if status == "resolved" else None, count, until, status, issue_id),
        ).rowcount
        if status == "unresolved" or not changed:
            batch.states.pop(issue_id, None)
        else:
            batch.states[issue_id] = _IssueState(status, count, until)
        return bool(changed)

    return apply


def _check_status(status: str, count: Optional[int], until: Optional[float]) -> None:
    if status not in ISSUE_STATUSES:
        raise ValueError(f"status must be one of {', '.join(ISSUE_STATUSES)}, not {status!r}")
    if status != "ignored" and (count is not None or until is not None):
        raise ValueError("ignore_count and ignore_until go with status 'ignored' only")
    if count is not None and until is not None:
        raise ValueError("give ignore_count or ignore_until, not both")
    if count is not None and (isinstance(count, bool) or not 1 <= count <= MAX_IGNORE_COUNT):
        raise ValueError(f"ignore_count must be a whole number from 1 to {MAX_IGNORE_COUNT}")
    if until is not None and not math.isfinite(until):
        raise ValueError("ignore_until must be a time (seconds since the epoch)")


# --- check-in monitors -------------------------------------------------------------------------


def _monitor_config(text: Optional[str]) -> Any:
    """A stored monitor_config, or None (none stored, or no longer readable here)."""
    if text is None:
        return None
    try:
        return parse_monitor_config(json.loads(text))
    except (ValueError, MonitorConfigError):
        return None


_CHECKIN_COLUMNS = "monitor_id, check_in_id, status, started, updated, duration, environment"


def _recent_checkins(
    conn: sqlite3.Connection, where: str, params: tuple[Any, ...], checkins: int
) -> list[Any]:
    """The newest ``checkins`` of each monitor matching ``where``; the newest alone (what
    the alert engine reads every tick) is one index lookup per monitor."""
    if checkins <= 1:
        sql = (
            f"SELECT {_CHECKIN_COLUMNS.replace('monitor_id', 'm.id')} FROM monitors m"
            " JOIN checkins c ON c.id = (SELECT id FROM checkins WHERE monitor_id = m.id"
            f" ORDER BY started DESC, id DESC LIMIT 1){where}"
        )
        return conn.execute(sql, params).fetchall()
    sql = (
        f"SELECT {_CHECKIN_COLUMNS} FROM (SELECT *, row_number() OVER (PARTITION BY monitor_id"
        " ORDER BY started DESC, id DESC) AS n FROM checkins"
        f" WHERE monitor_id IN (SELECT m.id FROM monitors m{where})) WHERE n <= ?"
        " ORDER BY monitor_id, started DESC, id DESC"
    )
    return conn.execute(sql, (*params, checkins)).fetchall()


def _monitor_id(
    conn: sqlite3.Connection, project_id: int, item: CheckInItem, now: float, limit: int
) -> Optional[int]:
    config = None if item.config is None else json.dumps(item.config.as_dict())
    row = conn.execute(
        "SELECT id FROM monitors WHERE project_id = ? AND slug = ?", (project_id, item.slug)
    ).fetchone()
    if row is not None:
        if config is not None:
            conn.execute("UPDATE monitors SET config = ? WHERE id = ?", (config, row[0]))
        return int(row[0])
    count = conn.execute("SELECT count(*) FROM monitors WHERE project_id = ?", (project_id,))
    if count.fetchone()[0] >= limit:
        return None
    cursor = conn.execute(
        "INSERT INTO monitors (project_id, slug, config, created) VALUES (?, ?, ?, ?)",
        (project_id, item.slug, config, now),
    )
    return int(cursor.lastrowid or 0)


def _store_checkin(
    project_id: int, item: CheckInItem, now: float, max_monitors: int, keep: int
) -> Callable[[sqlite3.Connection, _Batch], bool]:
    def apply(conn: sqlite3.Connection, batch: _Batch) -> bool:
        monitor_id = _monitor_id(conn, project_id, item, now, max_monitors)
        if monitor_id is None:
            return False
        # A closing status is final: a late in_progress for the same id does not reopen it.
        conn.execute(
            "INSERT INTO checkins (monitor_id, check_in_id, status, started, updated, duration,"
            " environment) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (monitor_id, check_in_id)"
            " DO UPDATE SET status = CASE WHEN excluded.status = 'in_progress'"
            " THEN status ELSE excluded.status END, updated = excluded.updated,"
            " duration = coalesce(excluded.duration, duration),"
            " environment = coalesce(excluded.environment, environment)",
            (monitor_id, item.check_in_id, item.status, now, now, item.duration, item.environment),
        )
        conn.execute(
            "DELETE FROM checkins WHERE monitor_id = ? AND id NOT IN (SELECT id FROM checkins"
            " WHERE monitor_id = ? ORDER BY started DESC, id DESC LIMIT ?)",
            (monitor_id, monitor_id, keep),
        )
        return True

    return apply
