"""selfreport's own diagnostics: once/warn lines on stderr and the ``selfreport`` logger."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Optional, TextIO

import pytest

from selfreport import is_reporting
from selfreport._core.diag import Diagnostics, logger


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recording(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), is_reporting()))


@pytest.fixture
def own_log() -> Iterator[Recording]:
    handler = Recording()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_once_writes_the_first_of_each_kind() -> None:
    stream = io.StringIO()
    diag = Diagnostics(stream=lambda: stream)
    diag.once("a", "first a")
    diag.once("a", "second a")
    diag.once("b", "first b")
    assert lines(stream) == ["selfreport: first a", "selfreport: first b"]


def test_warn_writes_at_most_once_per_interval_per_kind() -> None:
    stream, clock = io.StringIO(), Clock()
    diag = Diagnostics(interval=10, stream=lambda: stream, clock=clock)
    diag.warn("x", "x 1")
    diag.warn("x", "x 2")
    diag.warn("y", "y 1")
    clock.now = 9.9
    diag.warn("x", "x 3")
    clock.now = 10.0
    diag.warn("x", "x 4")
    assert lines(stream) == ["selfreport: x 1", "selfreport: y 1", "selfreport: x 4"]


def test_both_log_to_the_selfreport_logger_inside_the_reporting_path(own_log: Recording) -> None:
    diag = Diagnostics(stream=lambda: None)
    diag.once("a", "told once")
    diag.warn("b", "a warning")
    assert own_log.seen == [("told once", True), ("a warning", True)]
    assert not is_reporting()


def test_default_stream_is_stderr_at_call_time(capsys: pytest.CaptureFixture[str]) -> None:
    Diagnostics().once("k", "to stderr")
    assert capsys.readouterr().err == "selfreport: to stderr\n"


def test_a_missing_or_broken_stream_is_ignored() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("stderr is closed")

    def no_stream() -> Optional[TextIO]:
        return None

    Diagnostics(stream=no_stream).once("a", "nowhere")
    Diagnostics(stream=lambda: Broken()).warn("a", "broken")


def test_reset_after_fork_gives_a_fresh_lock() -> None:
    stream = io.StringIO()
    diag = Diagnostics(stream=lambda: stream)
    diag._lock.acquire()  # as if another thread held it at fork time
    diag.reset_after_fork()
    diag.once("a", "after fork")
    assert lines(stream) == ["selfreport: after fork"]


def test_the_selfreport_logger_is_silent_by_default() -> None:
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
