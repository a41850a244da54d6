"""Running the collector under uvicorn, with its self-reporter pointed at itself."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, TextIO, Union

import uvicorn

from selfreport._dsn import parse_dsn
from selfreport._version import __version__
from selfreport.exceptions import ConfigError

from .app import Collector, CollectorApp, create_app
from .forward import UPSTREAM_ENV, Forwarder, upstream_dsn
from .ingest import DEFAULT_MAX_BODY, Processor
from .storage import Project, Storage

__all__ = ["DATABASE_NAME", "CollectorServer", "default_data_dir", "project_command", "serve"]

DATABASE_NAME = "selfreport.db"
SWITCH_INTERVAL = 0.001
logger = logging.getLogger("selfreport.collector")


def default_data_dir() -> Path:
    """``$SELFREPORT_DATA``, else ``$XDG_DATA_HOME/selfreport``, else ``~/.local/share/...``."""
    explicit = os.environ.get("SELFREPORT_DATA")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "selfreport"


def open_storage(data_dir: Union[str, os.PathLike[str]], **options: Any) -> Storage:
    """The collector database in ``data_dir`` (created on first use, with its two projects)."""
    storage = Storage(Path(data_dir) / DATABASE_NAME, **options)
    storage.ensure_defaults()
    return storage


def _dsn_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class CollectorServer:
    """A collector on ``host:port`` (0: any free port), in this thread or a background one::

        with CollectorServer(tmp_dir) as server:   # started in a background thread
            selfreport.init(server.dsn())
            ...

    With ``self_report=True`` it calls :func:`selfreport.init` with the internal project's DSN
    on this server (so this process's errors land there) and closes that client on stop.
    ``reporter_options`` are passed to that ``init``.
    """

    def __init__(
        self,
        data_dir: Union[str, os.PathLike[str]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        self_report: bool = True,
        reporter_options: Optional[dict[str, Any]] = None,
        processors: Sequence[Processor] = (),
        max_body: int = DEFAULT_MAX_BODY,
        storage_options: Optional[dict[str, Any]] = None,
        log_level: str = "warning",
        upstream: Optional[str] = None,
        forward: str = "all",
        scrub: bool = False,
        spool_dir: Union[str, os.PathLike[str], None] = None,
    ) -> None:
        # Forwarding is validated first: a bad DSN or mode fails before anything is opened.
        self.forwarder: Optional[Forwarder] = None
        self.data_dir = Path(data_dir)
        if upstream is not None:
            # What the upstream cannot take now waits on disk: in the data folder by default,
            # created private (as the spool is) if this is the first thing to create it.
            spool = self.data_dir / "spool" if spool_dir is None else Path(spool_dir)
            if spool_dir is None:
                parse_dsn(upstream)  # a bad DSN fails before anything is created
                self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.forwarder = Forwarder(upstream, mode=forward, scrub=scrub, spool_dir=str(spool))
        self.host = host
        self.self_report = self_report
        self.reporter_options = dict(reporter_options or {})
        self.storage = open_storage(self.data_dir, **(storage_options or {}))
        self.first_start = self.storage.created
        self.default_project, self.internal_project = self.storage.ensure_defaults()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and without it every keep-alive response waits ~40 ms on delayed ACKs.
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            # Listening now lets clients connect (and wait in the backlog) before uvicorn runs.
            self._socket.listen(2048)
        except OSError:
            self._socket.close()
            self.storage.close()
            if self.forwarder is not None:
                self.forwarder.close(timeout=0.5)
            raise
        self.port: int = self._socket.getsockname()[1]
        self.app: CollectorApp = create_app(
            self.storage, processors=processors, max_body=max_body, upstream=upstream
        )
        if self.forwarder is not None:
            self.collector.on_stored.append(self.forwarder)
            self.collector.forwarding = self.forwarder.stats
            self.forwarder.start(self.storage, self.internal_project.id)
        self._config = uvicorn.Config(
            self.app,
            # The standard event loop even where uvloop is installed: selfreport's guard
            # patches asyncio's loop (task propagation, the exception-handler hook).
            loop="asyncio",
            log_level=log_level,
            access_log=False,
            lifespan="on",
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: Optional[threading.Thread] = None
        self._reporting = False
        self._closed = False

    @property
    def collector(self) -> Collector:
        collector: Collector = self.app.state.collector
        return collector

    @property
    def url(self) -> str:
        return f"http://{_dsn_host(self.host)}:{self.port}"

    def dsn(self, project: Optional[Project] = None) -> str:
        """The DSN of ``project`` (default: the default project) on this server."""
        return (project or self.default_project).dsn(self.url)

    def project(self, name: str) -> Project:
        """Create a project (with its key) and return it."""
        project = self.storage.create_project(name)
        self.collector.keys.load()
        return project

    def _start_reporting(self) -> None:
        if not self.self_report:
            return
        import selfreport

        options: dict[str, Any] = {
            "environment": "selfreport-collector",
            "release": f"selfreport@{__version__}",
        }
        options.update(self.reporter_options)
        selfreport.init(self.dsn(self.internal_project), **options)
        self._reporting = True

    def _stop_reporting(self) -> None:
        if self._reporting:
            import selfreport

            selfreport.close(timeout=2.0)
            self._reporting = False

    def run(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C, SIGTERM) or :meth:`stop`."""
        self._start_reporting()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._stop_reporting()
            self._close_resources()

    def start(self, timeout: float = 10.0) -> CollectorServer:
        """Serve in a background thread; returns once the server accepts connections."""
        self._start_reporting()
        self._thread = threading.Thread(
            target=self._serve_in_thread, name="selfreport-collector", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self._server.started:
            self.stop()
            raise RuntimeError("the collector did not start (see the log above)")
        return self

    def _serve_in_thread(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, flush the self-reporter, close the database."""
        if self._closed:
            return
        # Flush the self-reporter while the server can still receive its last reports.
        self._stop_reporting()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_resources()

    def _close_resources(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._socket.close()
        if self.forwarder is not None:
            self.forwarder.close(timeout=2.0)
        self.storage.close()

    def __enter__(self) -> CollectorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: Union[str, os.PathLike[str], None] = None,
    out: Optional[TextIO] = None,
    upstream: Optional[str] = None,
    forward: str = "all",
    scrub: bool = False,
    spool_dir: Optional[str] = None,
    upstream_file: Optional[str] = None,
) -> int:
    """``selfreport serve``: run until interrupted; prints the web page and the default DSN."""
    out = out or sys.stdout
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        dsn = upstream_dsn(upstream, upstream_file, os.environ)
    except ConfigError as exc:
        print(f"selfreport: {exc}", file=sys.stderr)
        return 2
    if dsn is None and (scrub or spool_dir is not None or forward != "all"):
        print("selfreport: --scrub, --spool and --forward need --upstream DSN", file=sys.stderr)
        return 2
    if upstream is not None:
        print(
            "selfreport: note: --upstream on the command line is visible to other users of "
            f"this machine; prefer --upstream-file or ${UPSTREAM_ENV}",
            file=sys.stderr,
        )
    upstream = dsn
    try:
        server = CollectorServer(
            directory,
            host=host,
            port=port,
            log_level="info",
            upstream=upstream,
            forward=forward,
            scrub=scrub,
            spool_dir=spool_dir,
        )
    except ConfigError as exc:
        print(f"selfreport: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"selfreport: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if server.first_start:
        print(f"Created the collector database in {directory}", file=out)
    print(f"selfreport collector {__version__}: web page {server.url}/", file=out)
    print(f"DSN of the default project: {server.dsn()}", file=out)
    print(
        f"(its own errors go to project {server.internal_project.id}, "
        f"{server.internal_project.name!r})",
        file=out,
    )
    if server.forwarder is not None:
        what = "everything" if forward == "all" else "its own reports"
        scrubbed = ", scrubbed" if scrub else ""
        print(f"forwarding {what}{scrubbed} to {server.forwarder.destination.name}", file=out)
    out.flush()
    # The event loop and the storage writer share the GIL; each time the writer wants it back
    # (after every SQLite step) it may wait a whole switch interval (5 ms by default) while the
    # loop runs, and so do the requests waiting for its commit. While serving, this process
    # trades a little throughput for much shorter tails.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        server.run()
    finally:
        sys.setswitchinterval(previous)
    return 0


def project_command(
    action: str,
    data_dir: Union[str, os.PathLike[str], None],
    name: str,
    url: str,
    out: Optional[TextIO] = None,
) -> int:
    """``selfreport project create NAME`` / ``selfreport project list``."""
    out = out or sys.stdout
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    storage = open_storage(directory)
    try:
        if action == "create":
            try:
                project = storage.create_project(name)
            except ValueError as exc:
                print(f"selfreport: {exc}", file=sys.stderr)
                return 1
            print(f"Created project {project.id} {project.name!r}", file=out)
            print(f"DSN: {project.dsn(url)}", file=out)
            return 0
        for project in storage.projects():
            note = "  (the collector's own errors)" if project.internal else ""
            print(f"{project.id:>4}  {project.name:<24} {project.dsn(url)}{note}", file=out)
        return 0
    finally:
        storage.close()
