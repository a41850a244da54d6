"""Check-in monitors: Sentry's monitor_config read and checked, each monitor's state at a time."""

from __future__ import annotations

import calendar
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Optional

__all__ = [
    "CHECKIN_STATUSES",
    "DEFAULT_MARGIN",
    "DEFAULT_MAX_RUNTIME",
    "FAILING_STATES",
    "INTERVAL_UNITS",
    "MAX_SLUG",
    "CheckIn",
    "CheckInError",
    "CheckInItem",
    "Monitor",
    "MonitorConfig",
    "MonitorConfigError",
    "MonitorStatus",
    "evaluate_monitor",
    "evaluate_monitors",
    "next_expected",
    "parse_checkin",
    "parse_monitor_config",
]

# What a client may send (Sentry's server adds "missed" and "timeout" itself, as we do).
CHECKIN_STATUSES = ("in_progress", "ok", "error")
# Sentry's defaults, in minutes: a check-in may come this late; a job may run this long.
DEFAULT_MARGIN = 1.0
DEFAULT_MAX_RUNTIME = 30.0
INTERVAL_UNITS = ("minute", "hour", "day", "week", "month", "year")
# States an alert rule fires on; "ok" and "pending" (nothing expected yet) do not.
FAILING_STATES = ("missed", "timeout", "failed")
_MAX_MINUTES = 60.0 * 24 * 366  # margins and runtimes beyond a year are input errors
_MAX_INTERVAL = 10_000
_ALIASES = {  # cronsim reads five fields only; Sentry accepts these as well
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


MAX_SLUG = 128  # characters of a monitor slug; environments get 64, like events'
_MAX_ENVIRONMENT = 64
_CHECK_IN_ID = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F-]{36}")


class CheckInError(ValueError):
    """A check-in a client sent is malformed; the message names the field."""


class MonitorConfigError(CheckInError):
    """A monitor_config a client sent is malformed; the message names the key."""


@dataclass(frozen=True)
class MonitorConfig:
    """A monitor's schedule as Sentry's ``monitor_config`` carries it (minutes for margins)."""

    schedule_type: str  # "crontab" | "interval"
    crontab: Optional[str] = None  # five fields (aliases expanded)
    interval: Optional[int] = None
    unit: Optional[str] = None  # one of INTERVAL_UNITS
    checkin_margin: float = DEFAULT_MARGIN
    max_runtime: float = DEFAULT_MAX_RUNTIME
    timezone: str = "UTC"

    def describe(self) -> str:
        """The schedule for people: ``0 * * * * (Europe/Riga)`` or ``every 2 hours``."""
        if self.schedule_type == "crontab":
            zone = "" if self.timezone == "UTC" else f" ({self.timezone})"
            return f"{self.crontab}{zone}"
        plural = "" if self.interval == 1 else "s"
        return f"every {self.interval} {self.unit}{plural}"

    def as_dict(self) -> dict[str, Any]:
        """Back to Sentry's shape (what is stored and shown in the API)."""
        schedule: dict[str, Any] = {"type": self.schedule_type}
        if self.schedule_type == "crontab":
            schedule["value"] = self.crontab
        else:
            schedule["value"] = self.interval
            schedule["unit"] = self.unit
        return {
            "schedule": schedule,
            "checkin_margin": self.checkin_margin,
            "max_runtime": self.max_runtime,
            "timezone": self.timezone,
        }


@dataclass(frozen=True)
class CheckInItem:
    """A ``check_in`` envelope item, checked: what ingestion hands the store."""

    slug: str
    check_in_id: str  # 32 lowercase hex digits
    status: str  # one of CHECKIN_STATUSES
    duration: Optional[float] = None
    environment: Optional[str] = None
    config: Optional[MonitorConfig] = None


@dataclass(frozen=True)
class CheckIn:
    """One check-in (its in_progress and its closing status are one row, by check_in_id)."""

    check_in_id: str
    status: str  # one of CHECKIN_STATUSES
    started: float  # epoch seconds the first item for this id arrived
    updated: float  # epoch seconds the last one arrived
    duration: Optional[float] = None  # seconds, as the client measured
    environment: Optional[str] = None


@dataclass(frozen=True)
class Monitor:
    """A monitor as stored: created by its first check-in; ``checkins`` newest first."""

    project: str
    slug: str
    config: Optional[MonitorConfig]
    created: float
    checkins: Sequence[CheckIn] = field(default_factory=tuple)


@dataclass(frozen=True)
class MonitorStatus:
    """A monitor's state at ``now``: ``ok``, ``pending``, ``missed``, ``timeout`` or ``failed``.

    ``since`` is when that state began (the missed deadline, the start of the timed-out run,
    the failed check-in); ``next_expected`` the next check-in the schedule asks for.
    """

    project: str
    slug: str
    state: str
    since: Optional[float]
    next_expected: Optional[float]
    last_checkin: Optional[CheckIn]
    detail: str
    schedule: Optional[str] = None

    @property
    def failing(self) -> bool:
        return self.state in FAILING_STATES

    @property
    def subject(self) -> str:
        """What an alert about this monitor is about: ``project/slug``."""
        return f"{self.project}/{self.slug}"


