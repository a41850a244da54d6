"""The web pages in a real headless Chromium: planted script never runs; logging in works and
forms posted from another origin are refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import html
import http.client
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
from tests.conftest import wait_until

from selfreport.collector.accounts import hash_password
from selfreport.collector.server import CollectorServer
from selfreport.collector.web import CHARTS

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = next(
    (
        shutil.which(name)
        for name in ("chromium", "chromium-browser", "google-chrome")
        if shutil.which(name)
    ),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (Debian: apt-get install -y chromium; `make test` installs it)",
)
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"

# Each payload would leave a mark if it ever ran: the page title or an attribute on <body>.
PAYLOADS = [
    "<script>document.title='PWNED'</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
    "\"><svg onload=\"document.body.setAttribute('data-pwned','svg')\">",
    "'><iframe srcdoc=\"<script>parent.document.title='PWNED'</script>\"></iframe>",
    "</pre></table><script>document.title='PWNED'</script>",
    "javascript:document.title='PWNED'",
    "{{ 7*7 }}{% raw %}",
]


def chromium(args: list[str], profile: Path, timeout: float = 60.0) -> str:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",  # let any planted script run before the DOM is dumped
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def post(server: CollectorServer, event: dict[str, Any], project_id: int, key: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(
            "POST",
            f"/api/{project_id}/store/",
            body=json.dumps(event).encode(),
            headers={"X-Sentry-Auth": f"Sentry sentry_key={key}"},
        )
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        conn.close()


def hostile_event(payload: str) -> dict[str, Any]:
    """An event with ``payload`` in every field a page shows."""
    frame = {
        "filename": payload,
        "abs_path": payload,
        "module": payload,
        "function": payload,
        "lineno": 3,
        "in_app": True,
        "pre_context": [payload],
        "context_line": payload,
        "post_context": [payload],
        "vars": {payload: payload},
    }
    return {
        "event_id": uuid.uuid4().hex,
        "level": "error",
        "logger": payload,
        "server_name": payload,
        "environment": payload[:60],
        "release": payload,
        "platform": payload,
        "transaction": payload,
        "logentry": {"message": payload, "formatted": payload},
        "exception": {
            "values": [
                {
                    "type": payload,
                    "value": payload,
                    "module": payload,
                    "mechanism": {"type": payload, "handled": False},
                    "stacktrace": {"frames": [dict(frame, in_app=False), frame]},
                }
            ]
        },
        "tags": {payload: payload},
        "breadcrumbs": {
            "values": [
                {
                    "timestamp": payload,
                    "category": payload,
                    "level": payload,
                    "message": payload,
                    "data": {payload: payload},
                }
            ]
        },
        "request": {"url": payload, "method": payload, "headers": {payload: payload}},
        "user": {"id": payload, "email": payload},
        "contexts": {payload: {payload: payload}},
        "extra": {payload: payload},
        "sdk": {"name": payload, "version": payload},
    }


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CollectorServer]:
    collector = CollectorServer(tmp_path / "data", self_report=False).start()
    try:
        yield collector
    finally:
        collector.stop()


@needs_chromium
def test_script_planted_in_every_field_never_runs(server: CollectorServer, tmp_path: Path) -> None:
    project = server.project("<script>document.title='PWNED'</script>")
    for payload in PAYLOADS:
        post(server, hostile_event(payload), project.id, project.public_key)
    issues = server.storage.issues(project_id=project.id)
    assert len(issues) == len(PAYLOADS)
    base = server.url
    pages = [
        "/",
        f"/?q={PAYLOADS[0][:20]}&environment={PAYLOADS[1][:30]}",
        "/projects",
        "/status",
        *(f"/issues/{issue.id}" for issue in issues),
    ]
    for path in pages:
        dom = chromium(["--dump-dom", base + path.replace(" ", "%20")], tmp_path / "profile")
        title = re.search(r"<title>(.*?)</title>", dom, re.S)
        assert title is not None, path
        assert title.group(1).strip() != "PWNED", path  # what a payload that ran would set
        assert "data-pwned" not in re.sub(
            r"&[a-z]+;", "", dom.split("<body", 1)[1].split(">", 1)[0]
        )
        # No element came out of a payload: each shows up only as escaped text.
        assert '<img src="x"' not in dom, path
        # The issue page's own charts are the only SVG (events over time).
        charts = len(CHARTS) if path.startswith("/issues/") else 0
        assert dom.count("<svg") == dom.count('<svg role="img"') == charts, path
        assert "<iframe" not in dom, path
        assert dom.count("<script") == 0, path
    # Each issue page rendered its hostile text as text: in the stack trace, the tags, the
    # breadcrumbs, the request... (and "{{ 7*7 }}" stayed itself: no template injection).
    for issue in issues:
        planted = json.loads(server.storage.events(issue.id)[0].payload)["logger"]
        dom = chromium(["--dump-dom", f"{base}/issues/{issue.id}"], tmp_path / "profile")
        assert html.unescape(dom).count(planted) >= 10, planted
        assert "in app" in dom


def realistic_data(server: CollectorServer) -> None:
    """A handful of believable issues for the screenshots in the docs."""
    project = server.project("checkout-api")
    key = project.public_key
    frames = [
        {
            "filename": "checkout/views.py",
            "module": "checkout.views",
            "function": "place_order",
            "lineno": 88,
            "in_app": True,
            "pre_context": ["    cart = load_cart(request.user)", "    total = cart.total()"],
            "context_line": "    rate = RATES[cart.currency]",
            "post_context": [
                "    charge(request.user, total * rate)",
                "    return redirect('/done')",
            ],
            "vars": {"cart": "<Cart 3 items>", "total": "Decimal('42.50')"},
        },
        {
            "filename": "starlette/routing.py",
            "module": "starlette.routing",
            "function": "handle",
            "lineno": 73,
            "in_app": False,
        },
    ]
    for index in range(7):
        post(
            server,
            {
                "event_id": uuid.uuid4().hex,
                "level": "error",
                "environment": "production",
                "release": "checkout@1.4.2",
                "exception": {
                    "values": [
                        {
                            "type": "KeyError",
                            "value": "'CHF'",
                            "stacktrace": {"frames": list(reversed(frames))},
                        }
                    ]
                },
                "tags": {"region": "eu-west-1", "customer_tier": "gold"},
                "breadcrumbs": {
                    "values": [
                        {"category": "http", "message": "GET /cart", "level": "info"},
                        {"category": "db", "message": "SELECT * FROM carts WHERE id = 7"},
                    ]
                },
                "request": {"method": "POST", "url": "https://shop.example/checkout"},
                "user": {"id": str(1000 + index)},
            },
            project.id,
            key,
        )
    for message, level in [
        ("payment provider timed out after %s s", "warning"),
        ("inventory sync finished with 3 skipped items", "info"),
        ("database connection pool exhausted", "fatal"),
    ]:
        post(
            server,
            {"logentry": {"message": message}, "level": level, "environment": "staging"},
            project.id,
            key,
        )


@needs_chromium
def test_screenshots_render(server: CollectorServer, tmp_path: Path) -> None:
    """Screenshots of the three pages, logged in as a user would be; ``SELFREPORT_SCREENSHOTS=1``
    also updates docs/img."""
    realistic_data(server)
    issue = next(i for i in server.storage.issues() if i.title.startswith("KeyError"))
    shots = {
        "collector-issues.png": "/",
        "collector-issue.png": f"/issues/{issue.id}",
        "collector-status.png": "/status",
    }
    server.storage.add_user("alice", hash_password("a good password"))
    browser = Browser(tmp_path / "profile")
    try:
        browser.log_in(server, "alice", "a good password")
        for name, path in shots.items():
            browser.go(server.url + path, path.partition("?")[0])
            browser.screenshot(tmp_path / name)
    finally:
        browser.close()
    for name in shots:
        target = tmp_path / name
        data = target.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 20_000  # a rendered page, not a blank one
        if os.environ.get("SELFREPORT_SCREENSHOTS") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target, DOCS_IMG / name)


# --- the Alerts page ----------------------------------------------------------------------

ALERT_RULES = """
[[alert]]
name = "new issue in checkout"
when = "new_issue"
project = "checkout-api"
notify = ["ops"]

