"""Benchmarks selfreport against sentry-sdk side by side: ``make bench`` (or ``--quick``).

Every measurement runs in fresh subprocesses, one SDK per process, both sending to a real
HTTP endpoint (``selfreport.testing.FakeCollector`` on 127.0.0.1, in a process of its own).
Cost cases use pyperf; runs of the two SDKs are interleaved in rounds and reported as medians
and ratios, since absolute times on a shared machine mean little.

Writes bench/results.md, bench/results.json, docs/performance.md and docs/img/benchmarks.png
(``--quick`` writes them to a temporary directory unless ``--output-dir`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from _common import (
    BENCH_DIR,
    PYTHON,
    ROOT,
    SENTRY_DEFAULTS,
    SENTRY_PLUS,
    ChildError,
    CollectorProcess,
    run_child,
    sentry_plus_available,
)

PARTS = ("micro", "storm", "close", "recursion", "collector", "alerts")
REPORTED_CASES = ("log_error", "log_exception", "capture_exception")
# Scopes and breadcrumbs: a reported logger.error with a full scope (both SDKs), and a
# breadcrumb-recording logger.info against the same call to a NullHandler.
SCOPE_JOBS = (
    ("log_error_scope", "selfreport"),
    ("log_error_scope", "sentry"),
    ("breadcrumb", "selfreport"),
    ("bare_info", "none"),
)
CHEAP_CASES = ("dropped", "bare", "breadcrumb", "bare_info")  # no queue to drain


@dataclass
class Plan:
    """How much to run; ``full()`` keeps ``make bench`` under about ten minutes."""

    rounds: int
    processes: int  # pyperf worker processes per SDK and case, per round
    values: int
    cheap_values: int  # values per process for the dropped/bare pair (no queue to drain)
    warmups: int
    loops: dict[str, int]  # calls per value, per SDK (and for the dropped/bare pair)
    sentry_defaults: bool
    storm_errors: int
    close_events: int
    close_timeout: float
    window: float
    cap: int
    parallel: int  # recursion children at once (1: no interference between them)

    @classmethod
    def full(cls) -> Plan:
        return cls(
            rounds=3,
            processes=4,
            values=3,
            cheap_values=10,
            warmups=1,
            loops={"selfreport": 200, "sentry": 100, SENTRY_DEFAULTS: 40, "dropped": 20_000},
            sentry_defaults=True,
            storm_errors=100_000,
            close_events=100,
            close_timeout=2.0,
            window=3.0,
            cap=5000,
            parallel=1,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            rounds=1,
            processes=1,
            values=2,
            cheap_values=2,
            warmups=1,
            loops={"selfreport": 20, "sentry": 10, SENTRY_DEFAULTS: 5, "dropped": 2000},
            sentry_defaults=False,
            storm_errors=2000,
            close_events=10,
            close_timeout=0.5,
            window=1.0,
            cap=500,
            parallel=4,
        )


class Projects:
    """Hands out DSN project ids, so a collector counts each child's events apart."""

    _next = 100  # one sequence for the whole run: no two children ever share an id

    @classmethod
    def take(cls) -> int:
        cls._next += 1
        return cls._next


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


# --- 1-3: cost of one call (pyperf) -------------------------------------------------------------


def run_pyperf(
    plan: Plan, sdk: str, case: str, dsn: str, out: Path, side: Path, loops: int
) -> None:
    values = plan.cheap_values if case in CHEAP_CASES else plan.values
    cmd = [PYTHON, str(BENCH_DIR / "micro.py"), "--sdk", sdk, "--case", case, "--dsn", dsn]
    cmd += ["--side-file", str(side), "-p", str(plan.processes), "-n", str(values)]
    cmd += ["-w", str(plan.warmups), "-l", str(loops), "-q", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), check=False)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise ChildError(f"pyperf {sdk}:{case} failed ({proc.returncode}):\n{tail}")


