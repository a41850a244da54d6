"""The collector's storage interface: the Store protocol and the values it deals in."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from .alerting.monitors import CheckInItem, Monitor
from .events import EventColumns, PreparedEvent

__all__ = [
    "DEFAULT_PROJECT",
    "INTERNAL_PROJECT",
    "ISSUE_STATUSES",
    "AlertRecord",
    "ApiToken",
    "Event",
    "EventOutcome",
    "Issue",
    "OutboxEntry",
    "Project",
    "StorageError",
    "StorageFull",
    "Store",
    "User",
]

DEFAULT_PROJECT = "default"
INTERNAL_PROJECT = "selfreport-internal"
# What an issue can be: open, fixed (an event reopens it: a regression), or muted (forever,
# for N more events, or until a time).
ISSUE_STATUSES = ("unresolved", "resolved", "ignored")


class StorageError(RuntimeError):
    """The storage cannot do what was asked (closed, writer stopped, database unusable)."""


class StorageFull(StorageError):
    """The write queue is at its limit: the caller should retry later (HTTP 503)."""


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    internal: bool
    public_key: str
    created: float

    def dsn(self, base_url: str) -> str:
        """The DSN for sending to this project at ``base_url`` (``http://host:port``)."""
        scheme, _, rest = base_url.rstrip("/").partition("://")
        return f"{scheme}://{self.public_key}@{rest}/{self.id}"


@dataclass(frozen=True)
class Issue:
    id: int
    project_id: int
    project: str
    title: str
    culprit: str
    level: str
    environment: Optional[str]
    release: Optional[str]
    first_seen: float
    last_seen: float
    times_seen: int
    last_event_id: str
    # Issue states. An ignore that ran out (time passed) reads as unresolved.
    status: str = "unresolved"
    ignore_count: Optional[int] = None  # ignored until this many more events, from ignoring
    ignore_until: Optional[float] = None  # ignored until then (``time.time()``)
    resolved_at: Optional[float] = None


@dataclass(frozen=True)
class EventOutcome:
    """What storing one event did, computed by the storage in the writer's batch (for alert
    rules: ``StoredEnvelope.outcomes``).

    ``regressed``: the event landed on a resolved issue, which is unresolved again. An ignored
    issue whose count or time ran out becomes unresolved too, but that is no regression;
    ``ignored`` says the event landed on an issue that stays ignored (alerts skip it).
    A duplicate (``stored`` False) changes nothing: both flags are False.
    """

    stored: bool
    issue_id: int
    new_issue: bool
    regressed: bool
    issue_title: str
    level: str
    ignored: bool = False


@dataclass(frozen=True)
class Event(EventColumns):
    """A stored event: its indexed columns, then where it is stored and its JSON."""

    id: int
    project_id: int
    issue_id: int
    payload: str


@dataclass(frozen=True)
class AlertRecord:
    """An alert: one per rule and subject while it fires, kept after it resolved.

    ``state`` is ``firing``, ``resolved`` or ``fired`` (instant alerts: new issue, regression);
    ``notifications`` counts the notifications handed to the outbox for it."""

    key: str
    rule: str
    when: str
    subject: str
    state: str
    title: str
    project: Optional[str]
    count: Optional[int]
    fired_at: float
    last_notified: Optional[float]
    resolved_at: Optional[float]
    notifications: int


@dataclass(frozen=True)
class User:
    name: str
    created: float


@dataclass(frozen=True)
class ApiToken:
    name: str
    created: float


@dataclass(frozen=True)
class OutboxEntry:
    """One notification for one notifier in the alerting outbox.

    ``payload`` is the notification as JSON; ``status`` is ``pending``, ``delivered``,
    ``failed`` (given up after its tries) or ``dropped`` (pushed out of a full outbox).
    """

    id: int  # 0 until stored
    notification_id: str
    notifier: str
    alert_key: str
    rule: str
    state: str
    title: str
    payload: str
    status: str
    created: float
    attempts: int
    next_try: float
    last_error: Optional[str] = None
    done_at: Optional[float] = None


class Store(Protocol):
    """What the collector needs from its storage: ingestion, pages, metrics, health, logins
    and forwarding use it through these members only. SQLite
    (:class:`~selfreport.collector.storage.SqliteStorage`) is the one backend today; the
    contract tests in ``tests/collector/test_store.py`` say what any backend must do.

    Events are written by :meth:`store_async`, answered only once durable; the database's
    failures reach callers as :class:`StorageError` (:class:`StorageFull` when the caller
    should retry later).
    """

    # --- state, for the operator (health, metrics, status, start-up) --------------------------

    @property
    def path(self) -> Path:
        """Where the data lives on this machine (free disk space is checked beside it)."""

    @property
    def created(self) -> bool:
        """True if opening it created a new, empty store."""

    @property
    def warning(self) -> Optional[str]:
        """Something the operator should know about the stored files, if anything."""

    @property
    def max_storage_bytes(self) -> Optional[int]:
        """Retention by size: the limit in bytes, or None."""

    @property
    def max_queue(self) -> int:
        """Writes waiting at most; more raise :class:`StorageFull`."""

    @property
    def queue_size(self) -> int:
        """Writes waiting now."""

    @property
    def writer_alive(self) -> bool:
        """The writer serves writes (started, not given up, not closed)."""

    @property
    def writer_restarts(self) -> int:
        """Restarts of the writer after unexpected failures."""

    @property
    def writer_last_error(self) -> Optional[str]:
        """The writer's last unexpected failure, if any."""

    @property
    def writer_last_error_at(self) -> Optional[float]:
        """When that was (``time.time()``)."""

    @property
    def writer_failing(self) -> int:
        """Failures of the writer in a row, not yet followed by a commit (0: it works)."""

    @property
    def deleted_for_space(self) -> int:
        """Events deleted to stay under :attr:`max_storage_bytes`."""

    def size_bytes(self) -> int:
        """The bytes the store takes on disk."""

    # --- lifecycle and writes -------------------------------------------------------------------

    def start(self) -> Store:
        """Start serving writes (idempotent); returns itself."""

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued writes (within ``timeout``) and release everything; idempotent."""

    async def store_async(self, project_id: int, events: Sequence[PreparedEvent]) -> list[bool]:
        """Store ``events`` all together or none, and answer once they are durable: per
        event, True if stored and False if its event_id was stored before in this project."""

    async def store_outcomes_async(
        self, project_id: int, events: Sequence[PreparedEvent]
    ) -> list[EventOutcome]:
        """:meth:`store_async`, answering per event what storing it did (issue, new issue,
        regression): what ingestion calls."""

    def probe(self) -> Future[float]:
        """A tiny durable write: proves that writes get through; gives its time."""

    def apply_retention(self, limit: Optional[int] = None) -> int:
        """Delete what retention (by count, age and size) says is too much, oldest first, at
        most ``limit`` events; returns how many. The backend does this by itself too; this
        is for operators and for the contract tests."""

    # --- reads (pages and the JSON API) ---------------------------------------------------------

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
        """Issues matching the filters (``query`` searches title and culprit; ``status``
        one of :data:`ISSUE_STATUSES`, None: any), sorted by ``last_seen`` or ``first_seen``
        (newest first) or ``count`` (most seen first)."""

    def issue(self, issue_id: int) -> Optional[Issue]: ...

    def events(self, issue_id: int, limit: int = 50, payloads: bool = True) -> list[Event]:
        """The newest events of an issue, newest first (``payload`` empty without payloads)."""

    def event(self, project_id: int, event_id: str) -> Optional[Event]: ...

    def environments(self) -> list[str]:
        """The environments of stored events, sorted."""

    def event_count(self, project_id: Optional[int] = None) -> int: ...

    # --- projects and keys ----------------------------------------------------------------------

    def projects(self) -> list[Project]:
        """Every project with its first key, by id."""

    def keys(self) -> dict[str, int]:
        """Every public key and its project's id."""

    def create_project(self, name: str, internal: bool = False) -> Project:
        """A new project with a fresh key; ValueError if the name is taken or bad."""

    def ensure_defaults(self) -> tuple[Project, Project]:
        """The default project and the internal (self-monitoring) one, created if missing."""

    # --- users, sessions and API tokens ---------------------------------------------------------

    def users(self) -> list[User]: ...

    def has_users(self) -> bool: ...

    def add_user(self, name: str, password_hash: str) -> User:
        """ValueError if the name is taken."""

    def set_password(self, name: str, password_hash: str, *, end_sessions: bool = True) -> bool:
        """False if no such user; ends the user's sessions unless told not to."""

    def remove_user(self, name: str) -> bool:
        """Removes the user's sessions too; False if no such user."""

    def password_hash(self, name: str) -> Optional[str]: ...

    def create_session(self, id_hash: str, user: str, expires: float) -> None: ...

    def session_user(self, id_hash: str) -> Optional[str]:
        """The user of a session that has not expired, else None."""

    def end_session(self, id_hash: str) -> bool: ...

    def add_token(self, name: str, token_hash: str) -> ApiToken:
        """ValueError if the name is taken."""

    def tokens(self) -> list[ApiToken]: ...

    def token_name(self, token_hash: str) -> Optional[str]: ...

    def revoke_token(self, name: str) -> bool: ...

    def auth_secret(self) -> bytes:
        """The server secret that signs CSRF tokens: made once, then always the same."""

    # --- forwarding: a cursor over stored events ------------------------------------------------

    def forwarding_start(self, project_id: Optional[int] = None, upstream: str = "") -> int:
        """Set up forwarding (of everything, or of ``project_id``) to ``upstream`` (an identity
        without secrets) and return the saved cursor; the first time, after a run without
        forwarding, or for another upstream or scope, the newest event's id."""

    def forwarding_off(self) -> None:
        """Record a run without forwarding (forwarding starts afresh when back)."""

    def events_to_forward(
        self, after: int, limit: int, project_id: Optional[int] = None
    ) -> tuple[list[tuple[int, str]], int]:
        """Up to ``limit`` (id, payload) after ``after``, oldest first, and the id the cursor
        may move to once they went on."""

    def forwarding_state(self, after: int, project_id: Optional[int] = None) -> dict[str, int]:
        """``cursor`` (saved), ``waiting`` (after ``after``) and ``dropped_retention``
        (deleted before they were forwarded)."""

    def save_forward_cursor(self, cursor: int) -> Future[None]:
        """Move the saved cursor forward to ``cursor``, never back."""

    # --- alerts: the alert engine's state, so firing alerts survive a restart ----------------

    def save_alert(self, alert: AlertRecord) -> None:
        """Insert or replace the alert with ``alert.key``; keeps the newest
        ``MAX_ALERTS`` alerts that are not firing (older ones are deleted)."""

    def alerts(self, *, firing_only: bool = False, limit: int = 200) -> list[AlertRecord]:
        """Alerts, newest first by when they fired (firing ones only, if asked)."""

    # --- alerting: the notification outbox ------------------------------------------------------

    def outbox_put(
        self, entries: Sequence[OutboxEntry], max_pending: int, keep_done: int
    ) -> list[OutboxEntry]:
        """Commit ``entries`` as pending (one per notification and notifier: a second put of
        the same is ignored) before returning; past ``max_pending`` pending rows the oldest are
        marked ``dropped`` and returned; only the newest ``keep_done`` finished rows are kept."""

    def outbox_due(self, now: float, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` pending rows whose ``next_try`` is at most ``now``, earliest first."""

    def outbox_next_try(self) -> Optional[float]:
        """The earliest ``next_try`` of a pending row, or None."""

    def outbox_mark(
        self,
        entry_id: int,
        status: str,
        *,
        attempts: int,
        next_try: float,
        error: Optional[str] = None,
    ) -> None:
        """Record the outcome of a try of one row."""

    def outbox_history(self, limit: int = 100) -> list[OutboxEntry]:
        """The newest ``limit`` rows, newest first."""

    def outbox_counts(self) -> dict[str, int]:
        """How many rows have each status."""

    # --- issue states, the events-over-time chart, pipeline latency ------------------------------

    def set_issue_status(
        self,
        issue_id: int,
        status: str,
        *,
        ignore_count: Optional[int] = None,
        ignore_until: Optional[float] = None,
    ) -> Optional[Issue]:
        """Resolve, reopen or ignore an issue (ignored: forever, until ``ignore_count`` more
        events, or until the time ``ignore_until``); the issue as it is now, or None if there
        is no such issue. ValueError for a bad status or ignore option. Ordered with the
        event writes: an event stored after this call sees the new state."""

    def issue_histogram(
        self, issue_id: int, since: float, bucket_seconds: float, until: Optional[float] = None
    ) -> list[int]:
        """Events of the issue (collapsed repeats included) per bucket of ``bucket_seconds``
        from ``since`` to ``until`` (default: now), oldest first; at most 1000 buckets."""

    def received_between(
        self, after: int, upto: int, project_id: Optional[int] = None
    ) -> list[float]:
        """When the events with ids in (``after``, ``upto``] were received (forwarding
        measures its latency with it)."""

    # --- check-in monitors ----------------------------------------------------------------------

    async def checkin_async(self, project_id: int, item: CheckInItem, received: float) -> bool:
        """Record a check-in received at ``received``: its monitor is made by the first one
        (at most ``max_monitors_per_project``; False when that refuses it) and its config
        replaced by any that comes along; the in_progress and closing items of one
        ``check_in_id`` are one check-in; the newest ``checkins_per_monitor`` are kept."""

    def monitors(self, project_id: Optional[int] = None, checkins: int = 1) -> list[Monitor]:
        """Every monitor (of ``project_id``) by project and slug, each with its newest
        ``checkins`` check-ins, newest first (what ``evaluate_monitors`` reads)."""