# --- reading monitor_config ------------------------------------------------------------------


def _minutes(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MonitorConfigError(f"monitor_config.{key} must be a number of minutes")
    if not 0 <= value <= _MAX_MINUTES:
        raise MonitorConfigError(f"monitor_config.{key} must be between 0 and {_MAX_MINUTES:g}")
    return float(value)


def _zone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return timezone.utc
    from zoneinfo import ZoneInfo

    try:
        return ZoneInfo(name)
    except (ValueError, OSError, LookupError):  # ZoneInfoNotFoundError is a KeyError
        raise MonitorConfigError(f"monitor_config.timezone: unknown time zone {name!r}") from None


def _crontab(value: Any) -> str:
    from cronsim import CronSim, CronSimError

    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise MonitorConfigError("monitor_config.schedule.value must be a crontab string")
    text = _ALIASES.get(value.strip().lower(), " ".join(value.split()))
    try:
        CronSim(text, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise MonitorConfigError(f"monitor_config.schedule.value {value!r}: {exc}") from None
    return text


def _schedule(schedule: Any) -> dict[str, Any]:
    if isinstance(schedule, str):  # what some SDKs send: the crontab alone
        schedule = {"type": "crontab", "value": schedule}
    if not isinstance(schedule, Mapping):
        raise MonitorConfigError("monitor_config.schedule must be an object")
    kind = schedule.get("type")
    if kind == "crontab":
        return {"schedule_type": kind, "crontab": _crontab(schedule.get("value"))}
    if kind == "interval":
        value, unit = schedule.get("value"), schedule.get("unit")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_INTERVAL:
            raise MonitorConfigError(
                f"monitor_config.schedule.value must be an integer from 1 to {_MAX_INTERVAL}"
            )
        if unit not in INTERVAL_UNITS:
            raise MonitorConfigError(
                f"monitor_config.schedule.unit must be one of {', '.join(INTERVAL_UNITS)}"
            )
        return {"schedule_type": kind, "interval": value, "unit": unit}
    raise MonitorConfigError('monitor_config.schedule.type must be "crontab" or "interval"')


def parse_monitor_config(raw: Any) -> MonitorConfig:
    """``monitor_config`` from a check-in, checked; unknown keys are ignored (newer SDKs send
    more, e.g. failure_issue_threshold). Raises :class:`MonitorConfigError`."""
    if not isinstance(raw, Mapping):
        raise MonitorConfigError("monitor_config must be an object")
    zone = raw.get("timezone")
    if zone is None:
        zone = "UTC"
    if not isinstance(zone, str) or not 0 < len(zone) <= 64:
        raise MonitorConfigError("monitor_config.timezone must be a time zone name")
    _zone(zone)
    return MonitorConfig(
        **_schedule(raw.get("schedule")),
        checkin_margin=_minutes(raw, "checkin_margin", DEFAULT_MARGIN),
        max_runtime=_minutes(raw, "max_runtime", DEFAULT_MAX_RUNTIME),
        timezone=zone,
    )


def _text(value: Any, name: str, limit: int) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise CheckInError(f"{name} must be a string of 1 to {limit} characters")
    return value


def parse_checkin(value: Any) -> CheckInItem:
    """A ``check_in`` item's JSON as sentry-sdk sends it (``check_in_id``, ``monitor_slug``,
    ``status``, ``duration``, ``environment``, ``monitor_config``), checked; a missing
    check_in_id gets a new one. Unknown fields are ignored. Raises :class:`CheckInError`."""
    if not isinstance(value, Mapping):
        raise CheckInError("a check-in must be a JSON object")
    slug = _text(value.get("monitor_slug"), "monitor_slug", MAX_SLUG)
    if slug is None:
        raise CheckInError("monitor_slug is missing")
    status = value.get("status")
    if status not in CHECKIN_STATUSES:
        raise CheckInError(f"status must be one of {', '.join(CHECKIN_STATUSES)}")
    raw_id = value.get("check_in_id")
    if raw_id is None:
        check_in_id = uuid.uuid4().hex
    elif isinstance(raw_id, str) and _CHECK_IN_ID.fullmatch(raw_id):
        check_in_id = raw_id.replace("-", "").lower()
        if len(check_in_id) != 32:
            raise CheckInError("check_in_id must be a UUID")
    else:
        raise CheckInError("check_in_id must be a UUID")
    duration = value.get("duration")
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, (int, float))
        or not math.isfinite(duration)
        or duration < 0
    ):
        raise CheckInError("duration must be a non-negative number of seconds")
    config = value.get("monitor_config")
    return CheckInItem(
        slug=slug,
        check_in_id=check_in_id,
        status=str(status),
        duration=None if duration is None else float(duration),
        environment=_text(value.get("environment"), "environment", _MAX_ENVIRONMENT),
        config=None if config is None else parse_monitor_config(config),
    )