def run_micro(
    plan: Plan, collector: CollectorProcess, raw: Path, cases: Optional[list[str]] = None
) -> dict[str, Any]:
    import pyperf

    jobs: list[tuple[str, str]] = []
    for case in REPORTED_CASES:
        jobs += [(case, "selfreport"), (case, "sentry")]
        if plan.sentry_defaults:
            jobs.append((case, SENTRY_DEFAULTS))
    jobs += [("dropped", "selfreport"), ("bare", "none"), *SCOPE_JOBS]
    if cases:
        jobs = [job for job in jobs if job[0] in cases]
    project_of = {job: Projects.take() for job in jobs}
    per_round: dict[tuple[str, str], list[list[float]]] = {job: [] for job in jobs}
    merged: dict[tuple[str, str], Any] = {}
    for r in range(plan.rounds):
        # Interleave: every SDK of a case runs in every round, the order flipping each round.
        ordered = jobs if r % 2 == 0 else list(reversed(jobs))
        for case, sdk in ordered:
            log(f"micro round {r + 1}/{plan.rounds}: {sdk} {case}")
            loops = plan.loops["dropped"] if case in CHEAP_CASES else plan.loops[sdk]
            out = raw / f"pyperf-{case}-{sdk}-r{r}.json"
            side = raw / f"side-{case}-{sdk}.jsonl"
            dsn = collector.dsn(project_of[(case, sdk)])
            run_pyperf(plan, sdk, case, dsn, out, side, loops)
            bench = pyperf.Benchmark.load(str(out))
            per_round[(case, sdk)].append(list(bench.get_values()))
            if (case, sdk) in merged:
                merged[(case, sdk)].add_runs(bench)
            else:
                merged[(case, sdk)] = bench
    suite = pyperf.BenchmarkSuite(list(merged.values()))
    suite.dump(str(raw / "pyperf-all.json"), replace=True)

    results: dict[str, Any] = {}
    for (case, sdk), rounds in per_round.items():
        values = [v for round_values in rounds for v in round_values]
        side_values = load_side(raw / f"side-{case}-{sdk}.jsonl")
        calls = sum(int(v["loops"]) for v in side_values["all"])
        entry: dict[str, Any] = {
            "values": len(values),
            "median": median(values),
            "q1_q3": quartiles(values),
            "round_medians": [median(rv) for rv in rounds],
            "thread_cpu": median(side_values["thread_cpu"]),
            "process_cpu": median(side_values["process_cpu"]),
            "calls": calls,
        }
        if case not in CHEAP_CASES:
            entry["delivered"] = collector.stats(project_of[(case, sdk)])["distinct"]
        results[f"{case}:{sdk}"] = entry
    return results


def load_side(path: Path) -> dict[str, list[Any]]:
    """Per-call CPU figures from micro.py's side file; each process's warm-up value skipped."""
    out: dict[str, list[Any]] = {"thread_cpu": [], "process_cpu": [], "all": []}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        record = json.loads(line)
        values = record["values"]
        out["all"].extend(values)
        for value in values[1:]:
            out["thread_cpu"].append(value["thread_cpu"] / value["loops"])
            out["process_cpu"].append(value["process_cpu"] / value["loops"])
    return out


# --- 4: error storm -----------------------------------------------------------------------------


def run_storm(plan: Plan, collector: CollectorProcess) -> list[dict[str, Any]]:
    results = []
    # sentry-sdk has no dedupe: its identical and distinct storms are the same workload.
    for sdk, variant in (
        ("selfreport", "identical"),
        ("selfreport", "distinct"),
        ("sentry", "distinct"),
    ):
        log(f"storm: {sdk} {variant}, {plan.storm_errors:,} errors")
        project = Projects.take()
        args = ["--sdk", sdk, "--dsn", collector.dsn(project), "--variant", variant]
        args += ["--errors", str(plan.storm_errors), "--close-timeout", "2.0"]
        result = run_child("storm.py", args, timeout=60 + plan.storm_errors / 200)
        time.sleep(0.3)
        result["delivered"] = collector.stats(project)["distinct"]
        results.append(result)
    return results


# --- 5: close() against a blackholed upstream ---------------------------------------------------


def time_exit(args: list[str], timeout: float) -> float:
    """Seconds from close_blackhole.py's ``EXITING`` line until its process is gone."""
    cmd = [PYTHON, str(BENCH_DIR / "close_blackhole.py"), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT)
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        started = time.perf_counter()
        if line.strip() != "EXITING":
            raise ChildError(f"close_blackhole.py printed {line!r}")
        proc.wait(timeout)
        return time.perf_counter() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return float("inf")
    finally:
        proc.stdout.close()


