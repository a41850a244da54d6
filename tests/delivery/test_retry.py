"""The retry policy, the classification of answers and the upstream's limits, on a fake clock."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfreport import ConfigError
from selfreport._delivery.retry import (
    MAX_BACKOFF,
    MAX_REPLAY_BACKOFF,
    MAX_REPLAY_FIRST_BACKOFF,
    MAX_RETRIES,
    REPLAY_ATTEMPTS,
    RETRY_AFTER_MAX,
    Outcome,
    Retry,
    UpstreamLimits,
    classify,
    parse_rate_limits,
    parse_retry_after,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


# --- classify --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (None, Outcome.UNREACHABLE),
        (200, Outcome.SENT),
        (202, Outcome.SENT),
        (299, Outcome.SENT),
        (429, Outcome.RATE_LIMITED),
        (400, Outcome.REFUSED),
        (401, Outcome.REFUSED),
        (413, Outcome.REFUSED),
        (302, Outcome.REFUSED),
        (100, Outcome.REFUSED),
        (500, Outcome.FAILED),
        (503, Outcome.FAILED),
        (599, Outcome.FAILED),
    ],
)
def test_classify(status: Optional[int], outcome: Outcome) -> None:
    assert classify(status) is outcome


# --- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("nan", None),
        ("inf", RETRY_AFTER_MAX),
        ("99999999", RETRY_AFTER_MAX),
        ("Mon, 99 Foo 2024 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after_seconds(value: Optional[str], expected: Optional[float]) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    when = datetime(2030, 1, 1, 0, 1, 0, tzinfo=timezone.utc)
    now = datetime(2030, 1, 1, 0, 0, 0, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after(format_datetime(when, usegmt=True), now=now) == 60.0
    assert parse_retry_after(format_datetime(when, usegmt=True), now=now + 3600) == 0.0
    assert parse_retry_after(format_datetime(when, usegmt=True), now=now - 86400) == 3600.0


@given(st.integers(min_value=0, max_value=10**12))
def test_retry_after_in_seconds_is_read_and_capped(seconds: int) -> None:
    assert parse_retry_after(str(seconds)) == min(float(seconds), RETRY_AFTER_MAX)


@given(
    st.datetimes(
        min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(None)
    ),
    st.integers(min_value=-7200, max_value=7200),
)
def test_retry_after_as_an_http_date_is_read_and_capped(when: datetime, offset: int) -> None:
    moment = when.replace(microsecond=0, tzinfo=timezone.utc)
    now = (moment - timedelta(seconds=offset)).timestamp()
    expected = min(max(0.0, float(offset)), RETRY_AFTER_MAX)
    assert parse_retry_after(format_datetime(moment, usegmt=True), now=now) == expected


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, now=0.0)
    assert result is None or 0.0 <= result <= RETRY_AFTER_MAX


# --- X-Sentry-Rate-Limits --------------------------------------------------------------------


def test_parse_rate_limits() -> None:
    header = "60:transaction;session:organization, 10:error:project:quota_exceeded, junk:error"
    assert parse_rate_limits(header) == [(60.0, ("transaction", "session")), (10.0, ("error",))]
    assert parse_rate_limits("5::organization") == [(5.0, ())]
    assert parse_rate_limits("5") == [(5.0, ())]
    assert parse_rate_limits("5:error;:key") == [(5.0, ("error",))]  # "" is not "everything"
    assert parse_rate_limits("nan:error, -1:error") == [(0.0, ("error",))]
    assert parse_rate_limits("") == parse_rate_limits(None) == []


_CATEGORY = st.sampled_from(["error", "transaction", "session", "attachment", "default"])
_SCOPE = st.sampled_from(["organization", "project", "key", ""])
_LIMIT = st.tuples(
    st.integers(min_value=0, max_value=10**6),
    st.lists(_CATEGORY, max_size=3),
    _SCOPE,
    st.sampled_from(["", "quota_exceeded", "disabled"]),
)


@given(st.lists(_LIMIT, min_size=1, max_size=5))
def test_rate_limits_with_categories_and_scopes(
    limits: list[tuple[int, list[str], str, str]],
) -> None:
    header = ", ".join(
        f"{seconds}:{';'.join(categories)}:{scope}" + (f":{reason}" if reason else "")
        for seconds, categories, scope, reason in limits
    )
    expected = [
        (min(float(seconds), RETRY_AFTER_MAX), tuple(categories))
        for seconds, categories, _, _ in limits
    ]
    assert parse_rate_limits(header) == expected


@given(st.text(max_size=80))
def test_parse_rate_limits_never_raises(header: str) -> None:
    for seconds, categories in parse_rate_limits(header):
        assert 0.0 <= seconds <= RETRY_AFTER_MAX
        assert all(categories)


# --- UpstreamLimits --------------------------------------------------------------------------


def test_no_limits_by_default(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    assert not limits.is_limited()
    assert limits.seconds_left() == 0.0


def test_429_with_retry_after(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    assert limits.answer(429, {"Retry-After": "30"}) is Outcome.RATE_LIMITED
    assert limits.is_limited("error")
    assert limits.is_limited("transaction")  # no categories: everything waits
    assert limits.seconds_left() == 30.0
    clock.now += 30
    assert not limits.is_limited()


def test_429_without_retry_after_backs_off_a_default(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(429, {})
    assert limits.seconds_left() == UpstreamLimits.DEFAULT_BACKOFF


def test_retry_after_is_capped(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(429, {"retry-after": "999999"})
    assert limits.seconds_left() == UpstreamLimits.MAX_BACKOFF == RETRY_AFTER_MAX


def test_a_503_with_retry_after_holds_everything_back(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    assert limits.answer(503, {"Retry-After": "5"}) is Outcome.FAILED
    assert limits.seconds_left("error") == 5.0
    limits.update(503, {})  # without the header: nothing to wait for
    limits.update(500, {"Retry-After": "60"})  # not a status that Retry-After applies to
    assert limits.seconds_left("error") == 5.0


def test_sentry_rate_limits_header_by_category(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    header = "60:transaction;session:organization, 10:error:project:quota_exceeded, junk:error"
    limits.update(429, {"X-Sentry-Rate-Limits": header, "Retry-After": "999"})
    assert limits.seconds_left("error") == 10.0  # the specific header wins over Retry-After
    assert limits.seconds_left("transaction") == 60.0
    assert not limits.is_limited("attachment")
    clock.now += 10
    assert not limits.is_limited("error")
    assert limits.is_limited("transaction")


def test_sentry_rate_limits_on_an_accepted_answer(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    assert limits.answer(200, {"x-sentry-rate-limits": "5::organization"}) is Outcome.SENT
    assert limits.is_limited("error")
    assert limits.seconds_left("anything") == 5.0


def test_shorter_limit_never_shortens_a_longer_one(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(429, {"Retry-After": "60"})
    limits.update(429, {"Retry-After": "1"})
    assert limits.seconds_left() == 60.0


def test_other_statuses_without_header_change_nothing(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    limits.update(500, {"Retry-After": "60"})
    limits.update(200, {})
    assert not limits.is_limited()


def test_the_table_of_categories_is_bounded(clock: Clock) -> None:
    limits = UpstreamLimits(clock)
    many = ";".join(f"c{n}" for n in range(1000))
    limits.update(200, {"X-Sentry-Rate-Limits": f"60:{many}, 60:{'x' * 100}, 30:error"})
    assert len(limits._until) <= 64
    assert limits.seconds_left("c0") == 60.0
    assert not limits.is_limited("x" * 100)
    limits.update(200, {"X-Sentry-Rate-Limits": "90:c1"})  # one it knows is still extended
    assert limits.seconds_left("c1") == 90.0


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=60), max_size=4), st.integers())
def test_any_answer_never_raises(headers: dict[str, str], status: int) -> None:
    limits = UpstreamLimits(Clock())
    headers.setdefault("X-Sentry-Rate-Limits", "".join(headers.values()))
    assert isinstance(limits.answer(status, headers), Outcome)
    assert 0.0 <= limits.seconds_left() <= RETRY_AFTER_MAX


# --- Retry -----------------------------------------------------------------------------------


def test_a_policy_is_a_value() -> None:
    policy = Retry(total=2, backoff_factor=1.0)
    later = policy.increment()
    assert (policy.attempts, later.attempts) == (0, 1)
    assert later.new(attempts=0) == policy
    assert policy.new(total=0).total == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 5  # type: ignore[misc]


def test_retries_are_counted_until_exhausted() -> None:
    retry = Retry(total=2)
    tries = 1
    while retry.is_retry(Outcome.FAILED):
        retry = retry.increment()
        tries += 1
    assert tries == 3  # the first try and two retries
    assert not retry.is_exhausted()
    assert retry.increment().is_exhausted()
    assert Retry(total=None, attempts=10**6).is_retry(Outcome.UNREACHABLE)


@pytest.mark.parametrize("outcome", [Outcome.SENT, Outcome.RATE_LIMITED, Outcome.REFUSED])
def test_only_failures_and_no_answer_are_retried(outcome: Outcome) -> None:
    assert not Retry(total=5).is_retry(outcome)


def test_a_retry_after_past_the_ceiling_is_not_waited_for() -> None:
    retry = Retry(total=3, retry_after_max=30.0)
    assert retry.is_retry(Outcome.FAILED, retry_after=30.0)
    assert not retry.is_retry(Outcome.FAILED, retry_after=31.0)


def test_backoff_doubles_up_to_its_cap() -> None:
    retry = Retry(total=None, backoff_factor=0.5, backoff_max=3.0)
    times = []
    for _ in range(6):
        retry = retry.increment()
        times.append(retry.get_backoff_time())
    assert Retry().get_backoff_time() == 0.0
    assert times == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert retry.new(attempts=10**9).get_backoff_time() == 3.0  # no overflow, however many


def test_sleep_time_is_jittered_and_honours_retry_after() -> None:
    retry = Retry(backoff_factor=2.0, retry_after_max=10.0, attempts=1)
    assert retry.get_sleep_time(rand=lambda: 0.0) == 2.0
    assert retry.get_sleep_time(rand=lambda: 1.0) == 1.0  # up to half taken off
    assert retry.get_sleep_time(5.0, rand=lambda: 0.0) == 5.0  # the upstream asked longer
    assert retry.get_sleep_time(99.0, rand=lambda: 0.0) == 10.0  # up to the ceiling


@given(
    st.integers(min_value=0, max_value=10**6),
    st.floats(min_value=0, max_value=MAX_BACKOFF),
    st.floats(min_value=0, max_value=RETRY_AFTER_MAX),
)
def test_sleep_time_is_always_bounded(attempts: int, factor: float, asked: float) -> None:
    retry = Retry(total=None, backoff_factor=factor, attempts=attempts)
    assert 0.0 <= retry.get_sleep_time(asked) <= MAX_BACKOFF


def test_the_delivery_policy_from_options() -> None:
    assert Retry.for_delivery(3, 0.5) == Retry(total=3, backoff_factor=0.5)
    assert Retry.for_delivery(MAX_RETRIES, MAX_BACKOFF).backoff_max == MAX_BACKOFF


def test_the_replay_policy_from_options() -> None:
    policy = Retry.for_replay(2.0, 120.0)
    assert policy.total == REPLAY_ATTEMPTS - 1
    assert (policy.backoff_factor, policy.backoff_max) == (2.0, 120.0)
    assert policy.retry_after_max == RETRY_AFTER_MAX  # a spool always waits as asked


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ((MAX_RETRIES + 1, 0.5), "max_retries"),
        ((-1, 0.5), "max_retries"),
        ((1.5, 0.5), "max_retries"),
        ((3, MAX_BACKOFF + 1), "retry_backoff"),
        ((3, -0.1), "retry_backoff"),
        ((3, "1"), "retry_backoff"),
    ],
)
def test_absurd_delivery_options_are_refused(options: tuple[object, object], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        Retry.for_delivery(*options)  # type: ignore[arg-type]
    assert info.value.option == option


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ((0.0, 60.0), "replay_backoff"),
        ((MAX_REPLAY_FIRST_BACKOFF + 1, 60.0), "replay_backoff"),
        ((1.0, MAX_REPLAY_BACKOFF + 1), "replay_max_backoff"),
        ((1.0, float("nan")), "replay_max_backoff"),
    ],
)
def test_absurd_replay_options_are_refused(options: tuple[float, float], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        Retry.for_replay(*options)
    assert info.value.option == option
