"""`selfreport serve` and `selfreport project ...` as a user runs them: real processes."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfreport._core.dsn import parse_dsn

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
        banner = [proc.stdout.readline() for _ in range(5)]
        assert banner[0].startswith("selfreport collector ")
        dsn = parse_dsn(banner[1].split()[-1])
        assert banner[2].startswith("(its own errors go to project 2")
        # No user yet, on loopback: it runs open, and says so.
        assert banner[3].startswith("the database is kept under")
        assert banner[4].startswith("no user yet: the pages and the API are OPEN")
        conn = http.client.HTTPConnection("127.0.0.1", dsn.port, timeout=10)
        conn.request("GET", "/health")  # the socket listens before the banner is printed
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
    assert result.returncode == 2
    assert one_line(result.stderr).startswith("selfreport: cannot listen on 127.0.0.1:")


def one_line(stderr: str) -> str:
    """A startup failure is one line on stderr, without a traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_corrupted_database_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    created = cli("project", "list", "--data", str(tmp_path))
    assert created.returncode == 0, created.stderr
    database = tmp_path / "selfreport.db"
    with database.open("r+b") as file:  # the header survives; the tables' pages do not
        file.seek(4096)
        file.write(b"\xde\xad" * 20_000)
    result = cli("serve", "--port", "0", "--data", str(tmp_path))
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"selfreport: {database}")
    assert "malformed" in result.stderr
    database.write_bytes(b"not a database at all" * 500)
    result = cli("serve", "--port", "0", "--data", str(tmp_path))
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        f"selfreport: {database}: cannot open the database: file is not a database"
    )


def test_a_data_directory_that_cannot_be_made_is_one_line_and_exit_code_2(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("")
    result = cli("serve", "--port", "0", "--data", str(tmp_path / "file" / "data"))
    assert result.returncode == 2
    assert one_line(result.stderr) == f"selfreport: {tmp_path / 'file' / 'data'}: Not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_data_directory_is_one_line_and_exit_code_2(
    tmp_path: Path,
) -> None:  # pragma: no cover - the suite runs as root in CI
    tmp_path.chmod(0o500)
    try:
        result = cli("serve", "--port", "0", "--data", str(tmp_path / "data"))
    finally:
        tmp_path.chmod(0o700)
    assert result.returncode == 2
    assert one_line(result.stderr) == f"selfreport: {tmp_path / 'data'}: Permission denied"


def test_max_storage_takes_a_size_and_refuses_nonsense(tmp_path: Path) -> None:
    result = cli("serve", "--port", "0", "--data", str(tmp_path), "--max-storage", "lots")
    assert result.returncode == 2
    assert "'lots' is not a size like 500MB, 10GB or 2GiB" in result.stderr
    result = cli("serve", "--port", "0", "--data", str(tmp_path), "--max-storage", "100KB")
    assert result.returncode == 2
    assert one_line(result.stderr) == "selfreport: --max-storage must be at least 1MiB"


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
        banner = [proc.stdout.readline() for _ in range(5)]
        listening = banner[0].rstrip().rsplit(" ", 1)[-1].rstrip(")")
        assert banner[0].startswith("selfreport collector ")
        assert "web page https://errors.example.com/ (listening on http://127.0.0.1:" in banner[0]
        # The DSN printed is built from the public URL, not from where it listens.
        dsn = parse_dsn(banner[1].split()[-1])
        assert (dsn.scheme, dsn.host, dsn.project_id) == ("https", "errors.example.com", "1")
        assert banner[3].startswith("the database is kept under")
        assert banner[4] == "the pages and the API need a login (users: `selfreport user list`)\n"
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
        banner = [proc.stdout.readline() for _ in range(5)]
        assert banner[4].startswith("login is OFF (--insecure-no-auth): anyone who can reach")
    finally:
        stop(proc)


def test_user_and_token_need_an_action_and_a_good_name(tmp_path: Path) -> None:
    assert cli("user").returncode == 2
    assert cli("token").returncode == 2
    bad = cli("user", "add", "no spaces", "--data", str(tmp_path))
    assert bad.returncode == 2
    assert bad.stderr.startswith("selfreport: bad user name 'no spaces'")


def test_a_database_others_can_read_is_warned_about(tmp_path: Path) -> None:
    assert cli("project", "list", "--data", str(tmp_path)).returncode == 0
    database = tmp_path / "selfreport.db"
    assert database.stat().st_mode & 0o777 == 0o600
    database.chmod(0o644)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "serve", "--port", "0", "--data", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(15)
        proc.stderr.close()
    assert line.strip() == (
        f"selfreport: warning: {database} can be read by other users (mode 644):"
        " it holds events and project keys; chmod 600 it"
    )
