"""The alerting configuration: notifiers, rules and uptime checks read from one TOML file."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from selfreport.collector.alerting.model import ALERT_KINDS, NOTIFIER_KINDS
from selfreport.exceptions import ConfigError as _BaseConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the 3.9/3.10 runs of make test-all
    import tomli as tomllib

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_PAGERDUTY_URL",
    "LEVELS",
    "SELF_METRICS",
    "AlertRule",
    "CollectorConfig",
    "ConfigError",
    "NotifierConfig",
    "SmtpConfig",
    "UptimeConfig",
    "config_path",
    "describe",
    "load_config",
    "parse_config",
    "parse_duration",
]

CONFIG_ENV = "SELFREPORT_CONFIG"  # the configuration file when --config is not given
DEFAULT_PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
# What a `self` rule can watch: the reporter's counters, forwarding, ingest latency.
SELF_METRICS = (
    "dropped_reentrant",
    "send_failed",
    "dropped_queue_full",
    "forward_backlog",
    "spool_bytes",
    "ingest_p99_ms",
    "notifier_failures",  # a notifier failing (its alert never goes through it)
)
LEVELS = ("debug", "info", "warning", "error", "fatal")
PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")

# Bounds: a configuration is written by an operator, but a typo must not make a rule that
# can never fire or a probe that hammers a server.
MAX_DURATION = 366 * 86400.0
MAX_TIMEOUT = 120.0
MAX_NAME = 100
MAX_ENTRIES = 1000
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d|w)?\s*$")
_SECRET_KEYS = {
    "secret": "secret_env",
    "password": "password_env",
    "routing_key": "routing_key_env",
}


class ConfigError(_BaseConfigError):
    """A configuration file is wrong: the one-line message names the file, the line and the key
    (``alerts.toml:12: alert 'error spike': window: ...``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(where, message)
        self.where = where


@dataclass(frozen=True)
class SmtpConfig:
    """How an email notifier reaches its SMTP server; ``password`` is read from the environment."""

    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    starttls: bool = False
    ssl: bool = False
    username: Optional[str] = None
    password_env: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True)
class NotifierConfig:
    """One ``[[notifier]]``; secrets (``secret``, ``routing_key``, SMTP password) come from the
    environment variables the file names, read once at load."""

    name: str
    kind: str
    url: Optional[str] = None
    secret_env: Optional[str] = None
    routing_key_env: Optional[str] = None
    smtp: Optional[SmtpConfig] = None
    timeout: float = 10.0
    severity: str = "error"  # pagerduty: the severity of triggered alerts
    secret: Optional[str] = field(default=None, repr=False)
    routing_key: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True)
class AlertRule:
    """One ``[[alert]]``: what it watches (``when``), its parameters, and who is told."""

    name: str
    when: str
    project: Optional[str] = None
    threshold: Optional[int] = None
    window: Optional[float] = None  # seconds
    per: str = "project"  # "project" | "issue"
    ratio: Optional[float] = None
    baseline: float = 3600.0
    notify: tuple[str, ...] = ()
    renotify: float = 3600.0
    grace: float = 0.0
    monitor: Optional[str] = None  # checkin: a monitor slug, None: all
    url: Optional[str] = None  # uptime: one URL, None: all
    check: Optional[str] = None  # health: one check, None: all
    metric: Optional[str] = None  # self: one of SELF_METRICS
    above: Optional[float] = None  # self: fires when the metric is above this
    consecutive: Optional[int] = None  # uptime: failed probes in a row
    level: Optional[str] = None  # new_issue / regression: the lowest level that counts


@dataclass(frozen=True)
class UptimeConfig:
    """One ``[[uptime]]`` probe: ``url`` fetched every ``interval`` seconds."""

    url: str
    interval: float = 60.0
    timeout: float = 10.0
    expect_status: tuple[int, ...] = (200,)
    consecutive: int = 1
    name: str = ""


@dataclass(frozen=True)
class CollectorConfig:
    """A loaded configuration file."""

    path: str
    notifiers: tuple[NotifierConfig, ...] = ()
    alerts: tuple[AlertRule, ...] = ()
    uptime: tuple[UptimeConfig, ...] = ()

    def notifier(self, name: str) -> Optional[NotifierConfig]:
        return next((n for n in self.notifiers if n.name == name), None)


