"""The web pages in a real headless Chromium: script planted in every field never runs."""

from __future__ import annotations

import html
import http.client
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selfreport.collector.server import CollectorServer

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
        assert "<svg" not in dom, path
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
    """Screenshots of the three pages; ``SELFREPORT_SCREENSHOTS=1`` also updates docs/img."""
    realistic_data(server)
    issue = next(i for i in server.storage.issues() if i.title.startswith("KeyError"))
    shots = {
        "collector-issues.png": "/",
        "collector-issue.png": f"/issues/{issue.id}",
        "collector-status.png": "/status",
    }
    for name, path in shots.items():
        target = tmp_path / name
        chromium(
            [
                f"--screenshot={target}",
                "--window-size=1280,900",
                "--hide-scrollbars",
                server.url + path,
            ],
            tmp_path / "profile",
        )
        data = target.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 20_000  # a rendered page, not a blank one
        if os.environ.get("SELFREPORT_SCREENSHOTS") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target, DOCS_IMG / name)