[[alert]]
name = "error spike"
when = "rate"
threshold = 5
window = "5m"
notify = ["ops"]

[[alert]]
name = "collector healthy"
when = "health"
grace = "1m"
notify = ["ops"]

[[alert]]
name = "notifiers"
when = "self"
metric = "notifier_failures"
above = 0
notify = ["ops"]
"""


@needs_chromium
def test_alerts_page_screenshot(tmp_path: Path) -> None:
    """The Alerts page with rules, an alert firing and its deliveries to a real webhook;
    ``SELFREPORT_SCREENSHOTS=1`` also updates docs/img/collector-alerts.png."""
    from tests.collector.alerting.receivers import http_receiver

    from selfreport.collector.alerting.config import parse_config
    from selfreport.collector.alerting.engine import engine_from_config

    with http_receiver(200) as hook:
        text = f'[[notifier]]\nname = "ops"\nkind = "webhook"\nurl = "{hook.url}"\n' + ALERT_RULES
        config = parse_config(text, "alerts.toml", environ={})
        server = CollectorServer(
            tmp_path / "data",
            self_report=False,
            alerts=lambda storage: engine_from_config(config, storage),
        ).start()
        try:
            realistic_data(server)
            assert wait_until(lambda: hook.count() >= 5)  # 4 new issues, the spike
            server.storage.add_user("alice", hash_password("a good password"))
            browser = Browser(tmp_path / "profile")
            try:
                browser.log_in(server, "alice", "a good password")
                dom = browser.go(server.url + "/alerts", "/alerts")
                browser.screenshot(tmp_path / "collector-alerts.png")
            finally:
                browser.close()
        finally:
            server.stop()
    assert "error spike" in dom
    assert "delivered" in dom
    data = (tmp_path / "collector-alerts.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000
    if os.environ.get("SELFREPORT_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "collector-alerts.png", DOCS_IMG / "collector-alerts.png")


# --- logging in, in a real browser ---------------------------------------------------------


def _above(fd: int, lowest: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)
    os.close(fd)
    return moved


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no port, no package)."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        to_chrome, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome = os.pipe()
        to_chrome, from_chrome = (_above(fd, 10) for fd in (to_chrome, from_chrome))
        # Chromium reads commands on fd 3 and writes answers on fd 4: a tiny exec wrapper
        # puts the pipes there (both were moved above 9, so neither overwrites the other).
        wrapper = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                wrapper,
                str(to_chrome),
                str(from_chrome),
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=(to_chrome, from_chrome),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.page(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, session: Optional[str] = None, **params: Any) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                assert left > 0, f"no answer to {method}"
                # poll, not select: no FD_SETSIZE limit on the descriptor's number
                poller = select.poll()
                poller.register(self._from_chrome, select.POLLIN)
                ready = poller.poll(left * 1000)
                if ready:
                    chunk = os.read(self._from_chrome, 65536)
                    assert chunk, "chromium closed the pipe"
                    self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:  # anything else is an event: not needed
                assert "error" not in answer, (method, answer["error"])
                return answer["result"]

    def page(self, method: str, **params: Any) -> Any:
        return self.call(method, session=self.session, **params)

    def js(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, path: str, timeout: float = 30.0) -> str:
        """Wait until the page at ``path`` (pathname) has loaded; its text."""
        states: list[Any] = []

        def loaded() -> bool:
            states.append(self.js("[location.pathname, document.readyState]"))
            return bool(states[-1] == [path, "complete"])

        ok = wait_until(loaded, timeout)
        text = str(self.js("document.body ? document.body.innerText : ''"))
        if not ok:
            raise AssertionError(f"still at {states[-1]}, waiting for {path}: {text!r}")
        return text

    def go(self, url: str, path: str) -> str:
        self.page("Page.navigate", url=url)
        return self.wait_for(path)

    def log_in(self, server: CollectorServer, name: str, password: str) -> str:
        """Fill in and send the login form; the text of the page it leads to (the issues)."""
        self.go(server.url + "/login", "/login")
        self.js(
            f"document.querySelector('input[name=name]').value = {json.dumps(name)};"
            f"document.querySelector('input[name=password]').value = {json.dumps(password)};"
            "document.querySelector('form.login button').click()"
        )
        return self.wait_for("/")

    def screenshot(self, target: Path) -> None:
        data = base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])
        target.write_bytes(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        if self.proc.poll() is None:  # pragma: no cover - only when Chromium hangs
            self.proc.kill()
            self.proc.wait(15)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


class AttackerSite:
    """Another origin on 127.0.0.1 (another port) serving pages that auto-submit a form."""

    def __init__(self) -> None:
        self.pages: dict[str, bytes] = {}
        pages = self.pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path, b"not found")
                self.send_response(200 if self.path in pages else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def auto_post(self, name: str, action: str, fields: dict[str, str]) -> str:
        inputs = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in fields.items()
        )
        # Not the collector's path: waiting for the collector's page must not match this one.
        self.pages[f"/attack-{name}"] = (
            f'<!doctype html><form id="f" method="post" action="{html.escape(action)}">'
            f"{inputs}</form><script>document.getElementById('f').submit()</script>"
        ).encode()
        return f"{self.url}/attack-{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def session_count(server: CollectorServer) -> int:
    with server.storage._reader() as conn:
        return int(conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])


@needs_chromium
def test_logging_in_and_out_and_a_cross_site_form_is_refused(
    server: CollectorServer, tmp_path: Path
) -> None:
    realistic_data(server)
    server.storage.add_user("alice", hash_password("a good password"))
    server.storage.add_user("mallory", hash_password("mallory's password"))
    browser = Browser(tmp_path / "profile")
    attacker = AttackerSite()
    try:
        # Not logged in: the issues page sends the browser to the login page.
        text = browser.go(server.url + "/?environment=production", "/login")
        assert "Log in" in text
        assert "KeyError" not in text
        shot = tmp_path / "collector-login.png"
        browser.screenshot(shot)
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        if os.environ.get("SELFREPORT_SCREENSHOTS") == "1":
            shutil.copyfile(shot, DOCS_IMG / "collector-login.png")
        browser.js(
            "document.querySelector('input[name=name]').value = 'alice';"
            "document.querySelector('input[name=password]').value = 'a good password';"
            "document.querySelector('form.login button').click()"
        )
        text = browser.wait_for("/")
        assert "KeyError" in text  # the issues page, filtered as first asked
        assert browser.js("location.search") == "?environment=production"
        assert "alice" in text
        assert "Log out" in text
        assert session_count(server) == 1
        assert browser.js("document.cookie") == ""  # HttpOnly: no script reads the session

        # A page on another origin (same site: 127.0.0.1, another port, so SameSite=Lax
        # still sends the cookie) posts forms to the collector: logging the user out, and
        # logging them in as the attacker. Both are refused, and nothing changed.
        for name, action, fields in [
            ("logout", "/logout", {"csrf": "0" * 64}),
            ("login", "/login", {"csrf": "0" * 64, "name": "mallory", "password": "x" * 8}),
        ]:
            page = attacker.auto_post(name, server.url + action, fields)
            text = browser.go(page, action)
            assert "cross-origin request refused" in text, text
        assert session_count(server) == 1
        text = browser.go(server.url + "/projects", "/projects")
        assert "alice" in text
        assert "mallory" not in text

        # Logging out ends the session: the pages ask for a login again.
        browser.js("document.querySelector('form.logout button').click()")
        assert "Log in" in browser.wait_for("/login")
        assert session_count(server) == 0
        assert "Log in" in browser.go(server.url + "/status", "/login")
    finally:
        attacker.close()
        browser.close()


# --- the Monitors page ---------------------------------------------------------------------


@dataclass
class _UptimeCheck:
    url: str
    name: Optional[str] = None
    interval: float = 0.2
    timeout: float = 5.0
    expect_status: int = 200
    consecutive: int = 2


def monitors_data(server: CollectorServer) -> None:
    """Believable check-in monitors: one fine, one failed, one missed, one running."""
    from selfreport.collector.alerting.monitors import CheckInItem, parse_monitor_config

    project = server.project("checkout-api")
    now = time.time()
    storage: Any = server.storage
    rows = [
        ("nightly-backup", "ok", {"schedule": "30 2 * * *", "timezone": "Europe/Berlin"}, 3600),
        (
            "invoice-run",
            "error",
            {"schedule": {"type": "interval", "value": 1, "unit": "hour"}},
            600,
        ),
        ("cache-warmer", "ok", {"schedule": "*/5 * * * *", "checkin_margin": 2}, 1800),
        ("report-export", "in_progress", {"schedule": "0 * * * *", "max_runtime": 45}, 120),
    ]
    for slug, status, config, age in rows:
        for run in range(6):
            item = CheckInItem(
                slug=slug,
                check_in_id=uuid.uuid4().hex,
                status=status if run == 0 else "ok",
                duration=None if status == "in_progress" and run == 0 else 12.0 + run,
                config=parse_monitor_config(config),
            )
            at = now - age - run * 3600
            asyncio.run(storage.checkin_async(project.id, item, at))


@needs_chromium
def test_monitors_page_renders_and_planted_slugs_never_run(tmp_path: Path) -> None:
    """A screenshot of the Monitors page (``SELFREPORT_SCREENSHOTS=1`` updates docs/img), then
    slugs carrying script: shown as text, never run."""
    peer = _UptimeCheck("http://127.0.0.1:9/health", name="peer collector")
    down = _UptimeCheck("http://127.0.0.1:9/health", name="billing health")
    server = CollectorServer(tmp_path / "data", self_report=False, uptime=[peer, down]).start()
    try:
        peer.url = f"{server.url}/health"
        monitors_data(server)
        uptime = server.collector.uptime
        assert uptime is not None
        wait_until(lambda: uptime.status()[0].up and uptime.status()[1].down)
        server.storage.add_user("alice", hash_password("a good password"))
        browser = Browser(tmp_path / "profile")
        try:
            browser.log_in(server, "alice", "a good password")
            browser.go(server.url + "/monitors", "/monitors")
            browser.screenshot(tmp_path / "collector-monitors.png")
        finally:
            browser.close()
        server.storage.remove_user("alice")  # open again, for --dump-dom
        for payload in PAYLOADS:
            post_checkin(server, {"monitor_slug": payload, "status": "error"})
        dom = chromium(["--dump-dom", server.url + "/monitors"], tmp_path / "profile2")
    finally:
        server.stop()
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title is not None
    assert title.group(1).strip().startswith("Monitors")
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]
    assert dom.count("<script") == 0
    assert '<img src="x"' not in dom
    assert "<iframe" not in dom
    assert "<svg" not in dom
    for payload in PAYLOADS:
        assert payload in html.unescape(dom), payload
    data = (tmp_path / "collector-monitors.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000
    if os.environ.get("SELFREPORT_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "collector-monitors.png", DOCS_IMG / "collector-monitors.png")


def post_checkin(server: CollectorServer, payload: dict[str, Any]) -> None:
    project = server.default_project
    body = json.dumps(payload).encode()
    envelope = b"{}\n" + json.dumps({"type": "check_in", "length": len(body)}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(
            "POST",
            f"/api/{project.id}/envelope/",
            body=envelope + b"\n" + body + b"\n",
            headers={"X-Sentry-Auth": f"Sentry sentry_key={project.public_key}"},
        )
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        conn.close()


# --- issue states and the events-over-time chart, in a real browser -------------------------


def spread_history(server: CollectorServer, issue_id: int) -> int:
    """Events of the issue spread over the last 14 days, with a spike a few hours ago (so
    the charts show a shape); how many events were stored."""
    from selfreport.collector.events import prepare_event

    [latest] = server.storage.events(issue_id, limit=1)
    stored = server.storage.event(latest.project_id, latest.event_id)
    assert stored is not None
    template = json.loads(stored.payload)
    now = time.time()
    times = [now - day * 86400 - 3600 * (day % 5) for day in range(1, 14) for _ in range(day % 4)]
    times += [now - hour * 3600 - 60 for hour in range(24) for _ in range(1 + (hour % 3))]
    times += [now - 3 * 3600 - second for second in range(25)]  # the spike
    events = [
        prepare_event({**template, "event_id": uuid.uuid4().hex}, received=when) for when in times
    ]
    assert server.storage.store(latest.project_id, events).result(30) == [True] * len(events)
    return len(events)


@needs_chromium
def test_issue_states_and_the_chart(server: CollectorServer, tmp_path: Path) -> None:
    """The issue page's chart and state buttons: resolving works, a cross-site form that
    would reopen it is refused; ``SELFREPORT_SCREENSHOTS=1`` updates docs/img."""
    realistic_data(server)
    issue = next(i for i in server.storage.issues() if i.title.startswith("KeyError"))
    spread_history(server, issue.id)
    server.storage.add_user("alice", hash_password("a good password"))
    browser = Browser(tmp_path / "profile")
    attacker = AttackerSite()
    path = f"/issues/{issue.id}"
    try:
        browser.log_in(server, "alice", "a good password")
        text = browser.go(server.url + path, path)
        for shown in ("Last 24 hours", "Last 14 days", "Resolve", "Ignore for 1h", "unresolved"):
            assert shown in text
        assert browser.js("document.querySelectorAll('.chart rect').length") == 24 + 14
        shot = tmp_path / "collector-issue-states.png"
        browser.screenshot(shot)
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert len(shot.read_bytes()) > 20_000
        if os.environ.get("SELFREPORT_SCREENSHOTS") == "1":
            shutil.copyfile(shot, DOCS_IMG / "collector-issue-states.png")
        browser.js("document.querySelector('button[value=resolve]').click()")
        assert wait_until(lambda: server.storage.issue(issue.id).status == "resolved")  # type: ignore[union-attr]
        assert wait_until(lambda: "Reopen" in str(browser.js("document.body.innerText")))
        assert browser.js("location.pathname") == path
        attack = attacker.auto_post(
            "reopen", server.url + path + "/status", {"action": "reopen", "csrf": "0" * 64}
        )
        browser.go(attack, path + "/status")
        assert server.storage.issue(issue.id).status == "resolved"  # type: ignore[union-attr]
    finally:
        attacker.close()
        browser.close()