def parse_duration(value: object) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"1h"``, ``"2d"``, ``"1w"``, ``"250ms"`` or a number
    of seconds; raises ValueError for anything else, zero, negative or over a year."""
    if isinstance(value, bool):
        raise ValueError('must be a duration like "30s", "5m", "1h", "2d" or seconds')
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError('must be a duration like "30s", "5m", "1h", "2d" or seconds')
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("must be more than zero")
    if seconds > MAX_DURATION:
        raise ValueError("must be at most 366 days")
    return seconds


# -- Where things are ----------------------------------------------------------------------
#
# TOML parsers return values without positions. To name a line, the raw text is scanned: the
# n-th ``[[alert]]`` header starts the n-th alert's block, which ends at the next header, and
# the key's line is the first line in that block that starts with ``key =`` (bare or quoted).
# A key that cannot be found that way (a dotted key, an inline table, a missing key) is
# reported at its table's header line; top-level keys are searched before the first header.

_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")


class _Locator:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str]] = []  # (0-based line, table name)
        for index, line in enumerate(self.lines):
            match = _HEADER.match(line)
            if match:
                self.headers.append((index, match.group(1).strip().strip("\"'")))

    def block(self, table: Optional[str], nth: int) -> tuple[int, int]:
        """The 0-based [start, end) lines of the ``nth`` ``[[table]]`` (None: the top level)."""
        if table is None:
            return 0, self.headers[0][0] if self.headers else len(self.lines)
        starts = [i for i, (index, name) in enumerate(self.headers) if name == table]
        if nth >= len(starts):
            return 0, 0
        k = starts[nth]
        start = self.headers[k][0]
        end = self.headers[k + 1][0] if k + 1 < len(self.headers) else len(self.lines)
        return start, end

    def line(self, table: Optional[str], nth: int, key: Optional[str]) -> int:
        """The 1-based line of ``key`` in the ``nth`` ``[[table]]`` (its header when not found)."""
        start, end = self.block(table, nth)
        if key is not None:
            pattern = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*[=.]")
            for index in range(start, end):
                if pattern.match(self.lines[index]):
                    return index + 1
        if table is None and key is not None:
            for index, name in self.headers:
                if name == key or name.startswith(key + "."):
                    return index + 1
        return start + 1

    def error(
        self, table: Optional[str], nth: int, key: Optional[str], message: str
    ) -> ConfigError:
        return ConfigError(f"{self.path}:{self.line(table, nth, key)}", message)


# -- One table -----------------------------------------------------------------------------


class _Table:
    """A ``[[table]]`` entry being read: typed getters whose errors name line and key."""

    def __init__(
        self, locator: _Locator, table: str, nth: int, values: Mapping[str, Any], label: str
    ) -> None:
        self.locator, self.table, self.nth = locator, table, nth
        self.values = values
        self.label = label

    def fail(self, key: Optional[str], message: str) -> ConfigError:
        prefix = f"{self.label}: {key}: " if key else f"{self.label}: "
        return self.locator.error(self.table, self.nth, key, prefix + message)

    def check_keys(self, allowed: Mapping[str, object], why: str) -> None:
        for key in self.values:
            if key in _SECRET_KEYS:
                hint = f"secrets never go in the file: set {_SECRET_KEYS[key]} to the name of"
                raise self.fail(key, hint + " an environment variable holding it")
            if key not in allowed:
                raise self.fail(key, f"unknown key {why} (known: {', '.join(sorted(allowed))})")

    def get(self, key: str, kind: type, required: bool = False) -> Any:
        if key not in self.values:
            if required:
                raise self.fail(key, "is required")
            return None
        value = self.values[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(key, f"must be {_TYPE_NAMES[kind]}, not {_toml_type(value)}")
        if isinstance(value, str) and (not value.strip() or len(value) > 2048):
            raise self.fail(key, "must be a non-empty string of at most 2048 characters")
        return value

    def text(self, key: str, required: bool = False, choices: tuple[str, ...] = ()) -> Any:
        value = self.get(key, str, required)
        if value is not None and choices and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def number(self, key: str, low: float, high: float, integer: bool = False) -> Any:
        value = self.get(key, int if integer else float)
        if value is not None and not (low <= value <= high and math.isfinite(value)):
            raise self.fail(key, f"must be between {low:g} and {high:g}, not {value!r}")
        return value

    def duration(self, key: str, high: float = MAX_DURATION, required: bool = False) -> Any:
        if key not in self.values:
            if required:
                raise self.fail(key, "is required")
            return None
        try:
            seconds = parse_duration(self.values[key])
        except ValueError as exc:
            raise self.fail(key, f"{exc}, not {self.values[key]!r}") from None
        if seconds > high:
            raise self.fail(key, f"must be at most {high:g} seconds")
        return seconds

    def names(self, key: str) -> Optional[tuple[str, ...]]:
        value = self.get(key, list)
        if value is None:
            return None
        if not all(isinstance(v, str) and v.strip() for v in value) or len(value) > MAX_ENTRIES:
            raise self.fail(key, "must be a list of non-empty strings")
        return tuple(value)

    def env(self, key: str, environ: Mapping[str, str], required: bool = False) -> Any:
        name = self.get(key, str, required)
        if name is None:
            return None, None
        secret = environ.get(name)
        if not secret:
            raise self.fail(key, f"environment variable {name} is not set (or empty)")
        return name, secret


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
}


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _check_url(table: _Table, key: str, url: Optional[str]) -> None:
    if url is None:
        return
    match = re.match(r"^(https?)://([^/?#\s]+)", url)
    if not match or any(c.isspace() for c in url):
        raise table.fail(key, f"must be an http:// or https:// URL, not {url!r}")


def _check_name(table: _Table, seen: set[str]) -> str:
    name: str = table.text("name", required=True)
    if len(name) > MAX_NAME:
        raise table.fail("name", f"must be at most {MAX_NAME} characters")
    if name in seen:
        raise table.fail("name", f"{name!r} is used twice")
    seen.add(name)
    return name


# -- Notifiers -----------------------------------------------------------------------------

_NOTIFIER_KEYS: dict[str, tuple[str, ...]] = {
    "webhook": ("url", "secret_env"),
    "slack": ("url",),
    "pagerduty": ("url", "routing_key_env", "severity"),
    "email": (
        "host",
        "port",
        "starttls",
        "ssl",
        "username",
        "password_env",
        "sender",
        "recipients",
    ),
}


def _notifier(table: _Table, seen: set[str], environ: Mapping[str, str]) -> NotifierConfig:
    name = _check_name(table, seen)
    table.label = f"notifier {name!r}"
    kind: str = table.text("kind", required=True, choices=NOTIFIER_KINDS)
    allowed = dict.fromkeys(("name", "kind", "timeout", *_NOTIFIER_KEYS[kind]))
    table.check_keys(allowed, f"for kind = {kind!r}")
    timeout = table.duration("timeout", high=MAX_TIMEOUT) or 10.0
    if kind == "email":
        return NotifierConfig(name, kind, smtp=_smtp(table, environ), timeout=timeout)
    url = table.text("url", required=kind != "pagerduty") or DEFAULT_PAGERDUTY_URL
    _check_url(table, "url", url)
    secret_env, secret = table.env("secret_env", environ)
    routing_env, routing_key = table.env("routing_key_env", environ, required=kind == "pagerduty")
    severity = table.text("severity", choices=PAGERDUTY_SEVERITIES) or "error"
    return NotifierConfig(
        name,
        kind,
        url=url,
        secret_env=secret_env,
        routing_key_env=routing_env,
        timeout=timeout,
        severity=severity,
        secret=secret,
        routing_key=routing_key,
    )


def _smtp(table: _Table, environ: Mapping[str, str]) -> SmtpConfig:
    host: str = table.text("host", required=True)
    use_ssl = bool(table.get("ssl", bool))
    starttls = bool(table.get("starttls", bool))
    if use_ssl and starttls:
        raise table.fail("starttls", "ssl = true and starttls = true exclude each other")
    port = table.number("port", 1, 65535, integer=True) or (
        465 if use_ssl else 587 if starttls else 25
    )
    sender: str = table.text("sender", required=True)
    recipients = table.names("recipients")
    if not recipients:
        raise table.fail("recipients", "is required: a non-empty list of addresses")
    for address in (sender, *recipients):
        if "@" not in address or any(c in address for c in "\r\n"):
            raise table.fail("recipients" if address != sender else "sender", f"{address!r}?")
    username = table.text("username")
    password_env, password = table.env("password_env", environ)
    if (username is None) != (password is None):
        raise table.fail("username", "username and password_env go together")
    return SmtpConfig(
        host, port, sender, recipients, starttls, use_ssl, username, password_env, password
    )


# -- Alert rules ---------------------------------------------------------------------------

_RULE_COMMON = ("name", "when", "notify", "renotify", "grace")
_RULE_KEYS: dict[str, tuple[str, ...]] = {
    "new_issue": ("project", "level"),
    "regression": ("project", "level"),
    "rate": ("project", "threshold", "window", "per", "ratio", "baseline"),
    "checkin": ("project", "monitor"),
    "uptime": ("url", "consecutive"),
    "health": ("check",),
    "self": ("metric", "above"),
}


def _rule(table: _Table, seen: set[str], notifiers: Mapping[str, NotifierConfig]) -> AlertRule:
    name = _check_name(table, seen)
    table.label = f"alert {name!r}"
    when: str = table.text("when", required=True, choices=ALERT_KINDS)
    allowed = dict.fromkeys((*_RULE_COMMON, *_RULE_KEYS[when]))
    table.check_keys(allowed, f"for when = {when!r}")
    notify = table.names("notify")
    if notify is None:
        raise table.fail("notify", "is required: a list of notifier names ([] to only log)")
    for target in notify:
        if target not in notifiers:
            known = ", ".join(sorted(notifiers)) or "none"
            raise table.fail("notify", f"no notifier is called {target!r} (known: {known})")
    rule = AlertRule(
        name,
        when,
        project=table.text("project"),
        notify=notify,
        renotify=table.duration("renotify") or 3600.0,
        grace=table.duration("grace") or 0.0,
        monitor=table.text("monitor"),
        url=table.text("url"),
        check=table.text("check"),
        level=table.text("level", choices=LEVELS),
    )
    _check_url(table, "url", rule.url)
    return _rule_kind(table, rule)


def _rule_kind(table: _Table, rule: AlertRule) -> AlertRule:
    if rule.when == "rate":
        threshold = table.number("threshold", 1, 10**9, integer=True)
        if threshold is None:
            raise table.fail("threshold", "is required for when = 'rate'")
        return replace(
            rule,
            threshold=threshold,
            window=table.duration("window", required=True),
            per=table.text("per", choices=("project", "issue")) or "project",
            ratio=table.number("ratio", 1e-6, 1e6),
            baseline=table.duration("baseline") or 3600.0,
        )
    if rule.when == "uptime":
        return replace(rule, consecutive=table.number("consecutive", 1, 10**6, integer=True))
    if rule.when == "self":
        metric = table.text("metric", required=True, choices=SELF_METRICS)
        above = table.number("above", 0, 1e15)
        if above is None:
            raise table.fail("above", "is required for when = 'self'")
        return replace(rule, metric=metric, above=above)
    return rule


# -- Uptime checks -------------------------------------------------------------------------

_UPTIME_KEYS = ("name", "url", "interval", "timeout", "expect_status", "consecutive")


def _uptime(table: _Table, seen: set[str]) -> UptimeConfig:
    url: str = table.text("url", required=True)
    table.label = f"uptime {url!r}"
    table.check_keys(dict.fromkeys(_UPTIME_KEYS), "for [[uptime]]")
    _check_url(table, "url", url)
    if "name" in table.values:
        name = _check_name(table, seen)
    elif url in seen:
        raise table.fail("url", f"{url!r} is checked twice (give them different names)")
    else:
        name = url
        seen.add(url)
    interval = table.duration("interval") or 60.0
    if interval < 1.0:
        raise table.fail("interval", "must be at least 1 second")
    timeout = table.duration("timeout", high=MAX_TIMEOUT) or min(10.0, interval)
    return UptimeConfig(
        url=url,
        interval=interval,
        timeout=timeout,
        expect_status=_statuses(table),
        consecutive=table.number("consecutive", 1, 10**6, integer=True) or 1,
        name=name,
    )


def _statuses(table: _Table) -> tuple[int, ...]:
    value = table.values.get("expect_status", 200)
    values = value if isinstance(value, list) else [value]
    ok = values and all(
        isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in values
    )
    if not ok or len(values) > 100:
        raise table.fail("expect_status", "must be an HTTP status (100-599) or a list of them")
    return tuple(values)


# -- The file ------------------------------------------------------------------------------

_SECTIONS = ("notifier", "alert", "uptime")


def parse_config(
    text: str, path: str = "<config>", environ: Optional[Mapping[str, str]] = None
) -> CollectorConfig:
    """The configuration in ``text`` (``path`` names it in errors); raises :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"line (\d+)", message)
        line = found.group(1) if found else "1"
        raise ConfigError(f"{path}:{line}", f"not valid TOML: {message}") from None
    locator = _Locator(path, text)
    for key, value in data.items():
        if key not in _SECTIONS:
            hint = "(known: [[notifier]], [[alert]], [[uptime]])"
            raise locator.error(None, 0, key, f"{key}: unknown section {hint}")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise locator.error(None, 0, key, f"{key}: must be written [[{key}]] (a table list)")
        if len(value) > MAX_ENTRIES:
            raise locator.error(None, 0, key, f"{key}: more than {MAX_ENTRIES} entries")
    notifiers: dict[str, NotifierConfig] = {}
    for nth, values in enumerate(data.get("notifier", [])):
        table = _Table(locator, "notifier", nth, values, f"notifier #{nth + 1}")
        config = _notifier(table, set(notifiers), environ)
        notifiers[config.name] = config
    rules = _each(locator, data, "alert", lambda table, seen: _rule(table, seen, notifiers))
    uptime = _each(locator, data, "uptime", _uptime)
    return CollectorConfig(path, tuple(notifiers.values()), tuple(rules), tuple(uptime))


