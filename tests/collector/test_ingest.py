"""Ingestion over real HTTP: auth, encodings, limits, malformed input, dedupe, hooks."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest

from selfreport.collector.ingest import (
    PREPARE_INLINE_MAX,
    ClientDisconnected,
    IngestEndpoint,
    IngestError,
    StoredEnvelope,
    parse_auth_header,
    read_body,
)
from selfreport.collector.metrics import CollectorMetrics
from selfreport.collector.server import CollectorServer
from selfreport.collector.storage import Project, Storage

Event = dict[str, Any]


def stored_ids(server: CollectorServer, project_id: int) -> set[str]:
    found = set()
    for issue in server.storage.issues(project_id=project_id, limit=1000):
        found |= {e.event_id for e in server.storage.events(issue.id, limit=1000)}
    return found


# --- accepted ----------------------------------------------------------------------------------


def test_envelope_is_committed_before_the_answer(target: Any, make_event: Callable[..., Event]):
    event = make_event()
    reply = target.send(target_envelope(target, event))
    assert reply.status == 200, reply.text
    assert reply.json() == {"id": event["event_id"]}
    # Acknowledged means committed: a fresh connection to the file sees it at once.
    stored = target.server.storage.event(target.project.id, event["event_id"])
    assert stored is not None
    assert json.loads(stored.payload)["exception"]["values"][0]["type"] == "ValueError"
    assert reply.headers["access-control-allow-origin"] == "*"


def target_envelope(target: Any, *events: Event) -> bytes:
    header = {"event_id": events[0]["event_id"]}
    parts = [json.dumps(header).encode()]
    for event in events:
        payload = json.dumps(event).encode()
        parts += [json.dumps({"type": "event", "length": len(payload)}).encode(), payload]
    return b"\n".join(parts) + b"\n"


def test_store_endpoint_takes_a_bare_event(target: Any, make_event: Callable[..., Event]) -> None:
    event = make_event()
    reply = target.send(json.dumps(event).encode(), kind="store")
    assert reply.status == 200, reply.text
    assert event["event_id"] in stored_ids(target.server, target.project.id)


def test_paths_without_trailing_slash(
    target: Any, make_event: Callable[..., Event], call: Callable[..., Any]
) -> None:
    event = make_event()
    path = f"/api/{target.project.id}/store"
    reply = call(target.port, "POST", path, json.dumps(event).encode(), target.auth())
    assert reply.status == 200, reply.text


@pytest.mark.parametrize("encoding", ["gzip", "deflate-zlib", "deflate-raw"])
def test_compressed_bodies(target: Any, make_event: Callable[..., Event], encoding: str) -> None:
    event = make_event()
    body = target_envelope(target, event)
    if encoding == "gzip":
        data, header = gzip.compress(body), "gzip"
    elif encoding == "deflate-zlib":
        data, header = zlib.compress(body), "deflate"
    else:
        squeezer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data, header = squeezer.compress(body) + squeezer.flush(), "deflate"
    reply = target.send(data, headers={"Content-Encoding": header})
    assert reply.status == 200, reply.text
    assert event["event_id"] in stored_ids(target.server, target.project.id)


def test_auth_by_query_parameter(
    target: Any, make_event: Callable[..., Event], call: Callable[..., Any]
) -> None:
    event = make_event()
    path = f"/api/{target.project.id}/envelope/?sentry_key={target.project.public_key}"
    reply = call(target.port, "POST", path, target_envelope(target, event))
    assert reply.status == 200, reply.text


def test_auth_by_the_envelope_dsn(
    target: Any, make_event: Callable[..., Event], call: Callable[..., Any]
) -> None:
    """Browser SDKs tunnelling through a proxy put the DSN in the envelope header."""
    event = make_event()
    dsn = target.server.dsn()
    body = json.dumps({"event_id": event["event_id"], "dsn": dsn}).encode() + b"\n"
    payload = json.dumps(event).encode()
    body += json.dumps({"type": "event"}).encode() + b"\n" + payload + b"\n"
    reply = call(target.port, "POST", f"/api/{target.project.id}/envelope/", body)
    assert reply.status == 200, reply.text
    other = body.replace(f'/{target.project.id}"'.encode(), b'/99"')
    reply = call(target.port, "POST", f"/api/{target.project.id}/envelope/", other)
    assert reply.status == 403
    assert "another project" in reply.json()["detail"]
    bad = body.replace(b"http://", b"ftp://")
    reply = call(target.port, "POST", f"/api/{target.project.id}/envelope/", bad)
    assert reply.status == 401
    assert "dsn is invalid" in reply.json()["detail"]


def test_duplicate_event_ids_are_stored_once(target: Any, make_event: Callable[..., Event]):
    event = make_event()
    for _ in range(3):
        assert target.send(target_envelope(target, event)).status == 200
    issues = target.server.storage.issues(project_id=target.project.id)
    assert [i.times_seen for i in issues] == [1]
    assert target.server.collector.metrics.totals()["duplicates"] == 2


def test_unknown_item_types_are_accepted_and_ignored(target: Any) -> None:
    body = b'{"event_id":"' + b"a" * 32 + b'"}\n'
    body += b'{"type":"session","length":2}\n{}\n'
    body += b'{"type":"attachment","length":5,"filename":"x.txt"}\nhello\n'
    body += b'{"type":"something_new_2031"}\n{"what":1}\n'
    reply = target.send(body)
    assert reply.status == 200, reply.text
    assert target.server.storage.event_count() == 0


def test_several_events_in_one_envelope_are_stored_together(
    target: Any, make_event: Callable[..., Event]
) -> None:
    first, second = make_event(), make_event(message="other", exception=None)
    reply = target.send(target_envelope(target, first, second))
    assert reply.status == 200
    assert {first["event_id"], second["event_id"]} <= stored_ids(target.server, target.project.id)


def test_an_event_without_id_gets_the_envelope_id_or_a_new_one(
    target: Any, call: Callable[..., Any]
) -> None:
    eid = "b" * 32
    body = json.dumps({"event_id": eid}).encode() + b'\n{"type":"event"}\n{"message":"hi"}\n'
    assert target.send(body).status == 200
    assert target.server.storage.event(target.project.id, eid) is not None
    reply = call(
        target.port,
        "POST",
        f"/api/{target.project.id}/store/",
        b'{"message":"no id"}',
        target.auth(),
    )
    assert reply.status == 200
    assert len(reply.json()["id"]) == 32


# --- refused -----------------------------------------------------------------------------------


def test_missing_key_is_401(
    target: Any, make_event: Callable[..., Event], call: Callable[..., Any]
) -> None:
    body = target_envelope(target, make_event())
    reply = call(target.port, "POST", f"/api/{target.project.id}/envelope/", body)
    assert reply.status == 401
    assert "X-Sentry-Auth" in reply.json()["detail"]
    assert reply.headers["x-sentry-error"].startswith("missing authentication")
    reply = call(target.port, "POST", f"/api/{target.project.id}/store/", b"{}")
    assert reply.status == 401


def test_wrong_key_is_403(target: Any, make_event: Callable[..., Event]) -> None:
    body = target_envelope(target, make_event())
    reply = target.send(body, headers=target.auth("0" * 32))
    assert reply.status == 403
    assert "unknown key" in reply.json()["detail"]
    internal = target.server.internal_project
    reply = target.send(body, headers=target.auth(internal.public_key))
    assert reply.status == 403
    assert f"not valid for project {target.project.id}" in reply.json()["detail"]


@pytest.mark.parametrize("project_id", ["999", "abc", "%D9%A1", "%EF%BC%91", "0" * 19 + "1"])
def test_unknown_project_is_404(target: Any, make_event: Callable[..., Event], project_id: str):
    reply = target.send(target_envelope(target, make_event()), project_id=project_id)
    assert reply.status == 404
    assert "there is no project" in reply.json()["detail"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "envelope is empty"),
        (b"not json\n", "envelope header is not valid JSON"),
        (b'{}\n{"type":"event","length":500}\n{}', "runs past the end"),
        (b'{}\n{"type":"event"}\n{"a":', "item 1 (event) is not valid JSON"),
        (b'{}\n{"type":"event"}\n[1,2]', "item 1 (event) must be a JSON object, not an array"),
        (b'{}\n{"type":"event"}\n{"event_id":"xyz"}', "event_id must be 32 hex digits"),
        (b'{}\n{"type":"event"}\n{"extra":{"n":NaN}}', "NaN is not a JSON number"),
        (b'{}\n{"type":"event"}\n\xff\xfe{}', "is not valid JSON"),
        # Nested past the limit: was a RecursionError and a 500.
        (
            b"[" * 2000 + b"]" * 2000,
            "envelope header is not valid JSON: JSON nested deeper than 128",
        ),
        (b"{}\n" + b"[" * 129 + b"]" * 129, "item 1 header is not valid JSON: JSON nested deeper"),
        (
            b'{}\n{"type":"event"}\n{"a":' + b"[" * 128 + b"]" * 128 + b"}",
            "item 1 (event): JSON nested deeper than 128 levels",
        ),
    ],
)
def test_malformed_envelopes_are_400_saying_why(target: Any, body: bytes, message: str) -> None:
    reply = target.send(body)
    assert reply.status == 400, reply.text
    assert message in reply.json()["detail"]
    assert target.server.storage.event_count() == 0


def test_too_deep_is_refused_before_authentication(target: Any, call: Callable[..., Any]) -> None:
    reply = call(target.port, "POST", "/api/1/envelope/", b"[" * 5000 + b"]" * 5000)
    assert reply.status == 400  # was a 500 with a traceback, without any key
    assert "JSON nested deeper than 128 levels" in reply.json()["detail"]
    deep = b'{"a":' * 200 + b"1" + b"}" * 200
    reply = target.send(deep, kind="store")
    assert reply.status == 400
    assert reply.json()["detail"] == "the event: JSON nested deeper than 128 levels"
    assert target.server.collector.metrics.rejected_by_reason()["too_deep"] == 1


def test_lone_surrogates_are_replaced(target: Any, make_event: Callable[..., Event]) -> None:
    # Was a 500: SQLite cannot encode them. Relay replaces them with U+FFFD, and so do we.
    event = make_event(exception=None, message="half an emoji \ud83d", release="\udc00")
    assert target.send(json.dumps(event).encode(), kind="store").status == 200
    stored = target.server.storage.event(target.project.id, event["event_id"])
    assert json.loads(stored.payload)["message"] == "half an emoji \ufffd"
    assert stored.release == "\ufffd"
    # An invalid event_id in the envelope header is not echoed back.
    reply = target.send(b'{"event_id": "\\ud800' + b"x" * 1000 + b'"}\n')
    assert reply.status == 200
    assert reply.json() == {"id": None}


def test_malformed_store_body_is_400(target: Any) -> None:
    reply = target.send(b'"just a string"', kind="store")
    assert reply.status == 400
    assert reply.json()["detail"] == "the event must be a JSON object, not a string"


def test_a_bad_event_refuses_the_whole_envelope(
    target: Any, make_event: Callable[..., Event]
) -> None:
    good = make_event()
    body = target_envelope(target, good) + b'{"type":"event"}\n{"event_id":"nope"}\n'
    reply = target.send(body)
    assert reply.status == 400
    assert "item 2 (event)" in reply.json()["detail"]
    assert target.server.storage.event_count() == 0


def test_unsupported_encoding_is_415(target: Any, make_event: Callable[..., Event]) -> None:
    reply = target.send(target_envelope(target, make_event()), headers={"Content-Encoding": "zstd"})
    assert reply.status == 415
    assert "unsupported Content-Encoding 'zstd'" in reply.json()["detail"]


def test_brotli_bodies_and_bombs(make_server: Any, make_event: Callable[..., Event], call: Any):
    """sentry-sdk compresses with brotli whenever the brotli module is installed."""
    import brotli

    server = make_server(max_body=200_000)
    auth = {"X-Sentry-Auth": f"Sentry sentry_key={server.default_project.public_key}"}
    event = make_event()
    body = brotli.compress(json.dumps(event).encode())
    reply = call(server.port, "POST", "/api/1/store/", body, {**auth, "Content-Encoding": "br"})
    assert reply.status == 200, reply.text
    bomb = brotli.compress(b"{" + b" " * 30_000_000 + b"}", quality=4)
    assert len(bomb) < 50_000
    reply = call(server.port, "POST", "/api/1/store/", bomb, {**auth, "Content-Encoding": "br"})
    assert reply.status == 413
    for junk in (b"junk", b"\xff" * 64):
        reply = call(server.port, "POST", "/api/1/store/", junk, {**auth, "Content-Encoding": "br"})
        assert reply.status == 400
        detail = reply.json()["detail"]
        assert detail.startswith(("the compressed body is truncated", "the body cannot be"))


def test_brotli_without_the_module_is_415_saying_so(
    target: Any, make_event: Callable[..., Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "brotli", None)  # as if not installed
    reply = target.send(b"...", headers={"Content-Encoding": "br"})
    assert reply.status == 415
    assert "needs the brotli module" in reply.json()["detail"]


def test_corrupt_and_truncated_compression_are_400(
    target: Any, make_event: Callable[..., Event]
) -> None:
    reply = target.send(b"\x1f\x8bgarbage-not-gzip", headers={"Content-Encoding": "gzip"})
    assert reply.status == 400
    assert "cannot be decompressed" in reply.json()["detail"]
    whole = gzip.compress(target_envelope(target, make_event()))
    reply = target.send(whole[: len(whole) // 2], headers={"Content-Encoding": "gzip"})
    assert reply.status == 400
    assert "truncated" in reply.json()["detail"]


def test_bad_content_length_is_400(target: Any) -> None:
    reply = raw_request(
        target.port,
        b"POST /api/1/envelope/ HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 400")


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):  # TimeoutError from 3.10 on
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(rest) >= length[0]:
                    break
        return b"".join(chunks)


def test_declared_oversize_body_is_413_without_reading_it(make_server: Any) -> None:
    server = make_server(max_body=10_000)
    key = server.default_project.public_key
    head = (
        f"POST /api/1/envelope/ HTTP/1.1\r\nHost: x\r\nX-Sentry-Auth: Sentry sentry_key={key}\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    ).encode()
    started = time.monotonic()
    reply = raw_request(server.port, head + b"x" * 1000)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"larger than the limit of 10000 bytes" in reply
    assert time.monotonic() - started < 5  # it did not wait for a gigabyte


def test_chunked_oversize_body_is_413_as_soon_as_the_limit_is_crossed(make_server: Any) -> None:
    server = make_server(max_body=50_000)
    key = server.default_project.public_key
    head = (
        f"POST /api/1/envelope/ HTTP/1.1\r\nHost: x\r\nX-Sentry-Auth: Sentry sentry_key={key}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"x" * 20_000
    body = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(4))
    reply = raw_request(server.port, head + body)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert server.collector.metrics.rejected_by_reason() == {"too_large": 1}


def test_decompression_bomb_is_413(
    make_server: Any, make_event: Callable[..., Event], call: Callable[..., Any]
) -> None:
    server = make_server(max_body=100_000)
    target_key = server.default_project.public_key
    bomb = gzip.compress(b"{" + b" " * 50_000_000 + b"}")  # 50 MB of nothing, ~50 kB on the wire
    assert len(bomb) < 100_000
    reply = call(
        server.port,
        "POST",
        "/api/1/store/",
        bomb,
        {"Content-Encoding": "gzip", "X-Sentry-Auth": f"Sentry sentry_key={target_key}"},
    )
    assert reply.status == 413
    assert "the decompressed body is larger than the limit" in reply.json()["detail"]


def test_get_is_405_and_options_is_a_cors_preflight(target: Any, call: Callable[..., Any]) -> None:
    reply = call(target.port, "GET", f"/api/{target.project.id}/envelope/")
    assert reply.status == 405
    assert reply.headers["allow"] == "POST, OPTIONS"
    reply = call(target.port, "OPTIONS", f"/api/{target.project.id}/envelope/")
    assert reply.status == 200
    assert "x-sentry-auth" in reply.headers["access-control-allow-headers"]


def test_full_write_queue_is_503_with_retry_after(
    make_server: Any, make_event: Callable[..., Event], call: Callable[..., Any]
) -> None:
    server = make_server(storage_options={"max_queue": 0})
    key = server.default_project.public_key
    reply = call(
        server.port,
        "POST",
        "/api/1/store/",
        json.dumps(make_event()).encode(),
        {"X-Sentry-Auth": f"Sentry sentry_key={key}"},
    )
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert "write queue is full" in reply.json()["detail"]


def test_stopped_storage_is_503(target: Any, make_event: Callable[..., Event]) -> None:
    target.server.storage.close()
    reply = target.send(json.dumps(make_event()).encode(), kind="store")
    assert reply.status == 503
    assert "storage is closed" in reply.json()["detail"]


# --- processors and hooks -----------------------------------------------------------------------


def test_processors_enrich_and_filter(
    make_server: Any, make_event: Callable[..., Event], call: Callable[..., Any]
) -> None:
    seen: list[tuple[str, str]] = []

    def tag(event: Event, project: Project) -> Any:
        seen.append((event["event_id"], project.name))
        if event.get("message") == "drop me":
            return None
        event["tags"] = {"enriched": "yes"}
        return event

    server = make_server(processors=[tag])
    auth = {"X-Sentry-Auth": f"Sentry sentry_key={server.default_project.public_key}"}
    kept, dropped = make_event(), make_event(message="drop me")
    for event in (kept, dropped):
        reply = call(server.port, "POST", "/api/1/store/", json.dumps(event).encode(), auth)
        assert reply.status == 200
    assert [s[1] for s in seen] == ["default", "default"]
    stored = server.storage.event(1, kept["event_id"])
    assert stored is not None
    assert json.loads(stored.payload)["tags"] == {"enriched": "yes"}
    assert server.storage.event(1, dropped["event_id"]) is None
    assert server.collector.metrics.rejected_by_reason() == {"filtered": 1}


def test_a_large_event_is_prepared_off_the_event_loop(
    make_server: Any, make_event: Callable[..., Event], call: Callable[..., Any]
) -> None:
    # While a large body is parsed and trimmed (here: held in a processor), other requests
    # are answered; it used to run on the event loop, so /health waited for it.
    preparing, release = threading.Event(), threading.Event()

    def hold(event: Event, project: Project) -> Event:
        preparing.set()
        release.wait(60)
        return event

    server = make_server(processors=[hold])
    big = make_event(extra={"pad": ["p" * 1000] * (PREPARE_INLINE_MAX // 1000)})
    auth = {"X-Sentry-Auth": f"Sentry sentry_key={server.default_project.public_key}"}
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(
            call, server.port, "POST", "/api/1/store/", json.dumps(big).encode(), auth
        )
        try:
            assert preparing.wait(30)
            assert call(server.port, "GET", "/health").status == 200
            assert not sent.done()
        finally:
            release.set()
        assert sent.result(timeout=30).status == 200
    assert server.storage.event(1, big["event_id"]) is not None


def test_on_stored_hooks_get_committed_events_and_cannot_fail_the_request(
    target: Any, make_event: Callable[..., Event], caplog: pytest.LogCaptureFixture
) -> None:
    received: list[StoredEnvelope] = []

    def broken(stored: StoredEnvelope) -> None:
        raise RuntimeError("forwarding is down")

    target.server.collector.on_stored.extend([received.append, broken])
    event = make_event()
    reply = target.send(target_envelope(target, event))
    assert reply.status == 200
    assert len(received) == 1
    stored = received[0]
    assert stored.project.id == target.project.id
    assert [e.event_id for e in stored.events] == [event["event_id"]]
    assert stored.stored == [True]
    [outcome] = stored.outcomes
    assert (outcome.stored, outcome.new_issue, outcome.regressed) == (True, True, False)
    assert outcome.issue_title == stored.events[0].title
    assert stored.own_report is False
    assert b'"type": "event"' in stored.body
    assert "an on_stored hook failed" in caplog.text
    target.send(target_envelope(target, event))
    assert received[1].stored == [False]
    assert [o.stored for o in received[1].outcomes] == [False]


# --- units ----------------------------------------------------------------------------------------


def test_parse_auth_header() -> None:
    assert parse_auth_header("Sentry sentry_key=abc, sentry_version=7,sentry_secret=s") == {
        "sentry_key": "abc",
        "sentry_version": "7",
        "sentry_secret": "s",
    }
    assert parse_auth_header("sentry_key=k") == {"sentry_key": "k"}
    assert parse_auth_header("Sentry garbage") == {}


def feed(*messages: dict[str, Any]) -> Callable[[], Any]:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


@pytest.mark.asyncio
async def test_read_body_streams_chunks_and_stops_at_the_limit() -> None:
    chunks = [{"type": "http.request", "body": b"ab", "more_body": True}] * 3
    body = await read_body(feed(*chunks, {"type": "http.request", "body": b"c"}), {}, 100)
    assert body == b"abababc"
    with pytest.raises(IngestError) as caught:
        await read_body(feed(*chunks), {}, 5)
    assert caught.value.status == 413
    assert caught.value.headers == {"Connection": "close"}


@pytest.mark.asyncio
async def test_read_body_reports_a_disconnect_and_empty_deflate() -> None:
    with pytest.raises(ClientDisconnected):
        await read_body(feed({"type": "http.disconnect"}), {})
    empty = await read_body(
        feed({"type": "http.request", "body": b""}), {"content-encoding": "deflate"}
    )
    assert empty == b""


@pytest.mark.asyncio
async def test_a_client_that_disconnects_is_counted(storage: Storage) -> None:
    metrics = CollectorMetrics(storage)
    endpoint = IngestEndpoint(storage.start(), metrics, kind="envelope")
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    key = storage.projects()[0].public_key
    scope = {
        "type": "http",
        "method": "POST",
        "path_params": {"project_id": "1"},
        "headers": [(b"x-sentry-auth", f"Sentry sentry_key={key}".encode())],
        "query_string": b"",
    }
    await endpoint(scope, feed({"type": "http.disconnect"}), send)
    assert sent == []
    assert metrics.rejected_by_reason() == {"disconnected": 1}
    with pytest.raises(ValueError, match="kind must be"):
        IngestEndpoint(storage, metrics, kind="other")
    await asyncio.sleep(0)


def test_a_project_created_while_running_is_accepted_at_once(
    target: Any, make_event: Callable[..., Event]
) -> None:
    """As `selfreport project create` does it, from another process: straight into the file."""
    other = Storage(target.server.storage.path)
    try:
        project = other.create_project("made-by-the-cli")
    finally:
        other.close()
    reply = target.send(
        json.dumps(make_event()).encode(),
        kind="store",
        project_id=project.id,
        headers=target.auth(project.public_key),
    )
    assert reply.status == 200, reply.text
