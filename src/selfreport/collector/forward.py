"""Forwarding what the collector stored upstream: from the database, through a Destination."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from selfreport._core.guard import enter_thread_for_life, reporting_path
from selfreport._onprem.destination import Destination
from selfreport.exceptions import ConfigError

from .ingest import StoredEnvelope
from .store import StorageError, Store

__all__ = ["FORWARD_MODES", "UPSTREAM_ENV", "Forwarder", "upstream_dsn"]

FORWARD_MODES = ("all", "own")
UPSTREAM_ENV = "SELFREPORT_UPSTREAM_DSN"
logger = logging.getLogger("selfreport.collector")


def upstream_dsn(
    argument: Optional[str], path: Optional[str], environ: Mapping[str, str]
) -> Optional[str]:
    """The upstream DSN from ``--upstream``, ``--upstream-file`` or ``$SELFREPORT_UPSTREAM_DSN``
    (in that order; giving both options is an error). A DSN carries a secret, so the file must
    not be readable by group or others.

    Raises:
        ConfigError: both options, an unreadable or too open file, an empty one.
    """
    if argument is not None and path is not None:
        raise ConfigError("upstream", "give --upstream or --upstream-file, not both")
    if argument is not None:
        return argument
    if path is None:
        return environ.get(UPSTREAM_ENV) or None
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            if os.name == "posix" and mode & 0o077:
                raise ConfigError(
                    "upstream-file",
                    f"{path} is readable by other users (mode {stat.S_IMODE(mode):04o}): "
                    f"it holds a secret, chmod 600 it",
                )
            text = file.read(4096).strip()
    except OSError as exc:
        raise ConfigError("upstream-file", f"cannot read {path}: {exc.strerror or exc}") from None
    if not text:
        raise ConfigError("upstream-file", f"{path} is empty")
    return text


class Forwarder:
    """Sends what the collector committed on to an upstream, without ever losing it.

    Forwarding is driven from the database, not from the request: a thread reads the events
    stored after a cursor (the last event id handed on, kept in the database), gives them to
    a :class:`~selfreport.Destination` and moves the cursor only once the upstream took them
    or the destination's spool holds them on disk. So ingestion acknowledges an event as soon
    as it is committed and pays nothing more for forwarding, and a crash (even ``kill -9``)
    loses nothing: after a restart, forwarding resumes after the saved cursor (an event handed
    on since the last save is sent once more; collectors deduplicate by ``event_id``).

    ``mode="all"`` forwards every project's events, ``"own"`` only those of the collector's
    internal project (its self-reports). Only events stored for the first time go on, so a
    collector forwarding into itself, or a replayed duplicate, cannot loop. The destination has
    no rate limit: what the upstream cannot take now waits in the spool (``spool_dir``), or,
    without one, is retried a few times and then counted as ``send_failed``; once the spool is
    nearly full, the events wait in the database instead. Everything that is dropped is
    counted in :meth:`stats`, as is every event retention deleted before it could be forwarded
    (``dropped_retention``).

    Call :meth:`start` with the storage; it is also an ``on_stored`` hook, which wakes the
    forwarding thread when new events were committed.
    """

    def __init__(
        self,
        upstream: Union[str, Destination],
        *,
        mode: str = "all",
        scrub: bool = False,
        spool_dir: Optional[str] = None,
        batch_size: int = 100,
        save_interval: float = 1.0,
        full_interval: float = 1.0,
        **options: Any,
    ) -> None:
        if mode not in FORWARD_MODES:
            raise ConfigError("forward", f"must be one of {', '.join(FORWARD_MODES)}, not {mode!r}")
        self.mode = mode
        if isinstance(upstream, Destination):
            self.destination = upstream
        else:
            # No token bucket: every stored event goes on, the spool takes what cannot yet.
            options.setdefault("rate_limit", 0.0)
            self.destination = Destination(
                upstream, name="upstream", scrub=scrub, spool_dir=spool_dir, **options
            )
        self.batch_size = max(1, batch_size)  # events read from the database at a time
        self.save_interval = save_interval
        self.full_interval = full_interval  # how often to look again while the spool is full
        self.storage: Optional[Store] = None
        self.project_id: Optional[int] = None
        self.cursor = 0  # every event up to here was sent, spooled or counted as dropped
        self._saved = 0
        self._saved_at = 0.0
        # What stats() reports from the database, kept by the forwarding thread: stats() is
        # called on the event loop (/metrics, /status) and must not wait on SQLite there.
        self._waiting = 0
        self._dropped_retention = 0
        self._refreshed_at = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # Pipeline latency: called with ("forwarded", seconds from received to handed on) per event.
        self.latency: Optional[Callable[[str, float], None]] = None
        self.clock: Callable[[], float] = time.time  # the clock events' ``received`` is on

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, storage: Store, internal_project_id: Optional[int] = None) -> Forwarder:
        """Resume after the saved cursor in ``storage`` (whose writer must run)."""
        if self.mode == "own":
            if internal_project_id is None:
                raise ConfigError("forward", "'own' needs the collector's internal project")
            self.project_id = internal_project_id
        self.storage = storage
        dsn = self.destination.dsn
        identity = "" if dsn is None else dsn.envelope_url  # no key: meta is no place for it
        self.cursor = self._saved = storage.forwarding_start(self.project_id, identity)
        self._saved_at = time.monotonic()
        self._refresh()
        self._thread = threading.Thread(target=self._run, name="selfreport-forwarder", daemon=True)
        self._thread.start()
        return self

    def __call__(self, stored: StoredEnvelope) -> None:
        """The ``on_stored`` hook: new events are committed."""
        self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        """Stop forwarding, save the cursor, close the destination (queued events are spooled)."""
        deadline = time.monotonic() + max(0.0, timeout)
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            # Half the time for the events in flight; the rest for the destination's close.
            thread.join(max(0.0, timeout / 2))
            if not thread.is_alive():
                self._save(force=True, timeout=max(0.1, deadline - time.monotonic()))
        self.destination.close(max(0.0, deadline - time.monotonic()))

    # --- stats -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The destination's counters, plus ``waiting`` (stored events not yet handed on) and
        ``dropped_retention`` (deleted by retention before they were forwarded), as the
        forwarding thread last counted them (at most about a second ago while it runs): this
        never touches the database, so it may be called on an event loop."""
        out = self.destination.stats()
        out["waiting"] = self._waiting
        out["dropped_retention"] = self._dropped_retention
        return out

    def _refresh(self) -> None:
        """Count (in the forwarding thread) what :meth:`stats` reports from the database."""
        storage = self.storage
        if storage is None:
            return
        try:
            state = storage.forwarding_state(self.cursor, self.project_id)
        except StorageError:  # closed: keep the last numbers
            return
        self._waiting = state["waiting"]
        self._dropped_retention = state["dropped_retention"]
        self._refreshed_at = time.monotonic()

    # --- the forwarding thread ---------------------------------------------------------------

    def _run(self) -> None:
        enter_thread_for_life()
        while not self._stopping.is_set():
            if self.destination.spool_nearly_full():
                # The events wait in the database; reading them now would only be thrown away,
                # and every new event (a wake) would read them again: look again on a timer.
                self._refresh()
                self._stopping.wait(self.full_interval)
                continue
            try:
                more = self._forward_batch()
            except Exception as error:  # the database is busy, closed or broken: try again
                with reporting_path():
                    logger.warning("forwarding paused: %r", error)
                more = False
                self._stopping.wait(1.0)
            self._save()
            if not more or time.monotonic() - self._refreshed_at >= 1.0:
                self._refresh()
            if not more:
                self._wake.wait(1.0)
                self._wake.clear()

    def _forward_batch(self) -> bool:
        """Hand on the next events; True when there may be more right away."""
        storage = self.storage
        assert storage is not None
        destination = self.destination
        rows, upto = storage.events_to_forward(self.cursor, self.batch_size, self.project_id)
        handed = self.cursor
        for row_id, payload in rows:
            # One at a time (the destination sends one at a time anyway), and not into a
            # nearly full spool: the database keeps them meanwhile (retention counts what it
            # deletes first).
            if destination.spool_nearly_full():
                break
            try:
                event = json.loads(payload)
            except ValueError:  # pragma: no cover - stored payloads are JSON the collector wrote
                event = None
            destination.send_event(event)  # anything not queued is counted there
            # Sent, spooled or counted: only then may the cursor move past it.
            if not self._flushed():
                break
            handed = row_id
        else:
            handed = upto  # past other projects' events too
        self._measure(self.cursor, handed)
        self.cursor = handed
        return handed == upto and len(rows) == self.batch_size

    def _measure(self, after: int, upto: int) -> None:
        """The latency of the events just handed on (one read per batch)."""
        latency, storage = self.latency, self.storage
        if latency is None or storage is None or upto <= after:
            return
        now = self.clock()
        for received in storage.received_between(after, upto, self.project_id):
            latency("forwarded", now - received)

    def _flushed(self) -> bool:
        """Wait until the destination sent, spooled or counted all it was given; False when
        stopping first."""
        while not self.destination.flush(1.0):
            if self._stopping.is_set():
                return False
        return True

    def _save(self, force: bool = False, timeout: float = 5.0) -> None:
        """Save the cursor, at most once per ``save_interval`` (a crash in between only sends
        the events since the last save once more)."""
        storage = self.storage
        cursor = self.cursor
        if storage is None or cursor == self._saved:
            return
        if not force and time.monotonic() - self._saved_at < self.save_interval:
            return
        try:
            storage.save_forward_cursor(cursor).result(timeout)
        except Exception as error:  # full, stalled or closed: saved next time
            with reporting_path():
                logger.warning("could not save the forwarding cursor: %r", error)
            return
        self._saved = cursor
        self._saved_at = time.monotonic()
