"""Real receivers on loopback for the notifiers' tests: an HTTP server and an aiosmtpd server."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpReceiver:
    """Answers every POST with the next of ``answers`` (the last one repeats) and keeps it."""

    url: str
    requests: list[Request] = field(default_factory=list)
    answers: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    hold: Optional[threading.Event] = None  # when set: answers wait until it is set

    def answer(self, status: int, body: bytes = b"", **headers: str) -> None:
        with self.lock:
            self.answers[:] = [(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)]

    def next_answer(self) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


@contextmanager
def http_receiver(status: int = 200, body: bytes = b"ok") -> Iterator[HttpReceiver]:
    receiver: Optional[HttpReceiver] = None

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            assert receiver is not None
            length = int(self.headers.get("Content-Length", "0"))
            content = self.rfile.read(length)
            with receiver.lock:
                receiver.requests.append(Request(self.path, dict(self.headers), content))
            if receiver.hold is not None:
                receiver.hold.wait(60)
            code, headers, answer = receiver.next_answer()
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = HttpReceiver(f"http://127.0.0.1:{server.server_address[1]}/hook?x=1")
    receiver.answer(status, body)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield receiver
    finally:
        if receiver.hold is not None:
            receiver.hold.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@dataclass
class SmtpReceiver:
    port: int
    messages: list[Message] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    logins: list[tuple[bytes, bytes]] = field(default_factory=list)
    refuse: Optional[str] = None  # answer to RCPT TO, e.g. "450 try later"


class _Handler:
    def __init__(self, receiver: SmtpReceiver) -> None:
        self.receiver = receiver

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.receiver.refuse:
            return self.receiver.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.receiver.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.receiver.messages.append(message_from_bytes(envelope.content))
        return "250 Message accepted"


@contextmanager
def smtp_receiver(
    *,
    tls: Optional[ssl.SSLContext] = None,
    implicit_tls: bool = False,
    auth: Optional[tuple[str, str]] = None,
) -> Iterator[SmtpReceiver]:
    """A real aiosmtpd server on 127.0.0.1: STARTTLS offered with ``tls`` (or SMTPS with
    ``implicit_tls``), AUTH required with ``auth`` (login, password)."""
    from aiosmtpd.smtp import SMTP, AuthResult

    loop = asyncio.new_event_loop()
    receiver = SmtpReceiver(0)

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        login, password = data.login, data.password
        receiver.logins.append((login, password))
        ok = auth is not None and (login, password) == (auth[0].encode(), auth[1].encode())
        return AuthResult(success=ok, handled=False)

    def factory() -> SMTP:
        return SMTP(
            _Handler(receiver),
            hostname="127.0.0.1",
            tls_context=None if implicit_tls else tls,
            require_starttls=tls is not None and not implicit_tls,
            auth_required=auth is not None,
            auth_require_tls=True,
            authenticator=authenticator if auth else None,
            loop=loop,
        )

    server = loop.run_until_complete(
        loop.create_server(factory, "127.0.0.1", 0, ssl=tls if implicit_tls else None)
    )
    receiver.port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        yield receiver
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
