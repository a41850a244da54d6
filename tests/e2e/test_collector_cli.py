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
        banner = [proc.stdout.readline() for _ in range(4)]
        assert banner[0].startswith("selfreport collector ")
        dsn = parse_dsn(banner[1].split()[-1])
        assert banner[2].startswith("(its own errors go to project 2")
        # No user yet, on loopback: it runs open, and says so.
        assert banner[3].startswith("no user yet: the pages and the API are OPEN")
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


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLI, "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    proc.wait(15)
    assert proc.stdout is not None
    assert proc.stderr is not None
    output = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return output


def test_users_and_tokens_lock_the_pages_and_open_the_api(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    added = subprocess.run(
        [sys.executable, "-c", CLI, "user", "add", "alice", "--data", data],
        input="a good password\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout == "Added user 'alice'\n"
    assert "a good password" not in added.stdout + added.stderr
    assert cli("user", "list", "--data", data).stdout == "alice\n"
    created = cli("token", "create", "ci", "--data", data)
    assert created.returncode == 0
    token = created.stdout.strip()
    assert token.startswith("srt_")
    assert "not shown again" in created.stderr
    assert cli("token", "list", "--data", data).stdout == "ci\n"
    assert cli("token", "create", "ci", "--data", data).returncode == 2
    proc = serve("--data", data, "--public-url", "https://errors.example.com/")
    assert proc.stdout is not None
    try:
        banner = [proc.stdout.readline() for _ in range(4)]
        listening = banner[0].rstrip().rsplit(" ", 1)[-1].rstrip(")")
        assert banner[0].startswith("selfreport collector ")
        assert "web page https://errors.example.com/ (listening on http://127.0.0.1:" in banner[0]
        # The DSN printed is built from the public URL, not from where it listens.
        dsn = parse_dsn(banner[1].split()[-1])
        assert (dsn.scheme, dsn.host, dsn.project_id) == ("https", "errors.example.com", "1")
        assert banner[3] == "the pages and the API need a login (users: `selfreport user list`)\n"
        port = int(listening.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        page = conn.getresponse()
        page.read()
        assert page.status == 303
        conn.request("GET", "/api/0/issues/", headers={"Authorization": f"Bearer {token}"})
        api = conn.getresponse()
        assert api.status == 200
        assert json.loads(api.read()) == {"issues": [], "more": False}
        conn.request("GET", "/", headers={"Host": "rebinding.example"})
        rebound = conn.getresponse()
        rebound.read()
        assert rebound.status == 400
        conn.close()
        assert cli("token", "revoke", "ci", "--data", data).returncode == 0
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/0/issues/", headers={"Authorization": f"Bearer {token}"})
        revoked = conn.getresponse()
        revoked.read()
        assert revoked.status == 401  # at once, without a restart
        conn.close()
    finally:
        stop(proc)
    assert cli("user", "remove", "alice", "--data", data).returncode == 0
    assert cli("user", "list", "--data", data).stdout == ""


def test_serve_refuses_a_public_address_without_a_user(tmp_path: Path) -> None:
    refused = cli("serve", "--host", "0.0.0.0", "--port", "0", "--data", str(tmp_path))
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("selfreport: login: no user exists, so serving on 0.0.0.0")
    assert "selfreport user add NAME" in refused.stderr
    proc = serve("--host", "0.0.0.0", "--data", str(tmp_path), "--insecure-no-auth")
    assert proc.stdout is not None
    try:
        banner = [proc.stdout.readline() for _ in range(4)]
        assert banner[3].startswith("login is OFF (--insecure-no-auth): anyone who can reach")
    finally:
        stop(proc)


def test_user_and_token_need_an_action_and_a_good_name(tmp_path: Path) -> None:
    assert cli("user").returncode == 2
    assert cli("token").returncode == 2
    bad = cli("user", "add", "no spaces", "--data", str(tmp_path))
    assert bad.returncode == 2
    assert bad.stderr.startswith("selfreport: bad user name 'no spaces'")
