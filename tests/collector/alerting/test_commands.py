"""`selfreport alerts check|test` and `selfreport serve --config`: exit codes, one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.collector.alerting.receivers import HttpReceiver, http_receiver
from tests.collector.conftest import answers_health
from tests.conftest import wait_until

from selfreport.cli import main
from selfreport.collector import CollectorServer, create_app
from selfreport.collector.alerting.config import load_config
from selfreport.collector.storage import SqliteStorage


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with http_receiver() as it:
        yield it


def write_config(directory: Path, url: str, extra: str = "") -> Path:
    path = directory / "alerts.toml"
    path.write_text(
        f"""\
[[notifier]]
name = "ops"
kind = "webhook"
url = "{url}"
secret_env = "TEST_HOOK_SECRET"

[[alert]]
name = "new errors"
when = "new_issue"
notify = ["ops"]

[[uptime]]
url = "http://127.0.0.1:1/health"
interval = "30s"
{extra}""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOOK_SECRET", "s3cret")
    monkeypatch.delenv("SELFREPORT_CONFIG", raising=False)


def test_alerts_check_summarizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/hook?token=SECRET")
    assert main(["alerts", "check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 1 notifiers, 1 alert rules, 1 uptime checks" in out
    assert "notifier 'ops': webhook to http://127.0.0.1:9\n" in out
    assert "SECRET" not in out
    assert "alert 'new errors': when new_issue, notify 'ops'" in out
    assert "uptime 'http://127.0.0.1:1/health': every 30s" in out


def test_alerts_check_reads_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/")
    monkeypatch.setenv("SELFREPORT_CONFIG", str(path))
    assert main(["alerts", "check"]) == 0
    assert str(path) in capsys.readouterr().out


def test_a_bad_configuration_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/", extra="timeout = 'soon'\n")
    assert main(["alerts", "check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"selfreport: {path}:15: uptime 'http://127.0.0.1:1/health': timeout: " + (
        'must be a duration like "30s", "5m", "1h", "2d" or seconds, not \'soon\'\n'
    )
    assert main(["alerts", "test", "ops", "--config", str(path)]) == 2
    assert main(["alerts", "check"]) == 2
    assert "no configuration: pass --config PATH" in capsys.readouterr().err


def test_alerts_test_sends_through_one_notifier(
    tmp_path: Path, receiver: HttpReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, receiver.url)
    assert main(["alerts", "test", "ops", "--config", str(path)]) == 0
    assert (
        capsys.readouterr().out == "selfreport: sent a test notification through 'ops' (webhook)\n"
    )
    (request,) = receiver.requests
    assert request.json()["state"] == "test"
    assert request.headers["X-Selfreport-Signature"].startswith("sha256=")
    receiver.answer(500, b"broken")
    assert main(["alerts", "test", "ops", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == "selfreport: 'ops' (webhook) could not deliver: HTTP 500: broken\n"
    assert main(["alerts", "test", "pager", "--config", str(path)]) == 2
    assert "no notifier called 'pager' (known: 'ops')" in capsys.readouterr().err


@pytest.mark.slow
def test_alerts_test_as_a_real_command(tmp_path: Path, receiver: HttpReceiver) -> None:
    path = write_config(tmp_path, receiver.url)
    done = subprocess.run(
        [sys.executable, "-m", "selfreport", "alerts", "test", "ops", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TEST_HOOK_SECRET": "s3cret"},
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert receiver.count() == 1


def test_serve_with_a_bad_configuration_exits_2_before_opening_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/", extra="bogus = 1\n")
    data = tmp_path / "data"
    assert main(["serve", "--port", "0", "--data", str(data), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selfreport: {path}:15: uptime 'http://127.0.0.1:1/health': bogus:")
    assert err.count("\n") == 1
    assert not data.exists()


def test_the_configuration_reaches_the_collector(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9/"))
    server = CollectorServer(tmp_path / "a", self_report=False, config=config)
    try:
        assert server.collector.config is config
    finally:
        server.stop()
    storage = SqliteStorage(tmp_path / "b" / "selfreport.db")
    app = create_app(storage, config=config, close_storage=True)
    try:
        assert app.collector.config is config
    finally:
        storage.close()
    unconfigured = SqliteStorage(tmp_path / "c" / "selfreport.db")
    try:
        assert create_app(unconfigured).collector.config is None
    finally:
        unconfigured.close()


@pytest.mark.slow
def test_serve_says_what_it_loaded(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/")
    command = [sys.executable, "-m", "selfreport", "serve", "--port", "0"]
    child = subprocess.Popen(
        [*command, "--data", str(tmp_path / "data"), "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TEST_HOOK_SECRET": "s3cret"},
    )
    lines: list[str] = []
    assert child.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(child.stdout or ()), daemon=True)
    reader.start()
    try:
        summary = f"alerting: {path}: 1 notifiers, 1 alert rules, 1 uptime checks\n"
        assert wait_until(lambda: summary in lines, timeout=60)
        page = next(line for line in lines if "web page" in line).split()[-1]
        assert wait_until(lambda: answers_health(page), timeout=60)  # uvicorn handles SIGTERM now
    finally:
        child.send_signal(signal.SIGTERM)
        code = child.wait(60)
        reader.join(10)
        child.stdout.close()
    assert code in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
