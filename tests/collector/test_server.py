"""Running the collector: the server object, `serve`, project commands, the package's imports."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import wait_until

import selfreport
import selfreport.collector
from selfreport.cli import main
from selfreport.collector.limits import HttpLimits
from selfreport.collector.server import (
    DATABASE_NAME,
    MAX_DEFAULT_STORAGE,
    SWITCH_INTERVAL,
    CollectorServer,
    default_data_dir,
    default_max_storage,
    project_command,
    serve,
)

from .conftest import answers_health


def test_a_server_in_a_thread(tmp_path: Path) -> None:
    with CollectorServer(tmp_path, self_report=False) as server:
        assert server.first_start
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.dsn().endswith(f"@127.0.0.1:{server.port}/1")
        shop = server.project("shop")
        assert server.dsn(shop).endswith(f"/{shop.id}")
        assert server.collector.keys._keys[shop.public_key] == shop.id
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
    server.stop()  # idempotent
    assert (tmp_path / DATABASE_NAME).exists()
    again = CollectorServer(tmp_path, self_report=False, port=0)
    try:
        assert not again.first_start
    finally:
        again.stop()


def test_self_reporting_is_set_up_and_torn_down(tmp_path: Path) -> None:
    with CollectorServer(tmp_path, reporter_options={"release": "custom"}) as server:
        client = selfreport.Client  # noqa: F841 - the global client is what init() made
        from selfreport._state import current_client

        reporter = current_client()
        assert reporter is not None
        assert reporter.dsn is not None
        assert reporter.dsn.project_id == str(server.internal_project.id)
        assert reporter.release == "custom"
        assert reporter.environment == "selfreport-collector"
    assert current_client() is None


def test_wildcard_hosts_get_a_loopback_dsn(tmp_path: Path) -> None:
    server = CollectorServer(tmp_path, host="0.0.0.0", self_report=False, login="off")
    try:
        assert server.url.startswith("http://127.0.0.1:")
    finally:
        server.stop()
    v6 = CollectorServer(tmp_path, host="::1", self_report=False)
    try:
        assert v6.url.startswith("http://[::1]:")
    finally:
        v6.stop()


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(OSError):
            CollectorServer(tmp_path / "a", port=port, self_report=False)
        err = io.StringIO()
        sys_stderr, sys.stderr = sys.stderr, err
        try:
            assert serve(port=port, data_dir=tmp_path / "b", out=io.StringIO()) == 2
        finally:
            sys.stderr = sys_stderr
        assert f"cannot listen on 127.0.0.1:{port}" in err.getvalue()
    finally:
        busy.close()


def test_a_server_that_cannot_start_says_so(tmp_path: Path) -> None:
    server = CollectorServer(tmp_path, self_report=False)
    server._server.config.lifespan = "on"

    async def failing_startup(*args: Any, **kwargs: Any) -> None:
        server._server.should_exit = True

    server._server.startup = failing_startup  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="did not start"):
        server.start(timeout=5)


@pytest.fixture
def quiet_sigterm() -> Iterator[None]:
    """uvicorn re-raises the SIGTERM it caught; let it land on a harmless handler."""
    previous = signal.signal(signal.SIGTERM, lambda *args: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_serve_prints_the_dsn_and_stops_on_sigterm(tmp_path: Path, quiet_sigterm: None) -> None:
    out = io.StringIO()
    url: list[str] = []
    interval = sys.getswitchinterval()
    serving_interval: list[float] = []

    def answering() -> bool:
        # An HTTP answer, not just a connection: the socket listens before uvicorn runs, and
        # uvicorn installs its signal handlers before it serves anything.
        found = [
            line.rsplit(" ", 1)[1] for line in out.getvalue().splitlines() if "web page" in line
        ]
        if not found:
            return False
        url[:] = found[:1]
        return answers_health(found[0])

    def stop_when_up() -> None:
        wait_until(answering, 20)
        serving_interval.append(sys.getswitchinterval())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_up, daemon=True).start()
    assert serve(port=0, data_dir=tmp_path, out=out) == 0
    # The process serving owns the switch interval while it serves, and gets it back.
    assert serving_interval == [SWITCH_INTERVAL]
    assert sys.getswitchinterval() == interval
    text = out.getvalue()
    assert f"Created the collector database in {tmp_path}" in text
    assert "DSN of the default project: http://" in text
    assert "its own errors go to project 2, 'selfreport-internal'" in text
    assert "the database is kept under " in text
    assert url


def test_a_collector_server_leaves_the_switch_interval_alone(tmp_path: Path) -> None:
    """Only ``serve`` (the process it runs in is the collector's) lowers it: an application
    or a test running a CollectorServer keeps its own."""
    interval = sys.getswitchinterval()
    with CollectorServer(tmp_path, self_report=False) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
        assert sys.getswitchinterval() == interval
    assert sys.getswitchinterval() == interval


def test_project_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert project_command("create", tmp_path, "billing", "http://collector:9000", out) == 0
    assert "Created project 3 'billing'" in out.getvalue()
    assert "@collector:9000/3" in out.getvalue()
    assert project_command("create", tmp_path, "billing", "http://c", io.StringIO()) == 1
    assert "already exists" in capsys.readouterr().err
    listing = io.StringIO()
    assert project_command("list", tmp_path, "", "http://c:1", listing) == 0
    lines = listing.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["default", "selfreport-internal", "billing"]
    assert "(the collector's own errors)" in lines[1]


def test_the_cli_runs_project_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["project", "create", "api", "--data", str(tmp_path)]) == 0
    assert main(["project", "list", "--data", str(tmp_path), "--url", "http://h:1"]) == 0
    out = capsys.readouterr().out
    assert "Created project 3 'api'" in out
    assert "@h:1/3" in out


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SELFREPORT_DATA", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SELFREPORT_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "selfreport"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "selfreport"


def test_the_package_imports_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    assert selfreport.collector.CollectorServer is CollectorServer
    assert selfreport.collector.SqliteStorage.__name__ == "SqliteStorage"
    assert selfreport.collector.Storage is selfreport.collector.SqliteStorage  # its old name
    assert selfreport.collector.Store.__name__ == "Store"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        selfreport.collector.nothing  # noqa: B018
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'selfreport\[collector\]'"):
        selfreport.collector.require_extra()
    with pytest.raises(ImportError, match="needs jinja2"):
        selfreport.collector.create_app  # noqa: B018


def test_importing_selfreport_and_its_integrations_imports_no_web_stack() -> None:
    import subprocess

    code = (
        "import sys, selfreport, selfreport.integrations; "
        "print(sorted(m for m in ('starlette', 'uvicorn', 'jinja2', 'prometheus_client') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_without_httptools_it_warns_once_and_still_limits_connections(tmp_path: Path) -> None:
    import subprocess

    # A real interpreter where httptools cannot be imported (as on PyPy): h11 serves, with
    # uvicorn's limit_concurrency standing in for max_connections, and the operator is told.
    code = f"""if True:
        import http.client, json, logging, socket, sys, time
        sys.modules["httptools"] = None
        from selfreport.collector.limits import HttpLimits
        from selfreport.collector.server import CollectorServer

        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("selfreport").addHandler(handler)
        server = CollectorServer(
            {str(tmp_path)!r}, port=0, self_report=False, limits=HttpLimits(max_connections=2)
        ).start()

        def health():
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
            try:
                conn.request("GET", "/health")
                return conn.getresponse().status
            finally:
                conn.close()

        try:
            first = health()
            idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
            deadline = time.monotonic() + 30
            while (crowded := health()) != 503 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            server.stop()
        print(json.dumps({{
            "http": server._config.http,
            "limit": server._config.limit_concurrency,
            "statuses": [first, crowded],
            "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING],
        }}))
    """
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["http"], report["limit"], report["statuses"]) == ("h11", 2, [200, 503])
    assert len(report["warnings"]) == 1
    assert report["warnings"][0].startswith("httptools is not installed")
    assert "connections to 2" in report["warnings"][0]


def test_with_httptools_the_limits_are_its_own(make_server: Any) -> None:
    config = make_server()._config
    assert config.http != "h11"
    assert config.limit_concurrency is None


def serve_fails(capsys: pytest.CaptureFixture[str], **options: Any) -> str:
    """``serve`` that cannot start: exit code 2 and the one line it printed."""
    assert serve(port=0, out=io.StringIO(), **options) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_startup_failures_are_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / DATABASE_NAME
    assert project_command("list", tmp_path, "", "http://c", io.StringIO()) == 0
    with database.open("r+b") as file:  # the header survives, the tables do not
        file.seek(4096)
        file.write(b"\xde\xad" * 20_000)
    line = serve_fails(capsys, data_dir=tmp_path)
    assert line.startswith(f"selfreport: {database}: ")
    assert "malformed" in line
    database.write_bytes(b"junk" * 1000)
    line = serve_fails(capsys, data_dir=tmp_path)
    assert line == f"selfreport: {database}: cannot open the database: file is not a database"
    (tmp_path / "file").write_text("")
    line = serve_fails(capsys, data_dir=tmp_path / "file" / "data")
    assert line == f"selfreport: {tmp_path / 'file' / 'data'}: Not a directory"
    line = serve_fails(capsys, data_dir=tmp_path / "new", max_storage=1000)
    assert line == "selfreport: --max-storage must be at least 1MiB"
    line = serve_fails(capsys, data_dir=tmp_path / "new", spool_dir=str(tmp_path / "s"))
    assert line == "selfreport: --scrub, --spool and --forward need --upstream DSN"


def test_the_default_size_limit_is_half_the_disk_at_most_2gb(tmp_path: Path) -> None:
    limit = default_max_storage(tmp_path / "not" / "yet")
    assert 16 * 2**20 <= limit <= MAX_DEFAULT_STORAGE
    server = CollectorServer(tmp_path / "d", self_report=False)
    try:
        assert server.storage.max_storage_bytes == default_max_storage(tmp_path / "d")
    finally:
        server.stop()


def test_the_cli_passes_the_client_limits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from selfreport.collector import server as server_module

    seen: dict[str, Any] = {}
    monkeypatch.setattr(server_module, "serve", lambda **kwargs: seen.update(kwargs) or 0)
    argv = ["serve", "--max-connections", "50", "--header-timeout", "2.5", "--body-timeout", "9"]
    assert main(argv) == 0
    assert seen["limits"] == HttpLimits(max_connections=50, header_timeout=2.5, body_timeout=9.0)
    assert main(["serve"]) == 0
    assert seen["limits"] == HttpLimits()
    for bad in (["--header-timeout", "0"], ["--max-connections", "many"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *bad])
        assert exit_info.value.code == 2
        assert "must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "(default: 10.0)" in capsys.readouterr().out


def test_the_cli_imports_no_web_stack() -> None:
    import subprocess

    code = (
        "import sys, selfreport.cli; "
        "print(sorted(m for m in ('starlette', 'uvicorn', 'jinja2') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