def _each(
    locator: _Locator,
    data: Mapping[str, Any],
    section: str,
    read: Callable[[_Table, set[str]], Any],
) -> list[Any]:
    seen: set[str] = set()
    return [
        read(_Table(locator, section, nth, values, f"{section} #{nth + 1}"), seen)
        for nth, values in enumerate(data.get(section, []))
    ]


def load_config(
    path: Union[str, os.PathLike[str]], environ: Optional[Mapping[str, str]] = None
) -> CollectorConfig:
    """Read and check the TOML file at ``path``; secrets are read from ``environ`` (default:
    ``os.environ``). Raises :class:`ConfigError` with a one-line ``file:line: ...`` message."""
    name = os.fspath(path)
    try:
        raw = Path(name).read_bytes()
    except OSError as exc:
        raise ConfigError(name, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(name, f"not UTF-8 (byte {exc.start})") from None
    return parse_config(text, name, environ)


def describe(config: CollectorConfig) -> list[str]:
    """One line per notifier, rule and uptime check (``selfreport alerts check``, ``serve``)."""
    lines = [
        f"{config.path}: {len(config.notifiers)} notifiers, {len(config.alerts)} alert rules,"
        f" {len(config.uptime)} uptime checks"
    ]
    for n in config.notifiers:
        where = f"{n.smtp.host}:{n.smtp.port}" if n.smtp is not None else _without_query(n.url)
        lines.append(f"  notifier {n.name!r}: {n.kind} to {where}")
    for rule in config.alerts:
        targets = ", ".join(repr(name) for name in rule.notify) or "nobody (logged only)"
        lines.append(f"  alert {rule.name!r}: when {rule.when}, notify {targets}")
    for check in config.uptime:
        lines.append(f"  uptime {check.name!r}: every {check.interval:g}s")
    return lines


def _without_query(url: Optional[str]) -> str:
    # Slack and PagerDuty URLs can hold secrets in their path or query: show the host only.
    match = re.match(r"^(https?://[^/?#]+)", url or "")
    return match.group(1) if match else "?"


def config_path(given: Optional[str]) -> Optional[str]:
    """``--config``, else ``$SELFREPORT_CONFIG``, else None."""
    return given or os.environ.get(CONFIG_ENV) or None
