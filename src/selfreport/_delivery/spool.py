"""A bounded on-disk spool of envelopes for outages: atomic files, ordered replay, quarantine."""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
import threading
import time
import zlib
from typing import Callable, Optional, Union

from selfreport._core.diag import Diagnostics
from selfreport._core.guard import enter_thread_for_life, reporting_path
from selfreport._core.options import check_number, check_positive
from selfreport.exceptions import ConfigError

from .retry import Outcome, Retry
from .worker import ThreadOwner

__all__ = ["DEFAULT_MAX_AGE", "DEFAULT_MAX_BYTES", "Claim", "Replayer", "Spool"]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_AGE = 7 * 24 * 3600.0

_MAGIC = b"SELFREPORT-SPOOL-1"
_SUFFIX = ".env"
# {wall-clock ns}-{per-process sequence}-{pid}-{random}.env: sorting the names sorts by age.
_NAME = re.compile(r"^(\d{19})-(\d{6})-(\d{1,10})-([0-9a-f]{8})\.env$")
_STALE_TMP = 600.0  # a temporary file this old was left by a crash mid-write
_WINDOWS = os.name == "nt"
_BINARY = getattr(os, "O_BINARY", 0)

Clock = Callable[[], float]
DropHook = Callable[[str, int], None]

SPOOL_STAT_KEYS = ("spooled", "dropped_full", "dropped_expired", "quarantined", "write_failed")


def _encode(body: bytes) -> bytes:
    return b"%s %d %08x\n" % (_MAGIC, len(body), zlib.crc32(body)) + body


def _decode(data: bytes) -> Union[bytes, str]:
    """The envelope in a spool file, or why the file is corrupt."""
    end = data.find(b"\n")
    if end < 0:
        return "no header line"
    fields = data[:end].split(b" ")
    if len(fields) != 3 or fields[0] != _MAGIC:
        return "not a selfreport spool file"
    try:
        length = int(fields[1])
        checksum = int(fields[2], 16)
    except ValueError:
        return "malformed header"
    body = data[end + 1 :]
    if len(body) != length:
        return f"truncated: {len(body)} of {length} bytes"
    if zlib.crc32(body) != checksum:
        return "checksum mismatch"
    return body