# --- the schedule ----------------------------------------------------------------------------


def _add_months(moment: datetime, months: int) -> datetime:
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def next_expected(config: MonitorConfig, after: float) -> float:
    """When the check-in after one that started at ``after`` is due (epoch seconds).

    Crontab ticks are computed in the monitor's time zone. A check-in a little early (clock
    skew: up to half the margin, at most 30 s) counts for the tick it precedes.
    """
    zone = _zone(config.timezone)
    if config.schedule_type == "interval":
        start = datetime.fromtimestamp(after, zone)
        count = int(config.interval or 1)
        if config.unit in ("month", "year"):
            later = _add_months(start, count * (12 if config.unit == "year" else 1))
        else:
            later = start + timedelta(**{f"{config.unit}s": count})
        return later.timestamp()
    from cronsim import CronSim

    early = min(30.0, config.checkin_margin * 30.0)
    start = datetime.fromtimestamp(after + early, zone)
    return next(CronSim(str(config.crontab), start)).timestamp()


# --- evaluation ------------------------------------------------------------------------------


def _missed(
    monitor: Monitor, latest: CheckIn, due: Optional[float], now: float
) -> Optional[MonitorStatus]:
    config = monitor.config
    if config is None or due is None:
        return None
    deadline = due + config.checkin_margin * 60.0
    if now <= deadline:
        return None
    detail = f"no check-in for {_format(due, config)} (margin {config.checkin_margin:g} min)"
    return _status(monitor, "missed", deadline, _first_after(config, due, now), latest, detail)


def _first_after(config: MonitorConfig, due: float, now: float) -> float:
    """The first tick after ``now`` (every one since ``due`` was missed too)."""
    if config.schedule_type == "crontab":
        from cronsim import CronSim

        start = datetime.fromtimestamp(now, _zone(config.timezone))
        return next(CronSim(str(config.crontab), start)).timestamp()
    if config.unit in ("month", "year"):
        upcoming = due
        while upcoming <= now:  # months: a few hundred steps for decades
            upcoming = next_expected(config, upcoming)
        return upcoming
    period = next_expected(config, due) - due
    return due + (int((now - due) // period) + 1) * period


def _format(moment: float, config: MonitorConfig) -> str:
    return datetime.fromtimestamp(moment, _zone(config.timezone)).strftime("%Y-%m-%d %H:%M %Z")


def _status(
    monitor: Monitor,
    state: str,
    since: Optional[float],
    upcoming: Optional[float],
    latest: Optional[CheckIn],
    detail: str,
) -> MonitorStatus:
    config = monitor.config
    return MonitorStatus(
        project=monitor.project,
        slug=monitor.slug,
        state=state,
        since=since,
        next_expected=upcoming,
        last_checkin=latest,
        detail=detail,
        schedule=config.describe() if config is not None else None,
    )


def evaluate_monitor(monitor: Monitor, now: float) -> MonitorStatus:
    """One monitor's state at ``now``: missed first (nothing arrived when due, the newest
    fact), then timeout (in progress longer than max_runtime), then failed (the last check-in
    said error), else ok; ``pending`` when it has no check-in at all."""
    if not monitor.checkins:
        return _status(monitor, "pending", None, None, None, "no check-in yet")
    latest = max(monitor.checkins, key=lambda checkin: checkin.started)
    config = monitor.config
    upcoming = next_expected(config, latest.started) if config is not None else None
    missed = _missed(monitor, latest, upcoming, now)
    if missed is not None:
        return missed
    max_runtime = (config.max_runtime if config is not None else DEFAULT_MAX_RUNTIME) * 60.0
    if latest.status == "in_progress":
        if now > latest.started + max_runtime:
            detail = f"in progress for more than {max_runtime / 60.0:g} minutes"
            return _status(
                monitor, "timeout", latest.started + max_runtime, upcoming, latest, detail
            )
        return _status(monitor, "ok", latest.started, upcoming, latest, "in progress")
    if latest.status == "error":
        return _status(monitor, "failed", latest.updated, upcoming, latest, "check-in error")
    return _status(monitor, "ok", latest.updated, upcoming, latest, latest.status)


def evaluate_monitors(monitors: Iterable[Monitor], now: float) -> list[MonitorStatus]:
    """Every monitor's state at ``now`` (what the alert engine calls on its tick)."""
    return [evaluate_monitor(monitor, now) for monitor in monitors]
