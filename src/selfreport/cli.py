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
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return int(run_demo(once=args.once))
    parser.print_help(sys.stderr)
    return 2
