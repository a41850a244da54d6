"""The ``selfreport`` command line: ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Any, Callable, Optional, TypeVar

from ._version import __version__
from .collector.limits import HttpLimits  # the standard library only: defaults for --help

__all__ = ["main", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_MAX_SIZE = 2**63 - 1  # what a file (and SQLite) can measure
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes from ``500MB``, ``10GB``, ``2GiB``, ``1.5G``, ``1000000`` (K, M, G, T are
    powers of 1000; KiB, MiB, GiB, TiB powers of 1024)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower().rstrip("b") if match else "i"
    if match is None or unit == "i":
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB, 10GB or 2GiB")
    scale = 1024 ** ("kmgt".index(unit[0]) + 1) if unit.endswith("i") else _UNITS[unit]
    whole, _, fraction = match.group(1).partition(".")
    # Whole bytes exactly; never a float of 400 digits (inf, then OverflowError).
    size = None if len(whole.lstrip("0")) > 20 else int(whole) * scale
    if size is None or size > _MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is too large a size (at most 8EiB)")
    return size + int(float("0." + (fraction or "0")) * scale)


N = TypeVar("N", int, float)


def _positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    def parse(text: str) -> N:
        value: Optional[N] = None
        if len(text) <= 32:  # no 5000-digit int (slow before 3.11, refused after), no 1e400
            try:
                value = kind(text)
            except ValueError:
                pass
        if value is None or not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"must be a positive number, not {text[:40]!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfreport", description="Error reporting that never feeds on itself."
    )
    parser.add_argument("--version", action="version", version=f"selfreport {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demonstration of recursion-safe reporting")
    demo.add_argument("--once", action="store_true", help="exit after printing the summary")
    serve = sub.add_parser("serve", help="run the collector (needs selfreport[collector])")
    _add_serve_arguments(serve)
    _add_access_arguments(serve)
    _add_limit_arguments(serve)
    _add_forwarding_arguments(serve)
    _add_alerting_arguments(serve)
    _add_project_command(sub.add_parser("project", help="manage the collector's projects and keys"))
    _named_actions(
        sub.add_parser("user", help="manage who may log in to the pages and the API"),
        [
            ("add", "add a user (the password is asked for, or read from stdin)"),
            ("passwd", "change a user's password (and end their sessions)"),
            ("remove", "remove a user (and end their sessions)"),
            ("list", "list the users"),
        ],
    )
    _named_actions(
        sub.add_parser("token", help="manage API tokens (Authorization: Bearer TOKEN)"),
        [
            ("create", "create a token and print it (once: only its hash is kept)"),
            ("revoke", "revoke a token"),
            ("list", "list the tokens by name"),
        ],
    )
    _add_alerts_command(
        sub.add_parser("alerts", help="check alerting's configuration, try a notifier")
    )
    return parser


# Each dest is the name of server.serve()'s keyword argument it becomes.
def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    serve.add_argument(
        "--data", dest="data_dir", metavar="DIR", help="database directory (default: ~/.local/...)"
    )
    serve.add_argument(
        "--max-storage",
        metavar="SIZE",
        type=parse_size,
        help="keep the database under SIZE (500MB, 10GB, 2GiB) by deleting the oldest events"
        " (default: half the free disk, at most 2GB)",
    )


def _add_access_arguments(serve: argparse.ArgumentParser) -> None:
    access = serve.add_argument_group("who may read (see docs/security.md)")
    access.add_argument(
        "--public-url",
        metavar="URL",
        help="the URL clients reach the collector at, for DSNs and cookies "
        "(default: http://HOST:PORT)",
    )
    access.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        metavar="NAME",
        action="append",
        default=[],
        help="a name the Host header may carry, besides localhost, the listening address and "
        "the public URL's host (repeatable; '*' allows any)",
    )
    access.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="no login at all, on any address (only behind a proxy that authenticates)",
    )
    access.add_argument(
        "--metrics-public", action="store_true", help="/metrics needs no login (default: it does)"
    )


# The HttpLimits fields that `serve` takes as options: (field, type, metavar, what it limits).
_LIMITS: tuple[tuple[str, Callable[[str], Any], str, str], ...] = (
    ("max_connections", int, "N", "connections served at once; more get a 503"),
    ("header_timeout", float, "SECONDS", "time a client has to send its request headers"),
    ("body_timeout", float, "SECONDS", "time a client has to send a request body"),
)


def _add_limit_arguments(serve: argparse.ArgumentParser) -> None:
    limits = serve.add_argument_group("limits on clients (see the Security and limits docs)")
    for name, kind, metavar, what in _LIMITS:
        limits.add_argument(
            "--" + name.replace("_", "-"),
            type=_positive(kind),
            default=getattr(HttpLimits, name),
            metavar=metavar,
            help=f"{what} (default: %(default)s)",
        )


def _add_forwarding_arguments(serve: argparse.ArgumentParser) -> None:
    forwarding = serve.add_argument_group("forwarding upstream")
    forwarding.add_argument(
        "--upstream",
        metavar="DSN",
        help="forward stored events to this DSN (visible to other users in ps: prefer "
        "--upstream-file or $SELFREPORT_UPSTREAM_DSN)",
    )
    forwarding.add_argument(
        "--upstream-file",
        metavar="PATH",
        help="read the upstream DSN from this file (mode 600)",
    )
    forwarding.add_argument(
        "--forward",
        choices=("all", "own"),
        default="all",
        help="forward every project's events, or only the collector's own (default: all)",
    )
    forwarding.add_argument(
        "--scrub", action="store_true", help="remove secrets and personal data before forwarding"
    )
    forwarding.add_argument(
        "--spool",
        dest="spool_dir",
        metavar="DIR",
        help="where what the upstream cannot take yet waits (default: DATA/spool)",
    )


# --- alerting: serve --config, alerts check, alerts test --------------------------------------


def _add_alerting_arguments(serve: argparse.ArgumentParser) -> None:
    alerting = serve.add_argument_group("alerting (see docs/alerts.md)")
    alerting.add_argument(
        "--config",
        metavar="PATH",
        help="the TOML file of notifiers, alert rules and uptime checks "
        "(default: $SELFREPORT_CONFIG, else none)",
    )


def _add_alerts_command(alerts: argparse.ArgumentParser) -> None:
    actions = alerts.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="check a configuration file and summarize it")
    test = actions.add_parser("test", help="send a test notification through one notifier")
    test.add_argument("name", help="the notifier's name in the configuration")
    for action in (check, test):
        action.add_argument(
            "--config", metavar="PATH", help="the configuration (default: $SELFREPORT_CONFIG)"
        )


def _alerts(args: argparse.Namespace) -> int:
    try:
        from .collector.alerting.commands import alerts_command
    except ImportError as exc:  # pragma: no cover - tomli missing before Python 3.11
        print(f"selfreport: {exc}: pip install 'selfreport[collector]'", file=sys.stderr)
        return 2
    return alerts_command(args.action, args.config, getattr(args, "name", ""))


def _add_project_command(project: argparse.ArgumentParser) -> None:
    actions = project.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a project and print its DSN")
    create.add_argument("name")
    listing = actions.add_parser("list", help="list projects with their DSNs")
    for action in (create, listing):
        action.add_argument("--data", metavar="DIR", help="database directory")
        action.add_argument(
            "--public-url",
            "--url",
            dest="url",
            default="http://127.0.0.1:8000",
            help="the collector's public URL, for the DSN (default: %(default)s)",
        )


def _named_actions(parser: argparse.ArgumentParser, actions: list[tuple[str, str]]) -> None:
    """``ACTION NAME --data DIR`` subcommands (``list`` takes no name)."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in actions:
        action = sub.add_parser(name, help=text)
        if name != "list":
            action.add_argument("name")
        action.add_argument("--data", metavar="DIR", help="database directory")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return int(run_demo(once=args.once))
    if args.command == "alerts":
        return _alerts(args)
    if args.command in ("serve", "project", "user", "token"):
        from .collector import require_extra

        require_extra()
        if args.command in ("user", "token"):
            from .collector import accounts

            command = accounts.user_command if args.command == "user" else accounts.token_command
            return command(args.action, args.data, getattr(args, "name", ""))
        if args.command == "serve":
            return _serve(args)
        from .collector import server

        return server.project_command(args.action, args.data, getattr(args, "name", ""), args.url)
    parser.print_help(sys.stderr)
    return 2


def _serve(args: argparse.Namespace) -> int:
    """``selfreport serve``: the serve options are server.serve()'s keyword arguments."""
    from .collector import server

    options = dict(vars(args))
    del options["command"]
    limits = HttpLimits(**{name: options.pop(name) for name, *_ in _LIMITS})
    return server.serve(limits=limits, **options)
