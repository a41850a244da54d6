"""``selfreport demo --once`` as a user runs it: a subprocess, a collector, a summary table."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_once_prints_a_summary_where_every_trap_is_contained() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "selfreport", "demo", "--once"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 5 and cells[1].isdigit():
            rows[cells[0]] = cells
    # trap -> errors, sent, stored, self-reports, dropped
    assert rows["real errors: a log, an exception, a message"][1:5] == ["3", "3", "3", "0"]
    for trap in (
        "before_send logs an error",
        "a log argument's __str__ logs an error",
        "a thread started in before_send crashes",
    ):
        assert rows[trap][1:5] == ["1", "1", "1", "0"], trap
        assert "reentrant" in rows[trap][5]
    storm = rows["10,000 identical errors"]
    assert storm[1] == "10000"
    assert int(storm[3]) <= 2  # the first, and the summary of the repeats at close
    poison = rows["the collector fails ingesting a report"]
    assert poison[4] == "1"  # exactly one self-report, no loop
    assert rows["the collector is down"][3] == "0"
    assert "web page: http://127.0.0.1:" in out
