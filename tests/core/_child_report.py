"""A child process's job for the hand-off tests: report once, print its stats as JSON."""

from __future__ import annotations

import json
import sys


def report(dsn: str) -> str:
    import selfreport

    selfreport.init(dsn, rate_limit=0, dedupe_window=0)
    try:
        selfreport.capture_message("from a child process", level="error")
        assert selfreport.flush(timeout=10)
        return json.dumps(selfreport.stats())
    finally:
        selfreport.close(timeout=10)


if __name__ == "__main__":
    print(report(sys.argv[1]))
