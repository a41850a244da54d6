"""The Monitors page and /api/0/monitors/, and two collectors probing each other's /health."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

from tests.collector.conftest import Target
from tests.conftest import wait_until

from selfreport.collector.server import CollectorServer

HOURLY = {"schedule": {"type": "crontab", "value": "0 * * * *"}, "checkin_margin": 5}


@dataclass
class Check:
    """An uptime check whose URL can be set once the server it watches is listening (the
    configuration's UptimeConfig is frozen)."""

    url: str
    interval: float = 0.05
    timeout: float = 5.0
    expect_status: Union[int, Sequence[int]] = 200
    consecutive: int = 2
    name: Optional[str] = None


def send_checkin(target: Target, slug: str, status: str, **fields: object) -> None:
    payload = json.dumps({"monitor_slug": slug, "status": status, **fields}).encode()
    item = json.dumps({"type": "check_in", "length": len(payload)}).encode()
    reply = target.send(b"{}\n" + item + b"\n" + payload + b"\n")
    assert reply.status == 200, reply.text


def test_monitors_page_and_api_show_checkins_and_uptime(
    make_server: Callable[..., CollectorServer],
) -> None:
    watched = make_server()
    server = make_server(uptime=[Check(f"{watched.url}/health", name="peer")])
    target = Target(server)
    send_checkin(target, "nightly-backup", "ok", monitor_config=HOURLY, duration=12.5)
    send_checkin(target, "heartbeat", "in_progress", check_in_id=uuid.uuid4().hex)
    with_error = uuid.uuid4().hex
    send_checkin(target, "<script>", "error", check_in_id=with_error)
    assert server.collector.uptime is not None
    wait_until(lambda: server.collector.uptime is not None and server.collector.uptime.probes >= 1)

    data = target.get("/api/0/monitors/").json()
    states = {m["slug"]: m for m in data["monitors"]}
    assert states["nightly-backup"]["state"] == "ok"
    assert states["nightly-backup"]["schedule"] == "0 * * * *"
    assert states["nightly-backup"]["last_checkin"]["duration"] == 12.5
    assert states["nightly-backup"]["next_expected"] > time.time()
    assert states["heartbeat"]["state"] == "ok"
    assert states["<script>"]["state"] == "failed"
    assert states["<script>"]["failing"] is True
    assert states["<script>"]["recent"][0]["check_in_id"] == with_error
    (peer,) = data["uptime"]
    assert (peer["name"], peer["up"], peer["down"], peer["status"]) == ("peer", True, False, 200)
    assert peer["latency_ms"] >= 0

    page = target.get("/monitors")
    assert page.status == 200
    html = page.text
    assert "nightly-backup" in html
    assert "<code>0 * * * *</code>" in html
    assert "&lt;script&gt;" in html  # escaped, like everything a sender chose
    assert "<script>" not in html
    assert f"{watched.url}/health" in html
    assert ">up<" in html
    assert 'href="/monitors" class="on"' in html


def test_empty_monitors_page_says_how_to_start(target: Target) -> None:
    html = target.get("/monitors").text
    assert "A monitor appears with its first check-in" in html
    assert "None configured" in html
    assert target.get("/api/0/monitors/").json() == {"monitors": [], "uptime": []}


def test_monitors_need_a_login_like_every_page(
    make_server: Callable[..., CollectorServer],
) -> None:
    server = make_server()
    server.storage.add_user("ops", "x")
    target = Target(server)
    assert target.get("/api/0/monitors/").status == 401
    assert target.get("/monitors").status in (302, 303, 401)


def test_two_collectors_watch_each_others_health(
    make_server: Callable[..., CollectorServer],
) -> None:
    """The monitor's monitor: each probes the other's /health; one stops, the other sees it
    down after two failed probes, and neither stored anything about the probing."""
    a_watches = Check("http://127.0.0.1:9/health", name="b")
    b_watches = Check("http://127.0.0.1:9/health", name="a")
    a = make_server(uptime=[a_watches], self_report=True)
    b = make_server(uptime=[b_watches])
    a_watches.url, b_watches.url = f"{b.url}/health", f"{a.url}/health"
    a_prober, b_prober = a.collector.uptime, b.collector.uptime
    assert a_prober is not None
    assert b_prober is not None
    wait_until(lambda: a_prober.status()[0].up and b_prober.status()[0].up)
    assert a_prober.status()[0].up
    assert b_prober.status()[0].up
    b.stop()
    down = wait_until(lambda: a_prober.status()[0].down)
    assert down
    state = a_prober.status()[0]
    assert state.consecutive_failures >= 2
    assert state.last is not None
    assert state.last.status is None
    assert a.storage.event_count() == 0  # a failing probe is a result, never a report
    html = Target(a).get("/monitors").text
    assert "DOWN" in html
