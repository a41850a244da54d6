"""The ``selfreport`` command line: ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ._version import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfreport", description="Error reporting that never feeds on itself."
    )
    parser.add_argument("--version", action="version", version=f"selfreport {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demonstration of recursion-safe reporting")
    demo.add_argument("--once", action="store_true", help="exit after printing the summary")
    serve = sub.add_parser("serve", help="run the collector (needs selfreport[collector])")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    serve.add_argument("--data", metavar="DIR", help="database directory (default: ~/.local/...)")
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
        metavar="DIR",
        help="where what the upstream cannot take yet waits (default: DATA/spool)",
    )
    project = sub.add_parser("project", help="manage the collector's projects and keys")
    actions = project.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a project and print its DSN")
    create.add_argument("name")
    listing = actions.add_parser("list", help="list projects with their DSNs")
    for action in (create, listing):
        action.add_argument("--data", metavar="DIR", help="database directory")
        action.add_argument(
            "--url", default="http://127.0.0.1:8000", help="the collector's URL, for the DSN"
        )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return int(run_demo(once=args.once))
    if args.command in ("serve", "project"):
        from .collector import require_extra

        require_extra()
        from .collector import server

        if args.command == "serve":
            return server.serve(
                host=args.host,
                port=args.port,
                data_dir=args.data,
                upstream=args.upstream,
                upstream_file=args.upstream_file,
                forward=args.forward,
                scrub=args.scrub,
                spool_dir=args.spool,
            )
        return server.project_command(args.action, args.data, getattr(args, "name", ""), args.url)
    parser.print_help(sys.stderr)
    return 2
