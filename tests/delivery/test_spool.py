"""Spool and Replayer: real files and directories, real locks, real subprocesses."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from tests.conftest import wait_until

from selfreport import ConfigError
from selfreport._core.guard import is_reporting
from selfreport._delivery.retry import Outcome, Retry
from selfreport._delivery.spool import Replayer, Spool

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and fork semantics")


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def envelope(n: int, size: int = 10) -> bytes:
    return f"envelope-{n:04d}-".encode() + b"x" * size


def spool_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".env"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


# --- writing and reading -------------------------------------------------------------------


def test_put_then_replay_oldest_first(tmp_path: Path, clock: Clock) -> None:
    spool = Spool(tmp_path, clock=clock)
    for n in range(5):
        assert spool.put(envelope(n))
        clock.advance(0.001 if n % 2 else 0.0)  # same timestamp: the sequence number decides
    names = spool.pending()
    assert names == spool_files(tmp_path)
    bodies = []
    for name in names:
        claim = spool.claim(name)
        assert claim is not None
        bodies.append(claim.body)
        claim.ack()
    assert bodies == [envelope(n) for n in range(5)]
    assert spool.pending() == []
    assert len(spool) == 0
    assert spool.stats()["spooled"] == 5


def test_files_are_private_and_complete(tmp_path: Path, clock: Clock) -> None:
    spool = Spool(tmp_path / "spool", clock=clock)
    assert spool.put(b"body")
    (name,) = spool_files(tmp_path / "spool")
    data = (tmp_path / "spool" / name).read_bytes()
    assert data.startswith(b"SELFREPORT-SPOOL-1 4 ")
    assert data.endswith(b"\nbody")
    assert (tmp_path / "spool" / name).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_released_claims_stay_and_another_spool_sees_new_files(
    tmp_path: Path, clock: Clock
) -> None:
    first = Spool(tmp_path, clock=clock)
    second = Spool(tmp_path, clock=clock, rescan_interval=0)
    assert first.put(envelope(1))
    (name,) = second.pending()
    claim = second.claim(name)
    assert claim is not None
    claim.release()
    claim.release()  # twice is harmless
    assert first.pending() == [name]


def test_a_claimed_file_cannot_be_claimed_twice(tmp_path: Path, clock: Clock) -> None:
    first = Spool(tmp_path, clock=clock)
    second = Spool(tmp_path, clock=clock)
    first.put(envelope(1))
    (name,) = first.pending()
    claim = first.claim(name)
    assert claim is not None
    assert second.claim(name) is None  # locked
    claim.ack()
    assert second.claim(name) is None  # gone


def test_a_file_sent_by_another_process_while_waiting_is_skipped(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Process B opens the file, process A sends and removes it and lets go of the lock, then
    # B gets the lock: B must see the file is gone instead of sending it again.
    first = Spool(tmp_path, clock=clock)
    second = Spool(tmp_path, clock=clock)
    first.put(envelope(1))
    (name,) = first.pending()
    held = first.claim(name)
    assert held is not None
    import selfreport._delivery.spool as module

    real_lock = module._try_lock

    def lock_after_the_other_acks(fd: int) -> bool:
        held.ack()
        return real_lock(fd)

    monkeypatch.setattr(module, "_try_lock", lock_after_the_other_acks)
    assert second.claim(name) is None


def test_the_lock_dies_with_the_process(tmp_path: Path, clock: Clock) -> None:
    spool = Spool(tmp_path, clock=clock)
    spool.put(envelope(1))
    (name,) = spool.pending()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from selfreport._delivery.spool import Spool\n"
            "claim = Spool(sys.argv[1]).claim(sys.argv[2])\n"
            "print('held' if claim else 'missed', flush=True)\n"
            "time.sleep(60)",
            str(tmp_path),
            name,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert spool.claim(name) is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        claim = spool.claim(name)
        assert claim is not None
        assert claim.body == envelope(1)
        claim.release()
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()  # type: ignore[union-attr]


# --- limits --------------------------------------------------------------------------------


def test_the_oldest_go_first_when_full(tmp_path: Path, clock: Clock) -> None:
    drops: list[tuple[str, int]] = []
    spool = Spool(tmp_path, max_bytes=1024, clock=clock, on_drop=lambda r, n: drops.append((r, n)))
    size = len(envelope(0, 200)) + 40  # with the header line
    for n in range(8):
        assert spool.put(envelope(n, 200))
        clock.advance(1)
    kept = [spool.claim(name) for name in spool.pending()]
    assert [c.body[:13] for c in kept if c] == [
        envelope(n)[:13] for n in range(8 - 1024 // size, 8)
    ]
    for claim in kept:
        assert claim is not None
        claim.release()
    assert sum(n for _, n in drops) == 8 - 1024 // size
    assert {reason for reason, _ in drops} == {"full"}
    assert spool.stats()["dropped_full"] == 8 - 1024 // size
    assert spool.stats()["bytes"] <= 1024


def test_an_envelope_bigger_than_the_spool_is_refused(tmp_path: Path, clock: Clock) -> None:
    drops: list[tuple[str, int]] = []
    spool = Spool(tmp_path, max_bytes=1024, clock=clock, on_drop=lambda r, n: drops.append((r, n)))
    assert not spool.fits(b"x" * 2000)
    assert not spool.put(b"x" * 2000)
    assert drops == [("full", 1)]
    assert spool_files(tmp_path) == []


def test_old_envelopes_expire(tmp_path: Path, clock: Clock) -> None:
    drops: list[tuple[str, int]] = []
    spool = Spool(tmp_path, max_age=60, clock=clock, on_drop=lambda r, n: drops.append((r, n)))
    spool.put(envelope(1))
    clock.advance(50)
    spool.put(envelope(2))
    clock.advance(20)
    (name,) = spool.pending()
    claim = spool.claim(name)
    assert claim is not None
    assert claim.body == envelope(2)
    claim.release()
    assert drops == [("expired", 1)]
    assert spool.stats()["dropped_expired"] == 1


def test_the_size_index_is_rebuilt_from_disk(tmp_path: Path, clock: Clock) -> None:
    writer = Spool(tmp_path, clock=clock)
    for n in range(3):
        writer.put(envelope(n, 300))
    spool = Spool(tmp_path, max_bytes=1100, clock=clock)  # a new process: knows nothing yet
    spool.put(envelope(9, 300))
    assert len(spool.pending()) == 3  # one of the earlier three made room


# --- corruption ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"no newline at all", "no header line"),
        (b"GARBAGE 1 0\nx", "not a selfreport spool file"),
        (b"SELFREPORT-SPOOL-1 x y\nx", "malformed header"),
        (b"SELFREPORT-SPOOL-1 10 00000000\nshort", "truncated: 5 of 10 bytes"),
        (b"SELFREPORT-SPOOL-1 4 00000000\nbody", "checksum mismatch"),
    ],
)
def test_a_corrupt_file_is_quarantined_with_a_log_line(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    spool = Spool(tmp_path, clock=clock)
    spool.put(envelope(1))
    bad = f"{int(clock.now * 1e9) - 1:019d}-000000-1-deadbeef.env"  # just older
    (tmp_path / bad).write_bytes(content)
    caplog.set_level(logging.WARNING, logger="selfreport")
    names = spool.pending()
    assert names[0] == bad
    assert spool.claim(bad) is None
    assert (tmp_path / "quarantine" / bad).read_bytes() == content
    assert spool.pending() == names[1:]
    assert spool.stats()["quarantined"] == 1
    (record,) = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert record.name == "selfreport"
    assert reason in record.getMessage()
    assert bad in record.getMessage()


def test_an_unreadable_entry_is_quarantined(tmp_path: Path, clock: Clock) -> None:
    spool = Spool(tmp_path, clock=clock)
    weird = "0000000000000000001-000000-1-deadbeef.env"
    (tmp_path / weird).mkdir()  # cannot be opened for writing
    assert spool.claim(weird) is None
    assert (tmp_path / "quarantine" / weird).is_dir()


def test_a_file_that_cannot_be_quarantined_is_skipped(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, clock=clock)
    bad = "0000000000000000001-000000-1-deadbeef.env"
    (tmp_path / bad).write_bytes(b"junk")
    (tmp_path / "quarantine").rmdir()
    (tmp_path / "quarantine").write_text("in the way")
    caplog.set_level(logging.WARNING, logger="selfreport")
    assert spool.claim(bad) is None
    assert spool.pending() == []
    assert (tmp_path / bad).exists()
    assert any("could not quarantine" in r.getMessage() for r in caplog.records)


def test_quarantine_keeps_only_the_newest(tmp_path: Path, clock: Clock) -> None:
    spool = Spool(tmp_path, clock=clock, max_quarantined=2)
    for n in range(4):
        name = f"000000000000000000{n}-000000-1-deadbeef.env"
        (tmp_path / name).write_bytes(b"junk")
        assert spool.claim(name) is None
    assert sorted(p.name[:19] for p in (tmp_path / "quarantine").iterdir()) == [
        "0000000000000000002",
        "0000000000000000003",
    ]


def test_leftovers_of_a_crash_mid_write_are_cleaned_up_at_start(
    tmp_path: Path, clock: Clock
) -> None:
    Spool(tmp_path, clock=clock)
    left = tmp_path / "tmp" / "left-by-kill-9.env.tmp"  # fresh, but its writer is gone
    being_written = tmp_path / "tmp" / "being-written.env.tmp"
    left.write_bytes(b"half")
    being_written.write_bytes(b"half")
    fd = os.open(being_written, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer in another process holds it
        spool = Spool(tmp_path, clock=clock)
        assert not left.exists()
        assert being_written.exists()
        assert spool.pending() == []  # temporaries are never replayed
    finally:
        os.close(fd)
    Spool(tmp_path, clock=clock)
    assert not being_written.exists()


def test_spool_files_and_folders_are_private(tmp_path: Path, clock: Clock) -> None:
    previous = os.umask(0)
    try:
        spool = Spool(tmp_path / "spool", clock=clock)
        assert spool.put(envelope(1))
    finally:
        os.umask(previous)
    for folder in (
        tmp_path / "spool",
        tmp_path / "spool" / "tmp",
        tmp_path / "spool" / "quarantine",
    ):
        assert folder.stat().st_mode & 0o777 == 0o700
    (name,) = spool.pending()
    assert (tmp_path / "spool" / name).stat().st_mode & 0o777 == 0o600


def test_write_failures_are_counted_not_raised(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, clock=clock)
    (tmp_path / "tmp").rmdir()
    (tmp_path / "tmp").write_text("in the way")
    caplog.set_level(logging.WARNING, logger="selfreport")
    assert not spool.put(envelope(1))
    assert spool.stats()["write_failed"] == 1
    assert any("could not write to the spool" in r.getMessage() for r in caplog.records)


def test_a_vanished_directory_is_reported_not_raised(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool", clock=clock)
    spool.put(envelope(1))
    shutil.rmtree(tmp_path / "spool")
    caplog.set_level(logging.WARNING, logger="selfreport")
    names = spool.pending()  # listing fails: logged; the names it knew are returned
    assert any("could not list the spool" in r.getMessage() for r in caplog.records)
    assert [spool.claim(name) for name in names] == [None] * len(names)
    assert not spool.put(envelope(2))


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"max_bytes": 10}, "spool_max_bytes"),
        ({"max_bytes": True}, "spool_max_bytes"),
        ({"max_age": 0}, "spool_max_age"),
        ({"max_age": float("nan")}, "spool_max_age"),
        ({"max_age": "1"}, "spool_max_age"),
    ],
)
def test_invalid_limits_are_config_errors(
    tmp_path: Path, kwargs: dict[str, object], option: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Spool(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert info.value.option == option


def test_unusable_directories_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot create"):
        Spool(tmp_path / "file" / "spool")
    with pytest.raises(ConfigError, match="must be a path"):
        Spool(42)  # type: ignore[arg-type]


# --- replay --------------------------------------------------------------------------------


class Upstream:
    """A send function with a scripted answer per call."""

    def __init__(self, answers: Callable[[int], Outcome]) -> None:
        self.answers = answers
        self.bodies: list[bytes] = []
        self.in_path: list[bool] = []
        self.calls = 0
        self.current = b""
        self.cond = threading.Condition()

    def __call__(self, body: bytes) -> Outcome:
        with self.cond:
            self.calls += 1
            self.current = body
            outcome = self.answers(self.calls)
            self.in_path.append(is_reporting())
            if outcome is not Outcome.UNREACHABLE:
                self.bodies.append(body)
            self.cond.notify_all()
            return outcome

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


def make_replayer(
    spool: Spool,
    upstream: Upstream,
    backoff: float = 0.01,
    max_backoff: float = 0.05,
    max_attempts: int = 5,
    **kwargs: object,
) -> Replayer:
    options: dict[str, object] = {"idle_interval": 0.05}
    options.update(kwargs)
    policy = Retry.for_replay(backoff, max_backoff, max_attempts)
    return Replayer(spool, upstream, policy=policy, **options)  # type: ignore[arg-type]


def test_replay_sends_in_order_from_its_own_reporting_thread(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for n in range(5):
        spool.put(envelope(n))
    upstream = Upstream(lambda call: Outcome.SENT)
    sent: list[int] = []
    replayer = make_replayer(spool, upstream, on_sent=lambda: sent.append(1))
    replayer.start()
    try:
        assert upstream.wait(lambda: len(upstream.bodies) == 5)
        assert upstream.bodies == [envelope(n) for n in range(5)]
        assert all(upstream.in_path)
        assert wait_until(replayer.idle)
        assert len(sent) == 5
        assert not replayer.down
    finally:
        assert replayer.stop(5)
    assert not replayer.alive


def test_replay_backs_off_while_the_upstream_is_down(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(envelope(1))
    spool.put(envelope(2))
    upstream = Upstream(lambda call: Outcome.UNREACHABLE if call <= 3 else Outcome.SENT)
    replayer = make_replayer(spool, upstream)
    started = time.monotonic()
    replayer.spooled(upstream_failed=True)  # the live path just failed: wait before trying
    try:
        assert replayer.down
        assert upstream.wait(lambda: len(upstream.bodies) == 2)
        assert upstream.calls == 5
        # Waits of about 0.01, 0.02, 0.04 and 0.05 (the maximum), each with jitter of -50%.
        assert time.monotonic() - started >= (0.01 + 0.02 + 0.04 + 0.05) / 2
        assert upstream.bodies == [envelope(1), envelope(2)]
    finally:
        replayer.stop(5)


def test_replay_honours_retry_after(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(envelope(1))
    upstream = Upstream(lambda call: Outcome.UNREACHABLE if call == 1 else Outcome.SENT)
    replayer = make_replayer(spool, upstream, retry_after=lambda: 0.3)
    started = time.monotonic()
    replayer.start()
    try:
        assert upstream.wait(lambda: len(upstream.bodies) == 1)
        assert time.monotonic() - started >= 0.3
    finally:
        replayer.stop(5)


@pytest.mark.parametrize(("outcome", "down"), [(Outcome.SENT, False), (Outcome.FAILED, True)])
def test_a_wait_asked_for_by_an_answer_ends_the_round(
    tmp_path: Path, outcome: Outcome, down: bool
) -> None:
    """An answer that took the envelope but announced a rate limit, or a 503 with a
    Retry-After: nothing more is sent until the wait is over."""
    spool = Spool(tmp_path)
    for n in range(3):
        spool.put(envelope(n))
    limit_until = [0.0]

    def answer(call: int) -> Outcome:
        limit_until[0] = time.monotonic() + 60  # "no more for a minute"
        return outcome

    upstream = Upstream(answer)
    replayer = make_replayer(
        spool, upstream, retry_after=lambda: max(0.0, limit_until[0] - time.monotonic())
    )
    replayer.start()
    try:
        assert upstream.wait(lambda: upstream.calls == 1)
        assert wait_until(lambda: not replayer._busy)
        assert upstream.calls == 1  # waiting out the limit
        assert len(spool) == (2 if outcome is Outcome.SENT else 3)
        assert replayer.down is down  # rate limited is not down; unavailable is
    finally:
        assert replayer.stop(5)


def spool_of(count: int, directory: Path, **options: Any) -> Spool:
    """A spool holding envelopes 0 to ``count - 1``, oldest first."""
    spool = Spool(directory, **options)
    for n in range(count):
        assert spool.put(envelope(n))
    return spool


def test_a_refused_envelope_is_quarantined_at_once_and_blocks_nothing(tmp_path: Path) -> None:
    dropped: list[tuple[str, int]] = []
    spool = spool_of(21, tmp_path, on_drop=lambda reason, n: dropped.append((reason, n)))
    upstream = Upstream(lambda call: Outcome.REFUSED if call == 1 else Outcome.SENT)
    sent: list[int] = []
    replayer = make_replayer(spool, upstream, on_sent=lambda: sent.append(1))
    replayer.start()
    try:
        assert upstream.wait(lambda: len(upstream.bodies) == 21)
        assert wait_until(replayer.idle)
        assert spool.pending() == []
        assert len(sent) == 20
        (kept,) = (tmp_path / "quarantine").iterdir()
        assert kept.read_bytes().endswith(envelope(0))
        assert spool.stats()["quarantined"] == 1
        assert dropped == [("quarantined", 1)]
    finally:
        replayer.stop(5)


def test_an_envelope_failing_with_5xx_is_passed_over_then_quarantined(tmp_path: Path) -> None:
    spool = spool_of(21, tmp_path)
    poison = envelope(0)

    def answer(call: int) -> Outcome:
        if upstream.current != poison:
            return Outcome.SENT
        # Traffic goes on behind it: a failure counts only when others went through since
        # the last one (otherwise it cannot be told from an outage).
        spool.put(envelope(100 + call))
        return Outcome.FAILED

    upstream = Upstream(answer)
    replayer = make_replayer(spool, upstream, max_attempts=3)
    replayer.start()
    try:
        # The 20 behind it go at the first round, long before it is given up.
        assert upstream.wait(lambda: len([b for b in upstream.bodies if b != poison]) >= 20)
        assert upstream.wait(lambda: spool.stats()["quarantined"] == 1)
        assert upstream.bodies.count(poison) == 3
        assert wait_until(replayer.idle)
        assert spool.pending() == []
    finally:
        replayer.stop(5)


def test_an_outage_answering_5xx_quarantines_nothing(tmp_path: Path) -> None:
    spool = spool_of(3, tmp_path)
    upstream = Upstream(lambda call: Outcome.FAILED if call <= 20 else Outcome.SENT)
    replayer = make_replayer(spool, upstream, max_attempts=2)
    replayer.start()
    try:
        assert upstream.wait(lambda: upstream.calls > 20)
        assert wait_until(replayer.idle)
        # Two failures in a row stop a round: the third envelope was never tried meanwhile.
        assert upstream.bodies[-3:] == [envelope(n) for n in range(3)]
        assert spool.stats()["quarantined"] == 0
    finally:
        replayer.stop(5)


def test_an_outage_after_one_transient_5xx_quarantines_nothing(tmp_path: Path) -> None:
    # One 5xx of envelope 0 while envelope 1 went through counts once; the outage after it
    # must count nothing more (before, every outage round counted against envelope 0).
    spool = spool_of(2, tmp_path)

    def answer(call: int) -> Outcome:
        return Outcome.SENT if call == 2 or call > 12 else Outcome.FAILED

    upstream = Upstream(answer)
    replayer = make_replayer(spool, upstream, max_attempts=3)
    replayer.start()
    try:
        assert upstream.wait(lambda: upstream.calls > 12)
        assert wait_until(replayer.idle)
        assert upstream.bodies.count(envelope(0)) == 12  # the first try and 10 outage rounds
        assert upstream.bodies[-1] == envelope(0)  # then delivered
        assert spool.stats()["quarantined"] == 0
        assert spool.pending() == []
    finally:
        replayer.stop(5)


def test_files_left_by_a_crashed_process_are_picked_up_while_idle(tmp_path: Path) -> None:
    spool = Spool(tmp_path, rescan_interval=0)
    scans: list[list[str]] = []
    scan = spool.pending

    def pending() -> list[str]:  # only the replayer asks, at the start of each round
        scans.append(scan())
        return scans[-1]

    spool.pending = pending  # type: ignore[method-assign]
    upstream = Upstream(lambda call: Outcome.SENT)
    replayer = make_replayer(spool, upstream)
    replayer.start()
    try:
        assert wait_until(lambda: bool(scans))  # its first round found nothing: now idle
        Spool(tmp_path).put(envelope(7))  # another process
        assert upstream.wait(lambda: upstream.bodies == [envelope(7)])
    finally:
        replayer.stop(5)


def test_stop_interrupts_a_send_that_hangs(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(envelope(1))
    sending, release = threading.Event(), threading.Event()
    interrupted: list[bool] = []

    def hang(body: bytes) -> Outcome:
        sending.set()
        release.wait(10)
        return Outcome.UNREACHABLE

    def interrupt() -> None:
        interrupted.append(True)
        release.set()

    replayer = Replayer(spool, hang, interrupt=interrupt, policy=Retry.for_replay(0.01))
    replayer.start()
    assert sending.wait(10)
    assert replayer.stop(0.1)
    assert interrupted == [True]
    assert spool.pending() != []  # still spooled for next time
    assert replayer.stop(1)  # again: nothing to do


def test_a_stopped_replayer_does_not_start_again(tmp_path: Path) -> None:
    replayer = make_replayer(Spool(tmp_path), Upstream(lambda call: Outcome.SENT))
    assert replayer.stop(1)
    replayer.spooled(upstream_failed=False)
    assert not replayer.alive


def test_after_fork_the_child_starts_fresh(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(envelope(1))
    upstream = Upstream(lambda call: Outcome.UNREACHABLE if call == 1 else Outcome.SENT)
    replayer = make_replayer(spool, upstream, backoff=60.0, max_backoff=60.0)
    replayer.start()
    assert upstream.wait(lambda: upstream.calls == 1)
    assert wait_until(lambda: replayer.down)  # and now waiting a minute
    assert replayer.stop(5)
    # What a forked child does: no thread, not stopping, not down, fresh locks.
    spool.after_fork_in_child()
    replayer.after_fork_in_child()
    assert not replayer.down
    assert not replayer.alive
    replayer.spooled(upstream_failed=False)
    try:
        assert upstream.wait(lambda: upstream.bodies == [envelope(1)])
    finally:
        replayer.stop(5)


def test_files_removed_behind_the_spools_back(tmp_path: Path, clock: Clock) -> None:
    spool = Spool(tmp_path, max_bytes=1024, clock=clock, rescan_interval=3600)
    for n in range(3):
        spool.put(envelope(n, 200))
        clock.advance(1)
    names = spool_files(tmp_path)
    (tmp_path / names[0]).unlink()  # another process sent it
    claim = spool.claim(names[1])
    assert claim is not None
    (tmp_path / names[1]).unlink()  # and this one too, while we were sending it
    claim.ack()  # nothing to remove: fine
    for n in range(3, 6):
        assert spool.put(envelope(n, 200))
        clock.advance(1)
    assert spool.stats()["bytes"] <= 1024


def test_an_expired_entry_that_cannot_be_removed_is_reported(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, max_age=60, clock=clock)
    (tmp_path / "0000000000000000001-000000-1-deadbeef.env").mkdir()
    caplog.set_level(logging.WARNING, logger="selfreport")
    assert spool.pending() == []
    assert any("could not remove spool file" in r.getMessage() for r in caplog.records)
    assert spool.stats()["dropped_expired"] == 0


def test_replay_skips_a_file_another_process_is_sending(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(envelope(1))
    spool.put(envelope(2))
    other = Spool(tmp_path)
    first = other.claim(other.pending()[0])
    assert first is not None
    upstream = Upstream(lambda call: Outcome.SENT)
    replayer = make_replayer(spool, upstream)
    replayer.start()
    try:
        assert upstream.wait(lambda: upstream.bodies == [envelope(2)])
        first.release()  # the other process died or gave up: ours picks it up when idle
        assert upstream.wait(lambda: upstream.bodies == [envelope(2), envelope(1)])
    finally:
        replayer.stop(5)


def test_stop_ends_a_replay_between_two_envelopes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for n in range(3):
        spool.put(envelope(n))
    replayer: Replayer

    def send_then_stop(body: bytes) -> Outcome:
        threading.Thread(target=replayer.stop, args=(5,)).start()
        assert wait_until(lambda: replayer._stopping)  # stop() was called while sending
        return Outcome.SENT

    replayer = Replayer(spool, send_then_stop)
    replayer.start()
    assert wait_until(lambda: not replayer.alive)
    assert len(spool.pending()) == 2
