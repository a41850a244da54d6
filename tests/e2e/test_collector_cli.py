"""`selfreport serve` and `selfreport project ...` as a user runs them: real processes."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfreport._dsn import parse_dsn

pytestmark = pytest.mark.slow

CLI = "import sys; from selfreport.cli import main; sys.exit(main(sys.argv[1:]))"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_serve_creates_the_database_prints_the_dsn_and_reports_itself(tmp_path: Path) -> None:
    created = cli("project", "create", "mobile", "--data", str(tmp_path / "d"))
    assert created.returncode == 0, created.stderr
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "serve", "--port", "0", "--data", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        banner = [proc.stdout.readline() for _ in range(3)]
        assert banner[0].startswith("selfreport collector ")
        dsn = parse_dsn(banner[1].split()[-1])
        assert banner[2].startswith("(its own errors go to project 2")
        conn = http.client.HTTPConnection("127.0.0.1", dsn.port, timeout=10)
        deadline = time.monotonic() + 10
        while True:
            try:
                conn.request("GET", "/health")
                break
            except ConnectionRefusedError:  # pragma: no cover - the socket listens before print
                assert time.monotonic() < deadline
                time.sleep(0.05)
        health = conn.getresponse()
        assert health.status == 200
        assert json.loads(health.read())["status"] == "ok"
        conn.request(
            "POST",
            f"/api/{dsn.project_id}/store/",
            body=b'{"message": "hello from the CLI test"}',
            headers={"X-Sentry-Auth": f"Sentry sentry_key={dsn.public_key}"},
        )
        assert conn.getresponse().read()
        conn.request("GET", "/api/0/projects/")
        projects = json.loads(conn.getresponse().read())["projects"]
        assert [p["name"] for p in projects] == ["default", "selfreport-internal", "mobile"]
        assert projects[0]["events"] == 1
        conn.close()
    finally:
        proc.terminate()
        proc.wait(15)
        output = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
    assert "Application startup complete" in output
    listed = cli("project", "list", "--data", str(tmp_path / "d"), "--url", "http://h:8000")
    assert listed.returncode == 0
    assert "mobile" in listed.stdout
    assert "@h:8000/3" in listed.stdout


def test_serve_on_a_busy_port_exits_with_a_message(tmp_path: Path) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        result = cli("serve", "--port", str(busy.getsockname()[1]), "--data", str(tmp_path))
    finally:
        busy.close()
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr


def test_project_needs_an_action() -> None:
    result = cli("project")
    assert result.returncode == 2
    assert "ACTION" in result.stderr
