"""Turns bench results into Markdown tables, the docs page, a PNG chart and a headline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from _common import SENTRY_DEFAULTS

CALL_LABELS = {
    "log_error": '`logger.error("payment %d declined", i)`',
    "log_exception": "`logger.exception(...)` in an `except` block",
    "capture_exception": "`capture_exception(exc)` in an `except` block",
}
SHORT_LABELS = {
    "log_error": "logger.error",
    "log_exception": "logger.exception",
    "capture_exception": "capture_exception",
}
COST_TARGET = 0.2
DROPPED_TARGET = 1.5
SCOPE_TARGET = 0.03  # a reported logger.error with a scope, against sentry-sdk's
BREADCRUMB_TARGET = 2.0  # a breadcrumb-recording logger.info, against one to a NullHandler
RSS_TARGET_MB = 20.0
BLOCKED_MS = 50.0  # a call slower than this counts as the caller having blocked
LOOPING_RATE = 5  # events/s still arriving in the last third of a window: still looping


def fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "n/a"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_us(microseconds: float) -> str:
    return fmt_time(microseconds / 1e6)


def fmt_ratio(ratio: float) -> str:
    if ratio != ratio:
        return "n/a"
    return f"{ratio:.3f}x" if ratio < 0.1 else f"{ratio:.2f}x"


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**MISS**"


def _ratio(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]], key: str) -> float:
    if not a or not b or not b.get(key):
        return float("nan")
    return float(a[key]) / float(b[key])


def _round_ratios(a: dict[str, Any], b: dict[str, Any]) -> str:
    ratios = [x / y for x, y in zip(a["round_medians"], b["round_medians"]) if y]
    if len(ratios) < 2:
        return "-"
    return f"{fmt_ratio(min(ratios))} to {fmt_ratio(max(ratios))}"


# --- tables -------------------------------------------------------------------------------------


def cost_tables(micro: dict[str, Any]) -> list[str]:
    has_defaults = any(key.endswith(":" + SENTRY_DEFAULTS) for key in micro)
    lines = [
        "### Caller cost of one reported call",
        "",
        "Median wall time per call on the calling thread (pyperf; interleaved rounds of fresh "
        "processes). Target: selfreport at most 0.2x sentry-sdk.",
        "",
    ]
    header = "| call | selfreport | sentry-sdk | ratio | per round | target ≤ 0.2x |"
    rule = "|---|---:|---:|---:|---:|:---:|"
    if has_defaults:
        header += " sentry-sdk, defaults | ratio |"
        rule += "---:|---:|"
    lines += [header, rule]
    for case in CALL_LABELS:
        ours = micro.get(f"{case}:selfreport")
        theirs = micro.get(f"{case}:sentry")
        if not ours or not theirs:
            continue
        ratio = _ratio(ours, theirs, "median")
        row = (
            f"| {CALL_LABELS[case]} | {fmt_time(ours['median'])} | {fmt_time(theirs['median'])} "
            f"| {fmt_ratio(ratio)} | {_round_ratios(ours, theirs)} "
            f"| {verdict(ratio <= COST_TARGET)} |"
        )
        if has_defaults:
            defaults = micro.get(f"{case}:{SENTRY_DEFAULTS}")
            if defaults:
                row += (
                    f" {fmt_time(defaults['median'])} "
                    f"| {fmt_ratio(_ratio(ours, defaults, 'median'))} |"
                )
            else:
                row += " n/a | n/a |"
        lines.append(row)
    lines += [
        "",
        "### CPU per reported event",
        "",
        "Median CPU time per call: of the calling thread, and of the whole process from the "
        "first call until the queue is drained (the SDK's worker thread building, serializing "
        "and sending the events included). Deferring work to a worker is not free; this column "
        "shows what it costs. *Delivered*: distinct events the collector received, of the calls "
        "made (warm-up values included).",
        "",
        "| call | SDK | caller thread CPU | whole process CPU | whole-process ratio | delivered |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case in CALL_LABELS:
        sentry = micro.get(f"{case}:sentry")
        for sdk, label in (
            ("selfreport", "selfreport"),
            ("sentry", "sentry-sdk"),
            (SENTRY_DEFAULTS, "sentry-sdk, defaults"),
        ):
            entry = micro.get(f"{case}:{sdk}")
            if not entry:
                continue
            ratio = "1.00x" if sdk == "sentry" else fmt_ratio(_ratio(entry, sentry, "process_cpu"))
            delivered = f"{entry.get('delivered', 0):,} / {entry['calls']:,}"
            lines.append(
                f"| {SHORT_LABELS[case]} | {label} | {fmt_time(entry['thread_cpu'])} "
                f"| {fmt_time(entry['process_cpu'])} | {ratio} | {delivered} |"
            )
    dropped = micro.get("dropped:selfreport")
    bare = micro.get("bare:none")
    if dropped and bare:
        ratio = _ratio(dropped, bare, "median")
        lines += [
            "",
            "### A dropped call",
            "",
            "`logger.error` inside `selfreport.reporting_path()` with selfreport's handler "
            "installed, against a bare `logger.error` to a logger whose only handler is a "
            "`logging.NullHandler` (no SDK in that process). Target: at most 1.5x.",
            "",
            "| call | median per call | q1 to q3 | ratio | per round | target ≤ 1.5x "
            "| caller CPU | CPU ratio |",
            "|---|---:|---:|---:|---:|:---:|---:|---:|",
            f"| bare `logger.error`, NullHandler only | {fmt_time(bare['median'])} "
            f"| {fmt_time(bare['q1_q3'][0])} to {fmt_time(bare['q1_q3'][1])} | 1.00x | | "
            f"| {fmt_time(bare['thread_cpu'])} | 1.00x |",
            f"| `logger.error` inside `reporting_path()` | {fmt_time(dropped['median'])} "
            f"| {fmt_time(dropped['q1_q3'][0])} to {fmt_time(dropped['q1_q3'][1])} "
            f"| {fmt_ratio(ratio)} | {_round_ratios(dropped, bare)} "
            f"| {verdict(ratio <= DROPPED_TARGET)} | {fmt_time(dropped['thread_cpu'])} "
            f"| {fmt_ratio(_ratio(dropped, bare, 'thread_cpu'))} |",
            "",
            "*caller CPU*: the calling thread's CPU time per call (median), which time spent "
            "preempted by other processes on this shared machine does not inflate.",
        ]
    return lines + scope_table(micro)


def _scope_pairs(micro: dict[str, Any]) -> list[tuple[str, Any, Any, float, str]]:
    """(label, ours, baseline, target, baseline label) for the scope cases that ran."""
    pairs = []
    ours, theirs = micro.get("log_error_scope:selfreport"), micro.get("log_error_scope:sentry")
    if ours and theirs:
        pairs.append(("reported `logger.error` with a scope", ours, theirs, SCOPE_TARGET,
                      "sentry-sdk, same scope"))  # fmt: skip
    crumb, bare = micro.get("breadcrumb:selfreport"), micro.get("bare_info:none")
    if crumb and bare:
        pairs.append(("breadcrumb-recording `logger.info`", crumb, bare, BREADCRUMB_TARGET,
                      "bare `logger.info`, NullHandler only"))  # fmt: skip
    return pairs


def scope_table(micro: dict[str, Any]) -> list[str]:
    pairs = _scope_pairs(micro)
    if not pairs:
        return []
    lines = [
        "",
        "### Scopes and breadcrumbs",
        "",
        "A reported `logger.error` with 5 tags, a user and 20 breadcrumbs in the scope, against "
        "sentry-sdk with the same scope (target: at most 0.03x); a `logger.info` that selfreport "
        "records as a breadcrumb, against the same call to a logger whose only handler is a "
        "`logging.NullHandler` (target: at most 2x). Median wall time per call.",
        "",
        "| call | selfreport | baseline | against | ratio | per round | target | caller CPU ratio |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for label, ours, base, target, against in pairs:
        ratio = _ratio(ours, base, "median")
        lines.append(
            f"| {label} | {fmt_time(ours['median'])} | {fmt_time(base['median'])} | {against} "
            f"| {fmt_ratio(ratio)} | {_round_ratios(ours, base)} "
            f"| {verdict(ratio <= target)} ≤ {target:g}x "
            f"| {fmt_ratio(_ratio(ours, base, 'thread_cpu'))} |"
        )
    return lines


def _client_drops(result: dict[str, Any]) -> str:
    stats = result.get("stats") or {}
    if not stats:
        delivered = result.get("delivered", 0)
        return f"{result['errors'] - delivered:,} (not delivered)"
    rate = stats.get("dropped_rate_limited", 0)
    queue = stats.get("dropped_queue_full", 0)
    return f"{rate:,} rate-limited/deduped, {queue:,} queue full"


def storm_table(storm: list[dict[str, Any]]) -> list[str]:
    errors = storm[0]["errors"] if storm else 0
    lines = [
        f"### An error storm of {errors:,} errors",
        "",
        "`logger.exception(...)` in a tight loop, each SDK with its default limits "
        "(selfreport: `rate_limit=10/s`, `rate_burst=100`, `dedupe_window=60 s`, "
        "`max_queue=1000`; sentry-sdk: `transport_queue_size=100`). *identical*: one message "
        "template and one place, so one fingerprint; *distinct*: an f-string message, a new "
        "fingerprint every time (sentry-sdk has no dedupe, so for it both are the same load). "
        "Latencies are of the logging call alone, on the caller's thread. Peak RSS growth: "
        "the process's peak resident set, reset just before the storm, minus its resident set "
        f"then. Targets: the caller never blocks (no call over {BLOCKED_MS:.0f} ms; a few ms is "
        "a GIL hand-over to the SDK's worker thread) and RSS grows by less than 20 MB.",
        "",
        "| SDK | storm | calls/s | p50 | p99 | p99.9 | max | calls > 5 ms | peak RSS growth "
        "| delivered | dropped on the client | never blocked | RSS < 20 MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|:---:|:---:|",
    ]
    for result in storm:
        sdk = "selfreport" if result["sdk"] == "selfreport" else "sentry-sdk"
        growth = result["peak_growth_mb"]
        lines.append(
            f"| {sdk} | {result['variant']} | {result['calls_per_s']:,.0f} "
            f"| {fmt_us(result['p50_us'])} | {fmt_us(result['p99_us'])} "
            f"| {fmt_us(result['p999_us'])} | {fmt_us(result['max_us'])} "
            f"| {result['over_5ms']:,} | {growth:.1f} MB | {result.get('delivered', 0):,} "
            f"| {_client_drops(result)} "
        )
        if result["sdk"] == "selfreport":  # the targets are selfreport's
            lines[-1] += (
                f"| {verdict(result['max_us'] < BLOCKED_MS * 1000)} "
                f"| {verdict(growth < RSS_TARGET_MB)} |"
            )
        else:
            lines[-1] += "| - | - |"
    return lines


def close_table(close: list[dict[str, Any]]) -> list[str]:
    if not close:
        return []
    timeout = close[0]["shutdown_timeout"]
    events = close[0]["events"]
    lines = [
        "### close() against an upstream that never answers",
        "",
        f"{events} events queued, the collector accepts connections and never answers, "
        f"`shutdown_timeout={timeout:g}` for both SDKs. *close()*: an explicit "
        "`selfreport.close()` / `sentry_sdk.get_client().close()`. *exit*: no explicit close; "
        "time from the end of the program until the process is gone (the atexit handlers).",
        "",
        "| SDK | close() | exit | requests accepted upstream | bounded by shutdown_timeout |",
        "|---|---:|---:|---:|:---:|",
    ]
    for result in close:
        sdk = "selfreport" if result["sdk"] == "selfreport" else "sentry-sdk"
        slack = 0.1 * timeout + 0.25
        bounded = result["close_wall"] <= timeout + slack
        exit_wall = result.get("exit_wall", float("nan"))
        lines.append(
            f"| {sdk} | {fmt_time(result['close_wall'])} | {fmt_time(exit_wall)} "
            f"| {result.get('accepted_requests', 0)} | {verdict(bounded)} |"
        )
    return lines


def looping(result: dict[str, Any]) -> bool:
    """Still amplifying when the window closed: the cap was hit, or errors from the reporting
    path kept producing events until the end (a storm's own tail of deliveries does not count).
    """
    if result.get("capped"):
        return True
    amplifying = result.get("amplifying_actions", 0) > 1
    return amplifying and tail_rate(result) >= LOOPING_RATE


def tail_rate(result: dict[str, Any]) -> float:
    """Events per second arriving in the last third of the window."""
    seconds = result.get("tail_seconds") or 1.0
    return float(result.get("events_tail", 0)) / float(seconds)


def recursion_cell(result: Optional[dict[str, Any]], window: float) -> str:
    if result is None:
        return "n/a"
    if "error" in result:
        return "error (see results.json)"
    originals = result["originals"]
    distinct = result.get("distinct", 0)
    requests = result.get("event_requests", 0)
    if result.get("capped"):
        return f"≥ {distinct:,}: loops (stopped by the bench's cap)"
    if looping(result):
        return f"≥ {distinct:,}: loops, still {tail_rate(result):,.0f}/s after {window:g} s"
    per_original = distinct / originals
    if originals == 1:
        text = f"{per_original:g}"
    else:
        noun = "event" if distinct == 1 else "events"
        text = f"{per_original:.3g} ({distinct:,} {noun} / {originals:,} errors)"
    if requests > distinct:
        text += f" ({requests} requests: retries)"
    return text


def recursion_table(recursion: dict[str, Any], window: float) -> list[str]:
    columns = list(recursion["columns"])
    plus = "sentry-sdk + SelfreportIntegration"
    missing = plus not in columns
    if missing:
        columns.append(plus)
    lines = [
        "### Recursion amplification",
        "",
        f"Distinct events that reached the endpoint within {window:g} s per original error, "
        "each scenario in fresh processes. Every amplifying action (logging from before_send, "
        "starting a thread, ...) is capped, and the processes are killed if they overrun, so "
        "an unbounded loop shows as *loops*. *limits off*: selfreport with `rate_limit=0, "
        "dedupe_window=0`, so only the reporting-path guard stands between an error and a loop.",
        "",
        "| scenario | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for scenario, title in recursion["scenarios"].items():
        row = recursion["table"].get(scenario, {})
        cells = [recursion_cell(row.get(column), window) for column in columns]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    notes = recursion_notes(recursion)
    if missing:
        notes.append(
            "n/a: `selfreport.integrations.sentry` is not importable here "
            f"({recursion.get('sentry_plus_missing') or 'unknown reason'})."
        )
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return lines


def recursion_notes(recursion: dict[str, Any]) -> list[str]:
    """What the reader needs to know to read the less obvious cells of this run."""
    table = recursion["table"]
    notes = []
    sentry_before_send = table.get("before_send_logs", {}).get("sentry-sdk") or {}
    depth = sentry_before_send.get("distinct", 0)
    if depth > 1 and "error" not in sentry_before_send and not looping(sentry_before_send):
        notes.append(
            f"sentry-sdk, *before_send logs an error*: {depth} events from one error. The "
            "recursion is synchronous (before_send logs, the logging integration captures, "
            "before_send runs again, ...) until Python's recursion limit ends it; sentry-sdk "
            "swallows the RecursionError."
        )
    retried = table.get("upstream_500_debug", {}).get("selfreport") or {}
    if retried.get("event_requests", 0) > retried.get("distinct", 0) > 0:
        notes.append(
            "*upstream answers 500*: selfreport retries a 5xx with backoff (`max_retries=3`), "
            "so the endpoint sees the same event several times; the count is of distinct events."
        )
    storm = table.get("storm_1000", {}).get("sentry-sdk") or {}
    if storm and "error" not in storm and storm.get("distinct", 0) < storm.get("originals", 0):
        notes.append(
            "sentry-sdk, *1,000 identical errors*: events beyond its transport queue "
            "(`transport_queue_size=100`) are dropped on the client, not deduplicated."
        )
    return notes


def environment_lines(results: dict[str, Any]) -> list[str]:
    env = results["environment"]
    load0 = ", ".join(f"{x:.2f}" for x in env["load_average_start"])
    load1 = ", ".join(f"{x:.2f}" for x in env.get("load_average_end", []))
    plan = results["plan"]
    mode = "quick (harness check only, figures meaningless)" if results.get("quick") else "full"
    return [
        f"Run {env['date']}, {mode}, {results.get('duration_s', 0):.0f} s: "
        f"{env['implementation']} {env['python']} on {env['platform']}, {env['cpus']} CPUs, "
        f"load average {load0} at start, {load1} at the end; selfreport {env['selfreport']}, "
        f"sentry-sdk {env['sentry_sdk']}. pyperf: {plan['rounds']} rounds x "
        f"{plan['processes']} processes x {plan['values']} values (+{plan['warmups']} warm-up) "
        "per SDK and case.",
    ]


def tables(results: dict[str, Any], chart: Optional[str]) -> list[str]:
    lines: list[str] = []
    lines += environment_lines(results)
    if chart:
        lines += ["", f"![selfreport and sentry-sdk side by side]({chart})"]
    window = float(results["plan"]["window"])
    if "micro" in results:
        lines += ["", *cost_tables(results["micro"])]
    if "storm" in results:
        lines += ["", *storm_table(results["storm"])]
    if "close" in results:
        lines += ["", *close_table(results["close"])]
    if "recursion" in results:
        lines += ["", *recursion_table(results["recursion"], window)]
    if "collector" in results:
        lines += ["", *collector_table(results["collector"])]
    if "alerts" in results:
        lines += ["", *alerts_table(results["alerts"])]
    return lines


def alerts_table(summary: dict[str, Any]) -> list[str]:
    """Ingestion with 20 alert rules against the same collector without (bench/alert_eval.py)."""
    without, with_rules = summary["cpu_us_per_event_at_rate"]
    closed_without, closed_with = summary["closed_events_per_s"]
    cpu_cost = summary["cpu_per_event_ratio"] - 1
    return [
        "### Alert evaluation (20 rules)",
        "",
        "| measure | without rules | with 20 rules | change | target |",
        "|---|---|---|---|---|",
        f"| collector CPU per event at 2,000 events/s | {without:.0f} µs | {with_rules:.0f} µs "
        f"| {cpu_cost:+.1%} | ≤ 5%: **{'pass' if cpu_cost <= 0.05 else 'MISS'}** |",
        f"| events/s as fast as it goes | {closed_without:,.0f} | {closed_with:,.0f} "
        f"| {closed_with / closed_without - 1:+.1%} | (load-sensitive) |",
        "",
        "Rules: rate per project and per issue (with and without a ratio), new issue, regression,"
        " health and self, evaluated by the engine's own thread; its CPU at 2,000 events/s was "
        f"{summary['engine_cpu_share_at_rate']:.1%} of a core.",
    ]


def collector_table(rows: list[dict[str, Any]]) -> list[str]:
    """``selfreport serve`` under load (bench/collector_load.py), with a bare-uvicorn baseline."""
    names = {
        "open": "2,000 events/s offered (100 senders)",
        "closed": "as fast as it goes (100 senders)",
        "baseline": "baseline: bare uvicorn app, same load",
    }
    lines = [
        "### Collector ingestion (`selfreport serve`)",
        "",
        "| phase | accepted/s | p50 | p99 | errors | collector CPU | RSS start/end MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rss = row.get("rss_mib_start_end_max") or (None, None, None)
        lines.append(
            f"| {names.get(str(row['phase']), row['phase'])} | {row['accepted_per_s']:,.0f} "
            f"| {row['p50_ms']} ms | {row['p99_ms']} ms | {row['errors']} "
            f"| {row['server_cpu_share']} core | {rss[0]} / {rss[1]} |"
        )
    lines += [
        "",
        "The load generator runs on the same two cores; the 5-minute run and the discussion "
        "are in docs/collector.md.",
    ]
    return lines


CONFIG_TEXT = """\
### How each SDK is configured

- **selfreport**, cost cases: `selfreport.init(dsn, rate_limit=0, dedupe_window=0,
  max_queue=1_000_000)`, so no call is deduplicated, rate-limited or dropped for a full queue:
  every call measured is really sent (see *delivered*). Storm and recursion: defaults.
- **sentry-sdk** ("sentry-sdk" columns): `sentry_sdk.init(dsn,
  integrations=[LoggingIntegration(level=None, event_level=logging.ERROR)],
  include_local_variables=False, disabled_integrations=[ModulesIntegration()],
  sample_rate=1.0)`, plus `transport_queue_size=1_000_000` in the cost cases. This sends the
  same content selfreport sends (no breadcrumbs, no list of installed packages, no local
  variables), so it is sentry-sdk at its cheapest: the ratios are conservative.
- **sentry-sdk, defaults**: as installed, with breadcrumbs from INFO logs
  (`LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)`), local variables and the
  list of installed packages in every event. What most applications run.
- Both SDKs send to `selfreport.testing.FakeCollector` on 127.0.0.1 in a separate process,
  which parses every envelope; one SDK per process, fresh processes for every measurement.
  Each compresses as it does by default (selfreport: gzip; sentry-sdk: brotli when the
  `brotli` module is installed, else gzip).
"""


def results_markdown(results: dict[str, Any], chart: Optional[str]) -> str:
    lines = [
        "# Benchmark results: selfreport and sentry-sdk side by side",
        "",
        "Generated by `make bench` (bench/run.py); see docs/performance.md for what each "
        "case measures and how to read it.",
        "",
        *tables(results, chart),
        "",
        CONFIG_TEXT,
    ]
    return "\n".join(lines).rstrip() + "\n"


PAGE_INTRO = """\
# Performance

Error reporting runs inside your application, so what it costs the caller matters as much
as what it sends. These figures come from `make bench`, which runs selfreport and sentry-sdk
side by side on the same machine in one run, and are regenerated by it. The machine is a
shared two-core box with other work running: read the **ratios**, not the absolute times.

## How it is measured

- **Cost of a call** (pyperf): each value times a burst of calls on the calling thread; the
  SDK's queue is drained between values, untimed, so every value starts from an empty queue
  and every call is really delivered to a real HTTP endpoint. Rounds of fresh processes
  alternate between the SDKs; the tables give medians over all rounds and the range of the
  per-round ratios.
- **Dropped call**: the price of the reporting-path guard: a log call made inside
  `reporting_path()` (what before_send, the transport's logging or a collector ingesting its
  own reports do), which selfreport drops before formatting anything.
- **Error storm**: 100,000 errors in a tight loop with the default limits; each call timed
  alone, and the peak resident memory.
- **close()**: events queued behind an upstream that accepts the connection and never answers.
- **Recursion amplification**: each way an error report can cause another error report,
  counted at the endpoint.

Run it yourself:

```bash
make bench                       # about seven minutes; rewrites this page and bench/results.md
make bench BENCH_ARGS=--quick    # half a minute, into a temporary directory: checks the harness
.venv/bin/python bench/run.py --only recursion --output-dir /tmp/bench   # one part
```
"""


def performance_page(results: dict[str, Any], chart: Optional[str]) -> str:
    lines = [
        PAGE_INTRO,
        "## Results",
        "",
        *tables(results, chart),
        "",
        CONFIG_TEXT,
        "## Reading the figures",
        "",
        "- selfreport takes a snapshot on the caller's thread (the message rendered with its "
        "arguments as they are at call time, the exception and its traceback kept) and leaves "
        "building, `before_send`, scrubbing, serialization and sending to its worker thread. "
        "sentry-sdk builds and serializes the event on the caller's thread.",
        "- The worker's share is in *whole process CPU*: under the GIL it still competes with "
        "the application, just not inside the call that logged the error. Where a call's wall "
        "time is well above its caller CPU time, the caller was waiting for the GIL while the "
        "worker thread held it.",
        "- In a storm, selfreport's defaults send the first event of each fingerprint and at "
        "most 10 events per second after a burst of 100; the rest are counted "
        "(`stats()['dropped_rate_limited']`) and repeats travel as a count with the next event.",
    ]
    return "\n".join(lines).rstrip() + "\n"


# --- headline -----------------------------------------------------------------------------------


def headline(results: dict[str, Any]) -> str:
    env = results["environment"]
    out = [
        "",
        f"selfreport {env['selfreport']} vs sentry-sdk {env['sentry_sdk']} "
        f"({env['cpus']} CPUs, load {env['load_average_start'][0]:.1f}; medians of "
        "interleaved runs)" + (" [QUICK: figures meaningless]" if results.get("quick") else ""),
    ]
    micro = results.get("micro", {})
    for case, label in SHORT_LABELS.items():
        ours, theirs = micro.get(f"{case}:selfreport"), micro.get(f"{case}:sentry")
        if ours and theirs:
            ratio = _ratio(ours, theirs, "median")
            out.append(
                f"  reported {label:<18} {fmt_time(ours['median']):>9} vs "
                f"{fmt_time(theirs['median']):>9} = {fmt_ratio(ratio):>7}  "
                f"(target <= {COST_TARGET}x: {'pass' if ratio <= COST_TARGET else 'MISS'})"
            )
    dropped, bare = micro.get("dropped:selfreport"), micro.get("bare:none")
    if dropped and bare:
        ratio = _ratio(dropped, bare, "median")
        out.append(
            f"  dropped call vs NullHandler {fmt_time(dropped['median']):>9} vs "
            f"{fmt_time(bare['median']):>9} = {fmt_ratio(ratio):>7}  "
            f"(target <= {DROPPED_TARGET}x: {'pass' if ratio <= DROPPED_TARGET else 'MISS'}; "
            f"caller CPU ratio {fmt_ratio(_ratio(dropped, bare, 'thread_cpu'))})"
        )
    for label, ours, base, target, against in _scope_pairs(micro):
        ratio = _ratio(ours, base, "median")
        out.append(
            f"  {label.replace('`', '')} {fmt_time(ours['median']):>9} vs "
            f"{fmt_time(base['median']):>9} ({against.replace('`', '')}) = "
            f"{fmt_ratio(ratio):>7}  (target <= {target:g}x: {'pass' if ratio <= target else 'MISS'})"
        )
    for result in results.get("storm", []):
        growth = result["peak_growth_mb"]
        ok = growth < RSS_TARGET_MB and result["max_us"] < BLOCKED_MS * 1000
        out.append(
            f"  storm {result['errors']:,} {result['sdk']:<10} {result['variant']:<9} "
            f"{result['calls_per_s']:>9,.0f} calls/s, p99 {fmt_us(result['p99_us'])}, "
            f"max {fmt_us(result['max_us'])}, RSS +{growth:.1f} MB"
            + (f" ({'pass' if ok else 'MISS'})" if result["sdk"] == "selfreport" else "")
        )
    for result in results.get("close", []):
        out.append(
            f"  close() vs blackhole, {result['sdk']:<10} {fmt_time(result['close_wall'])} "
            f"(exit {fmt_time(result.get('exit_wall', float('nan')))}, "
            f"shutdown_timeout {result['shutdown_timeout']:g} s)"
        )
    alerts = results.get("alerts")
    if alerts:
        cost = alerts["cpu_per_event_ratio"] - 1
        out.append(
            f"  alert evaluation, 20 rules: {cost:+.1%} collector CPU per event at 2,000/s "
            f"(target <= 5%: {'pass' if cost <= 0.05 else 'MISS'})"
        )
    recursion = results.get("recursion")
    if recursion:
        window = float(results["plan"]["window"])
        for column in recursion["columns"]:
            worst = 0.0
            loops = 0
            for scenario in recursion["scenarios"]:
                result = recursion["table"][scenario].get(column)
                if not result or "error" in result:
                    continue
                if looping(result):
                    loops += 1
                worst = max(worst, result.get("distinct", 0) / result["originals"])
            out.append(
                f"  recursion, {column:<34} worst {worst:g} events per original error; "
                f"loops in {loops} of {len(recursion['scenarios'])} scenarios "
                f"({window:g} s windows)"
            )
        if recursion.get("sentry_plus_missing"):
            out.append("  sentry-sdk + SelfreportIntegration: n/a (not importable)")
    return "\n".join(out)


# --- chart --------------------------------------------------------------------------------------


def write_chart(results: dict[str, Any], path: Path) -> Optional[Path]:
    """The PNG chart; None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'selfreport[bench]'): no chart")
        return None
    micro = results.get("micro", {})
    recursion = results.get("recursion")
    panels = int(bool(micro)) + int(bool(recursion))
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.8), squeeze=False)
    axis = iter(axes[0])
    colours = {"selfreport": "#2a9d8f", "sentry-sdk": "#e76f51", "defaults": "#f4a261"}
    if micro:
        ax = next(axis)
        cases = [c for c in CALL_LABELS if f"{c}:selfreport" in micro and f"{c}:sentry" in micro]
        labels = [SHORT_LABELS[c] for c in cases]
        series = [
            ("selfreport", [micro[f"{c}:selfreport"]["median"] * 1e6 for c in cases]),
            ("sentry-sdk", [micro[f"{c}:sentry"]["median"] * 1e6 for c in cases]),
        ]
        if all(f"{c}:{SENTRY_DEFAULTS}" in micro for c in cases):
            defaults = [micro[f"{c}:{SENTRY_DEFAULTS}"]["median"] * 1e6 for c in cases]
            series.append(("sentry-sdk, defaults", defaults))
        width = 0.8 / len(series)

        def slot(group: int, index: int) -> float:
            return group + (index - (len(series) - 1) / 2) * width

        def annotate(bars: Any, values: list[float]) -> None:
            for bar, value in zip(bars, values):
                ax.annotate(
                    f"{value:,.0f}" if value >= 10 else f"{value:.1f}",
                    (bar.get_x() + bar.get_width() / 2, value),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )

        for i, (name, values) in enumerate(series):
            key = "defaults" if "defaults" in name else name
            xs = [slot(x, i) for x in range(len(labels))]
            annotate(ax.bar(xs, values, width, label=name, color=colours[key]), values)
        if "dropped:selfreport" in micro and "bare:none" in micro:
            # The guard's price: a dropped call next to a bare call to a NullHandler.
            group = len(labels)
            labels.append("dropped call\nvs bare NullHandler")
            dropped = [micro["dropped:selfreport"]["median"] * 1e6]
            bare = [micro["bare:none"]["median"] * 1e6]
            annotate(ax.bar([slot(group, 0)], dropped, width, color=colours["selfreport"]), dropped)
            baseline = ax.bar(
                [slot(group, 1)], bare, width, color="#9e9e9e", label="no SDK, NullHandler"
            )
            annotate(baseline, bare)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 8)  # room for the legend above the tallest bar
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("µs per call on the caller's thread (median, log scale)")
        ax.set_title("Caller cost of one call")
        ax.legend(fontsize=8)
    if recursion:
        ax = next(axis)
        scenarios = list(recursion["scenarios"])
        columns = list(recursion["columns"])
        width = 0.8 / len(columns)
        palette = ["#2a9d8f", "#8ab17d", "#e76f51", "#264653"]
        for i, column in enumerate(columns):
            values = []
            loops = []
            for scenario in scenarios:
                result = recursion["table"][scenario].get(column) or {}
                originals = result.get("originals", 1) or 1
                values.append(max(result.get("distinct", 0) / originals, 1e-3))
                loops.append(bool(result) and "error" not in result and looping(result))
            xs = [x + (i - (len(columns) - 1) / 2) * width for x in range(len(scenarios))]
            ax.bar(xs, values, width, label=column, color=palette[i % len(palette)])
            for x, value, loop in zip(xs, values, loops):
                if loop:  # still going when the window closed: the bar is only a lower bound
                    ax.annotate("loops", (x, value), ha="center", va="bottom", fontsize=6)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 30)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="dotted")
        ax.set_xticks(range(len(scenarios)))
        short = {
            "before_send_logs": "before_send\nlogs",
            "str_logs": "__str__\nlogs",
            "upstream_500_debug": "upstream 500\nDEBUG logs",
            "thread_crash": "thread from\nbefore_send",
            "asyncio_task": "task from\nbefore_send",
            "storm_1000": "1,000\nidentical",
            "self_ingest": "endpoint logs\nwhile ingesting",
        }
        ax.set_xticklabels([short.get(s, s) for s in scenarios], fontsize=7)
        window = float(results["plan"]["window"])
        ax.set_ylabel(f"events at the endpoint per original error ({window:g} s, log scale)")
        ax.set_title("Recursion amplification (1 = no amplification)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