if sys.platform == "win32":  # pragma: no cover - not tested here
    import msvcrt

    def _try_lock(fd: int) -> bool:
        """An exclusive lock that the system releases when the process dies."""
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        """An exclusive lock that the kernel releases when the process dies (even by kill -9)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True


class Claim:
    """A spool file locked for sending: :meth:`ack` deletes it, :meth:`release` keeps it."""

    __slots__ = ("_fd", "_spool", "body", "name")

    def __init__(self, spool: Spool, name: str, fd: int, body: bytes) -> None:
        self._spool = spool
        self._fd: Optional[int] = fd
        self.name = name
        self.body = body

    def ack(self) -> None:
        """Delivered (or refused for good): remove the file, then let go of the lock."""
        self._spool._remove(self.name)
        self.release()

    def quarantine(self, reason: str) -> None:
        """Refused for good, or failed too often: move the file aside, then let go of it."""
        self._spool._quarantine(self.name, reason)
        self.release()

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover - closing cannot fail on a valid descriptor
                pass


class Spool:
    """Envelopes kept on disk while the upstream cannot take them, one file per envelope.

    Writes are atomic and durable (temporary file, fsync, rename, fsync of the directory), so
    a crash never leaves a half-written envelope where replay looks. Replay takes the oldest
    first and locks each file while sending it (an ``flock`` the kernel drops if the process
    dies), so processes sharing a directory never send the same file twice. Over ``max_bytes``
    the oldest files are dropped; files older than ``max_age`` seconds expire. A file that
    cannot be read or fails its checksum moves to ``quarantine/`` with a log line.

    Nothing here raises into the caller once constructed: failures are logged and counted.

    Raises:
        ConfigError: for invalid limits or a directory that cannot be created.
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike[str]],
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Clock = time.time,
        *,
        diagnostics: Optional[Diagnostics] = None,
        on_drop: Optional[DropHook] = None,
        max_quarantined: int = 100,
        rescan_interval: float = 5.0,
    ) -> None:
        check_number("spool_max_bytes", max_bytes, 1024, integer=True)
        check_positive("spool_max_age", max_age)
        try:
            path = os.path.abspath(os.fspath(directory))
        except TypeError:
            raise ConfigError("spool_dir", "must be a path") from None
        self.directory = path
        self.max_bytes = max_bytes
        self.max_age = float(max_age)
        self.max_quarantined = max_quarantined
        self.rescan_interval = rescan_interval
        self._clock = clock
        self._tmp_dir = os.path.join(path, "tmp")
        self.quarantine_dir = os.path.join(path, "quarantine")
        for folder in (path, self._tmp_dir, self.quarantine_dir):
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise ConfigError("spool_dir", f"cannot create {folder!r}: {exc}") from None
        if not os.access(path, os.W_OK | os.X_OK):  # pragma: no cover - root may write anywhere
            raise ConfigError("spool_dir", f"{path!r} is not writable")
        self.diagnostics = diagnostics or Diagnostics()
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._index: dict[str, int] = {}
        self._scanned_at = -math.inf
        self._unmovable: set[str] = set()
        self._counts = dict.fromkeys(SPOOL_STAT_KEYS, 0)
        self._remove_stale_temporaries()

    # --- bookkeeping -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
            out["files"] = len(self._index)
            out["bytes"] = sum(self._index.values())
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[key] += amount

    def _dropped(self, reason: str, amount: int) -> None:
        self._count("dropped_" + reason, amount)
        self._notify(reason, amount)

    def _notify(self, reason: str, amount: int) -> None:
        if self._on_drop is not None:
            try:
                self._on_drop(reason, amount)
            except Exception:  # pragma: no cover - the hook is ours and only counts
                pass

    def _warn(self, kind: str, message: str) -> None:
        with reporting_path():
            self.diagnostics.warn(kind, message)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    # --- writing -----------------------------------------------------------------------------

    def _new_name(self) -> str:
        stamp = max(0, int(self._clock() * 1e9))
        sequence = next(self._sequence) % 1_000_000
        return f"{stamp:019d}-{sequence:06d}-{os.getpid()}-{os.urandom(4).hex()}{_SUFFIX}"

    def fits(self, body: bytes) -> bool:
        """Whether ``body`` is small enough for this spool at all."""
        return len(_encode(body)) <= self.max_bytes

    def put(self, body: bytes) -> bool:
        """Store ``body`` durably; True once it is safe on disk (False: dropped and counted)."""
        data = _encode(body)
        if len(data) > self.max_bytes:
            self._dropped("full", 1)
            self._warn("spool_full", f"an envelope of {len(data)} bytes exceeds spool_max_bytes")
            return False
        name = self._new_name()
        if not self._write(data, name, self.directory):
            return False
        with self._lock:
            self._index[name] = len(data)
            self._counts["spooled"] += 1
        return True

    def quarantine_body(self, body: bytes, reason: str) -> bool:
        """Keep an envelope the upstream refused for good in ``quarantine/``, counted; False
        when it could not be written (logged; the caller counts the envelope as lost)."""
        name = self._new_name()
        if not self._write(_encode(body), name, self.quarantine_dir):
            return False
        self._count("quarantined")
        self._notify("quarantined", 1)
        self._trim_quarantine()
        self._warn("spool_quarantine", f"quarantined an envelope ({reason}) as {name}")
        return True

    def _write(self, data: bytes, name: str, folder: str) -> bool:
        """Write ``data`` as ``folder/name``, atomically and durably; False: counted, logged."""
        temporary = os.path.join(self._tmp_dir, name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o600)
            try:
                # Locked while being written: a process starting meanwhile leaves it alone,
                # and one that finds it unlocked knows its writer died (kill -9) mid-write.
                # (Unlocked before the rename, so the spooled file is free for replay at once.)
                _try_lock(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if folder == self.directory:
                self._make_room(len(data))
            os.replace(temporary, os.path.join(folder, name))
            self._sync_directory()
        except OSError as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            self._count("write_failed")
            self._warn("spool_write", f"could not write to the spool {self.directory!r}: {exc!r}")
            return False
        return True

    def _sync_directory(self) -> None:
        if _WINDOWS:  # pragma: no cover - directories cannot be opened there
            return
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _make_room(self, size: int) -> None:
        """Drop the oldest files until ``size`` more bytes fit under ``max_bytes``."""
        dropped = 0
        with self._lock:
            if self._clock() - self._scanned_at > self.rescan_interval:
                self._rescan_locked()
            total = sum(self._index.values())
            if total + size <= self.max_bytes:
                return
            for name in sorted(self._index):
                if total + size <= self.max_bytes:
                    break
                total -= self._index.pop(name)
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:  # sent or dropped by someone else meanwhile
                    continue
                dropped += 1
        if dropped:
            self._dropped("full", dropped)
            self._warn("spool_full", "spool full: dropped the oldest envelopes")

    # --- reading -----------------------------------------------------------------------------

    def _rescan_locked(self) -> None:
        index: dict[str, int] = {}
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if _NAME.match(entry.name) and entry.name not in self._unmovable:
                        try:
                            index[entry.name] = entry.stat().st_size
                        except OSError:  # pragma: no cover - removed while listing
                            continue
        except OSError as exc:
            self._warn("spool_scan", f"could not list the spool {self.directory!r}: {exc!r}")
            return
        self._index = index
        self._scanned_at = self._clock()

    def pending(self) -> list[str]:
        """Names of the spooled envelopes, oldest first; expired ones are dropped on the way."""
        with self._lock:
            self._rescan_locked()
            names = sorted(self._index)
        now = self._clock()
        expired = 0
        fresh = []
        for name in names:
            if now - int(name[:19]) / 1e9 > self.max_age:
                if self._remove(name):
                    expired += 1
            else:
                fresh.append(name)
        if expired:
            self._dropped("expired", expired)
        return fresh

    def claim(self, name: str) -> Optional[Claim]:
        """Lock and read ``name``; None when it is gone, locked elsewhere or quarantined."""
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | _BINARY)
        except FileNotFoundError:
            with self._lock:
                self._index.pop(name, None)
            return None
        except OSError as exc:
            self._quarantine(name, f"cannot open it: {exc}")
            return None
        if not _try_lock(fd):
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_nlink == 0:  # sent and removed by another process meanwhile
                os.close(fd)
                return None
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as exc:  # pragma: no cover - an I/O error on a file we could open
            os.close(fd)
            self._quarantine(name, f"cannot read it: {exc}")
            return None
        body = _decode(b"".join(chunks))
        if isinstance(body, str):
            os.close(fd)
            self._quarantine(name, body)
            return None
        return Claim(self, name, fd, body)

    def _remove(self, name: str) -> bool:
        with self._lock:
            self._index.pop(name, None)
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._warn("spool_remove", f"could not remove spool file {name}: {exc!r}")
            return False
        return True

    def _quarantine(self, name: str, reason: str) -> None:
        with self._lock:
            self._index.pop(name, None)
        source = os.path.join(self.directory, name)
        target = os.path.join(self.quarantine_dir, name)
        try:
            os.replace(source, target)
        except FileNotFoundError:  # pragma: no cover - removed by another process meanwhile
            return
        except OSError as exc:
            with self._lock:
                self._unmovable.add(name)
            message = f"could not quarantine spool file {source} ({reason}): {exc!r}; skipping it"
        else:
            self._count("quarantined")
            self._notify("quarantined", 1)
            message = f"quarantined spool file {source} ({reason}) into {self.quarantine_dir}"
            self._trim_quarantine()
        # One line per file (on stderr and the selfreport logger); each file only once.
        self._warn("spool_quarantine:" + name, message)

    def _trim_quarantine(self) -> None:
        try:
            names = sorted(n for n in os.listdir(self.quarantine_dir) if _NAME.match(n))
            for name in names[: max(0, len(names) - self.max_quarantined)]:
                os.unlink(os.path.join(self.quarantine_dir, name))
        except OSError:  # pragma: no cover - best effort housekeeping
            pass

    def _remove_stale_temporaries(self) -> None:
        """Remove what writers that died mid-write left (their lock died with them)."""
        now = time.time()
        try:
            with os.scandir(self._tmp_dir) as entries:
                for entry in entries:
                    try:
                        if _WINDOWS:  # pragma: no cover - no lock on the file being written
                            if now - entry.stat().st_mtime > _STALE_TMP:
                                os.unlink(entry.path)
                            continue
                        fd = os.open(entry.path, os.O_RDONLY)
                        try:
                            if _try_lock(fd):  # no writer holds it: abandoned (or just renamed)
                                os.unlink(entry.path)
                        finally:
                            os.close(fd)
                    except OSError:  # pragma: no cover - finished or removed meanwhile
                        continue
        except OSError:  # pragma: no cover - the folder was just created
            pass


