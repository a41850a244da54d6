"""The benchmark harness (bench/run.py) runs end to end in --quick mode and writes sane tables."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"

SECTIONS = (
    "### Caller cost of one reported call",
    "### CPU per reported event",
    "### A dropped call",
    "### Scopes and breadcrumbs",
    "### An error storm of",
    "### close() against an upstream that never answers",
    "### Recursion amplification",
    "### Collector ingestion",
    "### Alert evaluation",
)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in ``text``, as rows of cells (the separator row left out)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if importlib.util.find_spec("pyperf") is None or importlib.util.find_spec("sentry_sdk") is None:
        pytest.skip("the benchmark needs pyperf and sentry-sdk: pip install 'selfreport[bench]'")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--output-dir", str(out)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_writes_every_section_as_well_formed_tables(
    quick_run: tuple[Path, str],
) -> None:
    out, _ = quick_run
    for name in ("results.md", "performance.md"):
        text = (out / name).read_text()
        for section in SECTIONS:
            assert section in text, f"{section!r} missing from {name}"
        tables = markdown_tables(text)
        assert len(tables) == len(SECTIONS)
        for table in tables:
            header, separator, *rows = table
            assert set("".join(separator)) <= set("-:"), separator
            assert rows, f"table without rows under {header}"
            for row in rows:
                assert len(row) == len(header), (header, row)
                assert all(cell != "" or i > 0 for i, cell in enumerate(row))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_measures_every_case_for_both_sdks(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    micro = results["micro"]
    for case in ("log_error", "log_exception", "capture_exception"):
        for sdk in ("selfreport", "sentry"):
            entry = micro[f"{case}:{sdk}"]
            assert entry["median"] > 0
            # Every measured call really reached the collector: nothing sampled or dropped.
            assert entry["delivered"] == entry["calls"] > 0
    assert micro["dropped:selfreport"]["median"] > 0
    assert micro["bare:none"]["median"] > 0

    assert [(r["sdk"], r["variant"]) for r in results["storm"]] == [
        ("selfreport", "identical"),
        ("selfreport", "distinct"),
        ("sentry", "distinct"),
    ]
    for storm in results["storm"]:
        assert storm["errors"] > 0
        assert storm["max_us"] >= storm["p99_us"] >= storm["p50_us"] > 0
        assert storm["delivered"] > 0

    assert [r["sdk"] for r in results["close"]] == ["selfreport", "sentry"]
    for close in results["close"]:
        assert close["accepted_requests"] >= 1  # the upstream really was reached, and hung
        assert close["close_wall"] > 0
        assert close["exit_wall"] > 0

    recursion = results["recursion"]
    assert set(recursion["table"]) == set(recursion["scenarios"])
    for scenario, row in recursion["table"].items():
        assert set(row) == set(recursion["columns"]), scenario
        for column, result in row.items():
            assert "error" not in result, (scenario, column, result)
            assert result["distinct"] >= 1, (scenario, column)

    assert "selfreport" in stdout
    assert "sentry-sdk" in stdout
    chart = out / "img" / "benchmarks.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
