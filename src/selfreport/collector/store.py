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
    "ApiToken",
    "Event",
    "Issue",
    "Project",
    "StorageError",
    "StorageFull",
    "Store",
    "User",
]

DEFAULT_PROJECT = "default"
INTERNAL_PROJECT = "selfreport-internal"


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


@dataclass(frozen=True)
class Event(EventColumns):
    """A stored event: its indexed columns, then where it is stored and its JSON."""

    id: int
    project_id: int
    issue_id: int
    payload: str


@dataclass(frozen=True)
class User:
    name: str
    created: float


@dataclass(frozen=True)
class ApiToken:
    name: str
    created: float


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
    ) -> list[Issue]:
        """Issues matching the filters (``query`` searches title and culprit), sorted by
        ``last_seen`` or ``first_seen`` (newest first) or ``count`` (most seen first)."""

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

    # --- check-in monitors (issue 13, part C) ---------------------------------------------------

    async def checkin_async(self, project_id: int, item: CheckInItem, received: float) -> bool:
        """Record a check-in received at ``received``: its monitor is made by the first one
        (at most ``max_monitors_per_project``; False when that refuses it) and its config
        replaced by any that comes along; the in_progress and closing items of one
        ``check_in_id`` are one check-in; the newest ``checkins_per_monitor`` are kept."""

    def monitors(self, project_id: Optional[int] = None, checkins: int = 1) -> list[Monitor]:
        """Every monitor (of ``project_id``) by project and slug, each with its newest
        ``checkins`` check-ins, newest first (what ``evaluate_monitors`` reads)."""