# Outcomes that leave an envelope in the spool for a later round.
_KEEP = frozenset({Outcome.FAILED, Outcome.RATE_LIMITED, Outcome.UNREACHABLE})


class Replayer(ThreadOwner):
    """Drains a :class:`Spool` oldest first on its own thread, backing off while the upstream
    is down; the thread is part of the reporting path for its whole life.

    The delivery path asks :attr:`down` to decide whether to spool at once (no point trying an
    upstream that just failed) and calls :meth:`spooled` after each write, which starts the
    thread if needed and, after a failure, marks the upstream down so the next round waits as
    the :class:`~selfreport._delivery.retry.Retry` ``policy`` says: its backoff, doubling up to its
    cap, or longer if ``retry_after()`` (the upstream's ``Retry-After`` and rate limits) says.
    A rate limit stops a round too, even one announced by an answer that took an envelope.

    ``send`` answers with a :class:`~selfreport._delivery.retry.Outcome`. One bad envelope never
    holds up the others: one the upstream refuses for good (4xx) is quarantined at once; one that
    fails (5xx) is passed over for the next, and quarantined once the policy has no retry left for
    it, each failure counting only after the upstream took other envelopes since its last counted
    one (so an outage quarantines nothing, whatever failed before it). Two failures in a row, no
    answer or a 429 mean the upstream itself is unavailable: the round stops there and the next one
    waits."""

    def __init__(
        self,
        spool: Spool,
        send: Callable[[bytes], Outcome],
        *,
        retry_after: Callable[[], float] = lambda: 0.0,
        on_sent: Callable[[], None] = lambda: None,
        interrupt: Optional[Callable[[], None]] = None,
        policy: Optional[Retry] = None,
        idle_interval: float = 30.0,
        name: str = "selfreport-replay",
    ) -> None:
        self.spool = spool
        self.policy = policy or Retry.for_replay()
        self._send = send
        self._retry_after = retry_after
        self._on_sent = on_sent
        self._interrupt = interrupt
        self.idle_interval = idle_interval
        self.name = name
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._woken = False
        self._down = False
        self._rounds = self.policy  # failed rounds in a row, for the backoff between them
        self._busy = False
        # spool file -> (its policy: 5xx answers counted, envelopes answered when it first failed)
        self._failures: dict[str, tuple[Retry, int]] = {}
        self._answers = 0  # envelopes the upstream took or refused

    def after_fork_in_child(self) -> None:
        self._reset()

    @property
    def down(self) -> bool:
        """Whether the upstream failed and has not answered a replay since."""
        return self._down

    def start(self) -> None:
        with self._cond:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None and not self._stopping:
            self._start_thread()

    def spooled(self, upstream_failed: bool) -> None:
        """An envelope was just spooled; ``upstream_failed``: because sending it failed."""
        with self._cond:
            if upstream_failed:
                self._down = True
            self._woken = True
            self._start_locked()
            self._cond.notify_all()

    def idle(self) -> bool:
        """Whether nothing is waiting in the spool and no replay is under way."""
        return not self._busy and len(self.spool) == 0

    def stop(self, timeout: float) -> bool:
        """Stop after the envelope in flight (bounded by ``timeout``); files stay spooled."""
        thread = self._signal_stop()
        if thread is None:
            return True
        thread.join(max(0.0, timeout))
        if thread.is_alive() and self._interrupt is not None:
            try:
                self._interrupt()
            except Exception:  # pragma: no cover - interrupting is best effort
                pass
            thread.join(0.5)
        return not thread.is_alive()

    # --- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        enter_thread_for_life()
        while True:
            with self._cond:
                if self._stopping:
                    return
                wait = self._next_wait_locked()
                if wait > 0 and not self._sleep_locked(wait):
                    return
                self._woken = False
                self._busy = True
            try:
                drained = self._drain()
            except Exception as exc:  # pragma: no cover - the spool and send catch their own
                self.spool._warn("replay_error", f"spool replay failed: {exc!r}")
                drained = False
                self._down = True
            with self._cond:
                self._busy = False
                if drained:
                    self._down = False
                    if not self._woken and not self._stopping:
                        self._cond.wait(self.idle_interval)

    def _sleep_locked(self, seconds: float) -> bool:
        """Wait out a backoff (new spooled files do not cut it short); False when stopping."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._cond.wait(remaining)
        return False

    def _asked(self) -> float:
        """Seconds the upstream asked us to wait (Retry-After, rate limits): even when not down."""
        try:
            return float(self._retry_after())
        except Exception:  # pragma: no cover - the hint comes from UpstreamLimits
            return 0.0

    def _next_wait_locked(self) -> float:
        asked = self._asked()
        if not self._down:
            return asked
        self._rounds = self._rounds.increment()
        return self._rounds.get_sleep_time(asked)

    def _drain(self) -> bool:
        """Send what is spooled, oldest first; False when something is left to retry."""
        failed: list[str] = []  # 5xx this round
        in_a_row = 0
        unavailable = False
        pending = self.spool.pending()
        if self._failures:  # forget files sent, dropped or expired meanwhile
            names = set(pending)
            self._failures = {n: f for n, f in self._failures.items() if n in names}
        for name in pending:
            if self._stopping:
                return False
            claim = self.spool.claim(name)
            if claim is None:
                continue
            try:
                outcome = self._send(claim.body)
            except Exception:  # pragma: no cover - send functions classify their own errors
                outcome = Outcome.UNREACHABLE
            if outcome in _KEEP:
                claim.release()
                if outcome is Outcome.FAILED:
                    failed.append(name)
                    self._failures.setdefault(name, (self.policy, self._answers))
                in_a_row += 1
                # Unavailable (a 503's Retry-After too), or two failures in a row: the
                # upstream itself is in trouble.
                if outcome is not Outcome.FAILED or in_a_row >= 2 or self._asked() > 0:
                    unavailable = True
                    break
                continue
            in_a_row = 0
            self._answered(claim, outcome)
            if self._asked() > 0:  # rate limited, even by an answer that took the envelope
                break
        else:
            if not failed:
                return True
        for name in failed:
            self._failed_once(name)
        if failed or unavailable:
            self._down = True
        return False

    def _answered(self, claim: Claim, outcome: Outcome) -> None:
        """The upstream took ``claim`` or refused it for good: either way it leaves the spool."""
        self._answers += 1
        self._failures.pop(claim.name, None)
        if outcome is Outcome.REFUSED:
            claim.quarantine("the upstream refused it")
            return
        claim.ack()
        self._down = False
        self._rounds = self.policy
        self._on_sent()

    def _failed_once(self, name: str) -> None:
        """Count a 5xx of ``name`` if the upstream took other envelopes since its last counted
        failure (so an outage counts nothing); quarantine it once the policy has no retry left."""
        retry, answers = self._failures[name]
        if self._answers == answers:
            return
        if retry.is_retry(Outcome.FAILED):
            # The next failure counts only if others go through again.
            self._failures[name] = (retry.increment(), self._answers)
            return
        del self._failures[name]
        claim = self.spool.claim(name)
        if claim is not None:
            claim.quarantine(f"the upstream failed on it {retry.attempts + 1} times")