def run_close(plan: Plan, blackhole: CollectorProcess) -> list[dict[str, Any]]:
    results = []
    for sdk in ("selfreport", "sentry"):
        log(f"close: {sdk}, {plan.close_events} events queued, blackholed upstream")
        common = ["--sdk", sdk, "--events", str(plan.close_events)]
        common += ["--shutdown-timeout", str(plan.close_timeout)]
        project = Projects.take()
        result = run_child(
            "close_blackhole.py", [*common, "--dsn", blackhole.dsn(project)], timeout=60
        )
        result["accepted_requests"] = blackhole.stats(project)["requests"]
        exit_project = Projects.take()
        exit_args = [*common, "--dsn", blackhole.dsn(exit_project), "--mode", "exit"]
        result["exit_wall"] = time_exit(exit_args, timeout=60)
        results.append(result)
    return results


# --- 6: recursion amplification -----------------------------------------------------------------


def recursion_columns() -> tuple[list[tuple[str, str, list[str]]], str]:
    columns = [
        ("selfreport", "selfreport", []),
        ("selfreport, limits off", "selfreport", ["--unlimited"]),
        ("sentry-sdk", "sentry", []),
    ]
    available, why = sentry_plus_available()
    if available:
        columns.append(("sentry-sdk + SelfreportIntegration", SENTRY_PLUS, []))
    return columns, why


def run_recursion(
    plan: Plan, collector: CollectorProcess, failing: CollectorProcess
) -> dict[str, Any]:
    from recursion import SCENARIOS

    columns, why_missing = recursion_columns()
    jobs = []
    for scenario in SCENARIOS:
        for label, sdk, extra in columns:
            endpoint = failing if scenario == "upstream_500_debug" else collector
            jobs.append((scenario, label, sdk, extra, endpoint, Projects.take()))

    def run(job: tuple[Any, ...]) -> tuple[str, str, dict[str, Any]]:
        scenario, label, sdk, extra, endpoint, project = job
        args = ["--sdk", sdk, "--scenario", scenario, "--dsn", endpoint.dsn(project)]
        args += ["--window", str(plan.window), "--cap", str(plan.cap), *extra]
        try:
            result = run_child("recursion.py", args, timeout=plan.window + 30)
        except ChildError as exc:
            return scenario, label, {"error": str(exc)}
        if "local" in result:
            counts = result["local"]
        else:
            counts = endpoint.stats(project, *result["window"])
        result.update(counts)
        return scenario, label, result

    table: dict[str, dict[str, Any]] = {scenario: {} for scenario in SCENARIOS}
    log(f"recursion: {len(jobs)} runs of {plan.window:.0f}s windows")
    if plan.parallel > 1:  # quick mode: the figures matter less than the time
        with ThreadPoolExecutor(plan.parallel) as pool:
            outcomes = list(pool.map(run, jobs))
    else:
        outcomes = []
        for job in jobs:
            log(f"recursion: {job[0]} / {job[1]}")
            outcomes.append(run(job))
    for scenario, label, result in outcomes:
        table[scenario][label] = result
    return {
        "columns": [label for label, _, _ in columns],
        "scenarios": SCENARIOS,
        "table": table,
        "sentry_plus_missing": why_missing,
    }


# --- main ---------------------------------------------------------------------------------------


