"""Running the collector under uvicorn, with its self-reporter pointed at itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, TextIO, Union

import uvicorn

from selfreport._core.dsn import parse_dsn
from selfreport._core.guard import reporting_path
from selfreport._version import __version__
from selfreport.collector import auth as _auth
from selfreport.exceptions import ConfigError

from .alerting.config import CollectorConfig, config_path, describe, load_config
from .alerting.engine import AlertEngine, engine_from_config
from .alerting.uptime import UptimeCheck, UptimeProber
from .app import Collector, CollectorApp, add_alerts, create_app
from .forward import UPSTREAM_ENV, Forwarder, upstream_dsn
from .ingest import DEFAULT_MAX_BODY, Processor
from .limits import HttpLimits, ThrottleFilter, loop_exception_handler, protocol_class
from .storage import MIN_STORAGE_BYTES, SqliteStorage
from .store import Project, StorageError, Store

__all__ = [
    "DATABASE_NAME",
    "CollectorServer",
    "default_data_dir",
    "default_max_storage",
    "project_command",
    "serve",
]

DATABASE_NAME = "selfreport.db"
MAX_DEFAULT_STORAGE = 2 * 10**9
SWITCH_INTERVAL = 0.001
logger = logging.getLogger("selfreport.collector")


def default_data_dir() -> Path:
    """``$SELFREPORT_DATA``, else ``$XDG_DATA_HOME/selfreport``, else ``~/.local/share/...``."""
    explicit = os.environ.get("SELFREPORT_DATA")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "selfreport"


def default_max_storage(data_dir: Union[str, os.PathLike[str]]) -> int:
    """Half of what the database may use of its disk (the free space plus its own size), at
    most 2 GB, at least 16 MiB: ``--max-storage``'s default."""
    directory = Path(data_dir)
    used = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            used += (directory / (DATABASE_NAME + suffix)).stat().st_size
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    return max(16 * 2**20, min(MAX_DEFAULT_STORAGE, (free + used) // 2))


def open_storage(data_dir: Union[str, os.PathLike[str]], **options: Any) -> Store:
    """The collector database in ``data_dir`` (created on first use, with its two projects)."""
    storage = SqliteStorage(Path(data_dir) / DATABASE_NAME, **options)
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
    ``reporter_options`` are passed to that ``init``. ``limits`` bound what clients may send
    (sizes, timeouts, connections; see :class:`HttpLimits`); ``max_body`` is a shorthand for
    its ``max_body`` when ``limits`` is not given. ``uptime``: ``[[uptime]]`` checks (``url``,
    ``interval``, ``timeout``, ``expect_status``, ``consecutive``, ``name``) probed while it
    runs: on the Monitors page, and ``collector.uptime.status()`` for alerts. ``alerts``
    builds the alert engine on the server's storage; without it, ``config``'s alert rules make
    one (with the durable outbox and the configured notifiers). The app starts it, and closes
    it when the server stops.
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
        login: str = "auto",
        public_url: Optional[str] = None,
        allowed_hosts: Sequence[str] = (),
        metrics_public: bool = False,
        limits: Optional[HttpLimits] = None,
        alerts: Optional[Callable[[Store], AlertEngine]] = None,
        config: Optional[CollectorConfig] = None,
        uptime: Sequence[UptimeCheck] = (),
    ) -> None:
        # Forwarding is validated first: a bad DSN or mode fails before anything is opened.
        try:
            public_url = None if public_url is None else _auth.check_public_url(public_url)
        except ValueError as exc:
            raise ConfigError("public_url", str(exc)) from None
        self.data_dir = Path(data_dir)
        self.forwarder = _forwarder(self.data_dir, upstream, forward, scrub, spool_dir)
        self.host = host
        self.self_report = self_report
        self.reporter_options = dict(reporter_options or {})
        self._open_storage(dict(storage_options or {}), login)
        self._listen(host, port)
        self.public_url = public_url or self.url
        self.limits = limits or HttpLimits(max_body=max_body)
        self.app: CollectorApp = create_app(
            self.storage,
            processors=processors,
            max_body=self.limits.max_body,
            upstream=upstream,
            login=self.login,
            public_url=self.public_url,
            allowed_hosts=_auth.allowed_hosts(host, self.public_url, allowed_hosts),
            metrics_public=metrics_public,
            config=config,
        )
        self._add_alerts(alerts, config, uptime)
        self._start_forwarding()
        _throttle_uvicorn_log(install=True)
        self._config = self._uvicorn_config(log_level)
        self._server = uvicorn.Server(self._config)
        self._thread: Optional[threading.Thread] = None
        self._reporting = False
        self._closed = False

    def _add_alerts(
        self,
        alerts: Optional[Callable[[Store], AlertEngine]],
        config: Optional[CollectorConfig],
        uptime: Sequence[UptimeCheck],
    ) -> None:
        """Uptime probes (``uptime``, else the configuration's ``[[uptime]]``) and the alert
        engine: the one ``alerts`` builds, else the configuration's (if it has alert rules),
        with its outbox and notifiers."""
        uptime = uptime or (() if config is None else config.uptime)
        if uptime:
            self.app.collector.uptime = UptimeProber(uptime)
        if alerts is not None:
            add_alerts(self.app, alerts(self.storage))
        elif config is not None and config.alerts:
            engine = engine_from_config(config, self.storage, public_url=self.public_url)
            add_alerts(self.app, engine)

    def _open_storage(self, options: dict[str, Any], login: str) -> None:
        """The database, its default projects and the login mode it allows."""
        if "max_storage_bytes" not in options:
            options["max_storage_bytes"] = default_max_storage(self.data_dir)
        try:
            self.storage = open_storage(self.data_dir, **options)
        except BaseException:
            self._close_forwarder(timeout=0)
            raise
        self.first_start = self.storage.created
        self.default_project, self.internal_project = self.storage.ensure_defaults()
        try:
            self.login = _login_mode(self.host, login, self.storage)
        except ConfigError:
            self.storage.close()
            self._close_forwarder(timeout=0)
            raise

    def _listen(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and without it every keep-alive response waits ~40 ms on delayed ACKs.
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            # Listening now lets clients connect (and wait in the backlog) before uvicorn runs.
            self._socket.listen(2048)
        except OSError as exc:
            self._socket.close()
            self.storage.close()
            self._close_forwarder(timeout=0.5)
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self.port: int = self._socket.getsockname()[1]

    def _close_forwarder(self, timeout: float) -> None:
        if self.forwarder is not None:
            self.forwarder.close(timeout=timeout)

    def _start_forwarding(self) -> None:
        if self.forwarder is not None:
            self.collector.on_stored.append(self.forwarder)
            self.collector.forwarding = self.forwarder.stats
            self.forwarder.latency = self.collector.metrics.latency
            self.forwarder.start(self.storage, self.internal_project.id)
        else:
            self.storage.forwarding_off()

    def _uvicorn_config(self, log_level: str) -> uvicorn.Config:
        protocol = protocol_class(self.limits, self.collector.metrics.rejected)
        if protocol is None:
            _warn_without_httptools(self.limits)
        return uvicorn.Config(
            self.app,
            # The standard event loop even where uvloop is installed: selfreport's guard
            # patches asyncio's loop (task propagation, the exception-handler hook).
            loop="asyncio",
            log_level=log_level,
            access_log=False,
            lifespan="on",
            server_header=False,
            timeout_graceful_shutdown=5,
            http=protocol or "h11",
            # h11 has no connection limit of ours: uvicorn's answers 503 beyond it instead.
            limit_concurrency=None if protocol else self.limits.max_connections,
            h11_max_incomplete_event_size=self.limits.max_header_bytes,
            timeout_keep_alive=self.limits.keep_alive_timeout,
            ws="none",
        )

    @property
    def collector(self) -> Collector:
        collector: Collector = self.app.state.collector
        return collector

    @property
    def url(self) -> str:
        return f"http://{_dsn_host(self.host)}:{self.port}"

    def dsn(self, project: Optional[Project] = None) -> str:
        """The DSN of ``project`` (default: the default project), at the public URL."""
        return (project or self.default_project).dsn(self.public_url)

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
        # Straight to the listening socket, whatever the public URL (a proxy) says.
        selfreport.init(self.internal_project.dsn(self.url), **options)
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
            asyncio.run(self._serve())
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
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
        await self._server.serve(sockets=[self._socket])

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
        _throttle_uvicorn_log(install=False)
        self._socket.close()
        if self.forwarder is not None:
            self.forwarder.close(timeout=2.0)
        self.storage.close()

    def __enter__(self) -> CollectorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _forwarder(
    data_dir: Path,
    upstream: Optional[str],
    forward: str,
    scrub: bool,
    spool_dir: Union[str, os.PathLike[str], None],
) -> Optional[Forwarder]:
    """Forwarding to ``upstream`` (None: no forwarding), checked before anything is opened."""
    if upstream is None:
        return None
    # What the upstream cannot take now waits on disk: in the data folder by default,
    # created private (as the spool is) if this is the first thing to create it.
    spool = data_dir / "spool" if spool_dir is None else Path(spool_dir)
    if spool_dir is None:
        parse_dsn(upstream)  # a bad DSN fails before anything is created
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Forwarder(upstream, mode=forward, scrub=scrub, spool_dir=str(spool))


def _login_notice(server: CollectorServer) -> str:
    if server.login == "off":
        return (
            f"login is OFF (--insecure-no-auth): anyone who can reach {server.url} reads "
            "every event, and the project keys"
        )
    if server.login == "auto" and not server.storage.has_users():
        return (
            f"no user yet: the pages and the API are OPEN to anyone who can reach {server.url} "
            "(add one with `selfreport user add NAME` to require a login)"
        )
    return "the pages and the API need a login (users: `selfreport user list`)"


def _login_mode(host: str, login: str, storage: Store) -> str:
    """``auto`` stays open until a user exists only on loopback; elsewhere a user must exist."""
    if login not in _auth.LOGIN_MODES:
        raise ConfigError("login", f"must be one of {', '.join(_auth.LOGIN_MODES)}, not {login!r}")
    if login == "auto" and not _auth.is_loopback(host):
        if not storage.has_users():
            raise ConfigError(
                "login",
                f"no user exists, so serving on {host} is refused: add one with "
                "`selfreport user add NAME` (or pass --insecure-no-auth)",
            )
        return "required"
    return login


# uvicorn logs a line (with a traceback, for an app failure) per bad request: while any
# collector runs in this process, its warnings and errors are throttled to one a second.
_uvicorn_filter = ThrottleFilter()
_uvicorn_filter_users = 0
_uvicorn_filter_lock = threading.Lock()


def _warn_without_httptools(limits: HttpLimits) -> None:
    with reporting_path():
        logger.warning(
            "httptools is not installed, so the collector serves HTTP with h11: headers are "
            "still limited to %d bytes and connections to %d (uvicorn's limit_concurrency), "
            "but the header count, request-line length, header and body timeouts are not "
            "enforced (pip install httptools)",
            limits.max_header_bytes,
            limits.max_connections,
        )


def _throttle_uvicorn_log(install: bool) -> None:
    global _uvicorn_filter_users
    with _uvicorn_filter_lock:
        _uvicorn_filter_users += 1 if install else -1
        uvicorn_log = logging.getLogger("uvicorn.error")
        if _uvicorn_filter_users > 0:
            uvicorn_log.addFilter(_uvicorn_filter)
        else:
            uvicorn_log.removeFilter(_uvicorn_filter)


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
    insecure_no_auth: bool = False,
    public_url: Optional[str] = None,
    allowed_hosts: Sequence[str] = (),
    metrics_public: bool = False,
    max_storage: Optional[int] = None,
    limits: Optional[HttpLimits] = None,
    upstream_file: Optional[str] = None,
    config: Optional[str] = None,
) -> int:
    """``selfreport serve``: run until interrupted; prints the web page and the default DSN.
    A problem starting (the database, the data directory, the port) is one line on stderr
    and exit code 2."""
    out = out or sys.stdout
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        upstream = _serve_upstream(upstream, upstream_file, forward, scrub, spool_dir, max_storage)
        alerting = _load_alerting(config)
    except ValueError as exc:  # ConfigError too (alerting's: one line naming file and line)
        print(f"selfreport: {exc}", file=sys.stderr)
        return 2
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
            login="off" if insecure_no_auth else "auto",
            public_url=public_url,
            allowed_hosts=allowed_hosts,
            metrics_public=metrics_public,
            storage_options=None if max_storage is None else {"max_storage_bytes": max_storage},
            limits=limits,
            config=alerting,
        )
    except (ConfigError, StorageError, ValueError) as exc:
        print(f"selfreport: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"selfreport: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    _print_banner(server, directory, out, forward, scrub)
    _run_in_foreground(server)
    return 0


def _load_alerting(path: Optional[str]) -> Optional[CollectorConfig]:
    """Alerting's configuration: ``--config``, else ``$SELFREPORT_CONFIG``, else none."""
    path = config_path(path)
    return None if path is None else load_config(path)


def _run_in_foreground(server: CollectorServer) -> None:
    """Serve until interrupted, the collector's own log lines on stderr."""
    # The event loop and the storage writer share the GIL; each time the writer wants it back
    # (after every SQLite step) it may wait a whole switch interval (5 ms by default) while the
    # loop runs, and so do the requests waiting for its commit. While serving, this process
    # trades a little throughput for much shorter tails.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    # The collector's own lines (a failing request, accept() failing) beside uvicorn's.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-9s selfreport: %(message)s"))
    logger.addHandler(handler)
    try:
        server.run()
    finally:
        logger.removeHandler(handler)
        sys.setswitchinterval(previous)


def _serve_upstream(
    upstream: Optional[str],
    upstream_file: Optional[str],
    forward: str,
    scrub: bool,
    spool_dir: Optional[str],
    max_storage: Optional[int],
) -> Optional[str]:
    """The DSN ``serve`` forwards to (from the option, the file or the environment), once its
    options are checked; raises ValueError (ConfigError) naming the problem."""
    dsn = upstream_dsn(upstream, upstream_file, os.environ)
    if dsn is None and (scrub or spool_dir is not None or forward != "all"):
        raise ValueError("--scrub, --spool and --forward need --upstream DSN")
    if max_storage is not None and max_storage < MIN_STORAGE_BYTES:
        raise ValueError("--max-storage must be at least 1MiB")
    if upstream is not None:
        print(
            "selfreport: note: --upstream on the command line is visible to other users of "
            f"this machine; prefer --upstream-file or ${UPSTREAM_ENV}",
            file=sys.stderr,
        )
    return dsn


def _print_banner(
    server: CollectorServer, directory: Path, out: TextIO, forward: str, scrub: bool
) -> None:
    """What ``serve`` tells the operator once it is listening."""
    if server.first_start:
        print(f"Created the collector database in {directory}", file=out)
    if server.storage.warning:
        print(f"selfreport: warning: {server.storage.warning}", file=sys.stderr)
    listening = "" if server.public_url == server.url else f" (listening on {server.url})"
    print(f"selfreport collector {__version__}: web page {server.public_url}/{listening}", file=out)
    print(f"DSN of the default project: {server.dsn()}", file=out)
    if server.collector.config is not None:
        print(f"alerting: {describe(server.collector.config)[0]}", file=out)
    print(
        f"(its own errors go to project {server.internal_project.id}, "
        f"{server.internal_project.name!r})",
        file=out,
    )
    limit = server.storage.max_storage_bytes or 0
    print(f"the database is kept under {limit / 1e6:,.0f} MB (--max-storage)", file=out)
    if server.forwarder is not None:
        what = "everything" if forward == "all" else "its own reports"
        scrubbed = ", scrubbed" if scrub else ""
        print(f"forwarding {what}{scrubbed} to {server.forwarder.destination.name}", file=out)
    print(_login_notice(server), file=out)
    out.flush()


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
