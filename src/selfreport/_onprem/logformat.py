"""Log lines of selfreport's own processes, and the mark that tells shippers to skip them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MARK_KEY", "MARK_TOKEN", "is_marked_json", "is_marked_text"]

# A line written while serving or sending a report (the collector answering a request that
# carries a reporting origin, a shipper's own activity) carries this mark, in every process and
# format, so that no shipper tailing the file sends it again: shipping it would make a new line.
MARK_KEY = "reporting_path"  # JSON lines: {"reporting_path": true, ...}
MARK_TOKEN = "reporting_path=1"  # text lines: the token, anywhere in the line


def is_marked_json(line: Mapping[str, Any]) -> bool:
    """Whether a parsed JSON log line was written inside a reporting path."""
    return line.get(MARK_KEY) is True


def is_marked_text(line: str) -> bool:
    """Whether a text log line was written inside a reporting path."""
    return MARK_TOKEN in line