def run_collector(quick: bool) -> list[dict[str, Any]]:
    """Collector ingestion under load (bench/collector_load.py: 100 keep-alive senders at
    2,000 events/s offered, then as fast as it goes, then a bare-uvicorn baseline)."""
    duration = "2" if quick else "15"
    with tempfile.TemporaryDirectory(prefix="selfreport-collector-bench-") as tmp:
        out = Path(tmp) / "rows.json"
        log("collector: ingestion under load")
        subprocess.run(
            [
                PYTHON,
                str(BENCH_DIR / "collector_load.py"),
                "--duration",
                duration,
                "--json",
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=600,
        )
        rows: list[dict[str, Any]] = json.loads(out.read_text())
    for row in rows:
        row.pop("rss_samples", None)
    return rows


def run_alerts(quick: bool) -> dict[str, Any]:
    """Alert evaluation's cost (bench/alert_eval.py): ingestion at 2,000 events/s and as fast as
    it goes, without rules and with 20, alternately."""
    with tempfile.TemporaryDirectory(prefix="selfreport-alerts-bench-") as tmp:
        out = Path(tmp) / "alerts.json"
        log("alerts: ingestion with and without 20 alert rules")
        subprocess.run(
            [
                PYTHON,
                str(BENCH_DIR / "alert_eval.py"),
                *("--duration", "2" if quick else "15"),
                *("--rounds", "1" if quick else "2"),
                *("--json", str(out)),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=900,
        )
        summary: dict[str, Any] = json.loads(out.read_text())["summary"]
    return summary


def environment() -> dict[str, Any]:
    import sentry_sdk

    import selfreport

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "selfreport": selfreport.__version__,
        "sentry_sdk": sentry_sdk.VERSION,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="write results.md, results.json, performance.md and img/benchmarks.png here "
        "(default: bench/ and docs/; a temporary directory with --quick)",
    )
    parser.add_argument("--raw-dir", type=Path, help="keep pyperf JSON files here")
    parser.add_argument(
        "--micro-cases",
        default="",
        help="comma-separated micro cases to run (default: all), e.g. "
        "log_error_scope,breadcrumb,bare_info",
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    plan = Plan.quick() if args.quick else Plan.full()
    output_dir = args.output_dir
    if output_dir is None and (args.quick or set(parts) != set(PARTS) or args.micro_cases):
        # Only a full run of every part replaces the published figures.
        output_dir = Path(tempfile.mkdtemp(prefix="selfreport-bench-"))
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "md": output_dir / "results.md",
            "json": output_dir / "results.json",
            "docs": output_dir / "performance.md",
            "chart": output_dir / "img" / "benchmarks.png",
        }
    else:
        paths = {
            "md": BENCH_DIR / "results.md",
            "json": BENCH_DIR / "results.json",
            "docs": ROOT / "docs" / "performance.md",
            "chart": ROOT / "docs" / "img" / "benchmarks.png",
        }

    started = time.monotonic()
    results: dict[str, Any] = {
        "quick": args.quick,
        "plan": asdict(plan),
        "environment": environment(),
    }
    with tempfile.TemporaryDirectory(prefix="selfreport-bench-raw-") as tmp:
        raw = args.raw_dir or Path(tmp)
        raw.mkdir(parents=True, exist_ok=True)
        if "micro" in parts or "storm" in parts:
            with CollectorProcess() as collector:
                if "micro" in parts:
                    cases = [c.strip() for c in args.micro_cases.split(",") if c.strip()]
                    results["micro"] = run_micro(plan, collector, raw, cases)
                if "storm" in parts:
                    results["storm"] = run_storm(plan, collector)
        if "close" in parts:
            with CollectorProcess(blackhole=True) as blackhole:
                results["close"] = run_close(plan, blackhole)
        if "recursion" in parts:
            with CollectorProcess() as collector, CollectorProcess(status=500) as failing:
                results["recursion"] = run_recursion(plan, collector, failing)
        if "collector" in parts:
            results["collector"] = run_collector(args.quick)
        if "alerts" in parts:
            results["alerts"] = run_alerts(args.quick)
    results["environment"]["load_average_end"] = list(os.getloadavg())
    results["duration_s"] = time.monotonic() - started

    import report

    chart = None
    if not args.no_chart:
        chart = report.write_chart(results, paths["chart"])
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    chart_link = os.path.relpath(paths["chart"], paths["md"].parent) if chart else None
    paths["md"].write_text(report.results_markdown(results, chart_link))
    docs_chart = os.path.relpath(paths["chart"], paths["docs"].parent) if chart else None
    paths["docs"].write_text(report.performance_page(results, docs_chart))
    print(report.headline(results))
    for key in ("md", "json", "docs", "chart"):
        if key != "chart" or chart:
            print(f"wrote {paths[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
