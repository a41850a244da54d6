"""The alerting configuration: TOML read, every mistake one line naming file, line and key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfreport.collector.alerting.config import (
    DEFAULT_PAGERDUTY_URL,
    AlertRule,
    CollectorConfig,
    ConfigError,
    UptimeConfig,
    load_config,
    parse_config,
    parse_duration,
)
from selfreport.exceptions import ConfigError as BaseConfigError

ENV = {"HOOK_SECRET": "s3cret", "PD_KEY": "R0UTING", "SMTP_PW": "pw"}

FULL = """\
# every kind once
[[notifier]]
name = "ops"
kind = "webhook"
url = "http://127.0.0.1:9000/hook"
secret_env = "HOOK_SECRET"

[[notifier]]
name = "chat"
kind = "slack"
url = "https://hooks.slack.com/services/T/B/X"
timeout = "5s"

[[notifier]]
name = "pager"
kind = "pagerduty"
routing_key_env = "PD_KEY"
severity = "critical"

[[notifier]]
name = "mail"
kind = "email"
host = "smtp.example.com"
starttls = true
username = "alerts"
password_env = "SMTP_PW"
sender = "selfreport@example.com"
recipients = ["oncall@example.com"]

[[alert]]
name = "error spike"
when = "rate"
project = "default"
threshold = 100
window = "5m"
ratio = 5
notify = ["ops", "chat"]

[[alert]]
name = "new"
when = "new_issue"
level = "error"
notify = ["pager"]

[[alert]]
name = "reporting"
when = "self"
metric = "send_failed"
above = 0
notify = []

[[alert]]
name = "site down"
when = "uptime"
consecutive = 3
url = "http://127.0.0.1:8001/health"
notify = ["mail"]

[[uptime]]
url = "http://127.0.0.1:8001/health"
interval = "30s"
expect_status = [200, 204]
"""


def error_of(text: str, environ: dict[str, str] = ENV) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "alerts.toml", environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_full_configuration_is_read() -> None:
    config = parse_config(FULL, "alerts.toml", ENV)
    assert isinstance(config, CollectorConfig)
    assert [n.name for n in config.notifiers] == ["ops", "chat", "pager", "mail"]
    ops, chat, pager, mail = config.notifiers
    assert ops.secret == "s3cret"
    assert ops.secret_env == "HOOK_SECRET"
    assert "s3cret" not in repr(ops)
    assert chat.timeout == 5.0
    assert pager.url == DEFAULT_PAGERDUTY_URL
    assert pager.routing_key == "R0UTING"
    assert pager.severity == "critical"
    assert mail.smtp is not None
    assert mail.smtp.port == 587
    assert mail.smtp.password == "pw"
    assert "pw" not in repr(mail.smtp).replace("password_env", "")
    assert config.alerts[0] == AlertRule(
        "error spike",
        "rate",
        project="default",
        threshold=100,
        window=300.0,
        ratio=5.0,
        notify=("ops", "chat"),
    )
    assert config.alerts[1].level == "error"
    assert config.alerts[2].metric == "send_failed"
    assert config.alerts[2].above == 0.0
    assert config.alerts[2].notify == ()
    assert config.alerts[3].consecutive == 3
    assert config.uptime == (
        UptimeConfig(
            "http://127.0.0.1:8001/health",
            interval=30.0,
            timeout=10.0,
            expect_status=(200, 204),
            name="http://127.0.0.1:8001/health",
        ),
    )
    assert config.notifier("pager") is pager
    assert config.notifier("nobody") is None


def test_load_config_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text(FULL, encoding="utf-8")
    assert load_config(path, ENV).path == str(path)
    path.write_text(FULL.replace('window = "5m"', 'window = "5 minutes"'), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ENV)
    assert str(caught.value).startswith(f"{path}:35: alert 'error spike': window: must be")
    assert isinstance(caught.value, BaseConfigError)


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'x = "\xff"')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_the_environment_is_the_default_for_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PD_KEY", "from-env")
    text = '[[notifier]]\nname = "p"\nkind = "pagerduty"\nrouting_key_env = "PD_KEY"\n'
    assert parse_config(text).notifiers[0].routing_key == "from-env"


def test_an_empty_file_is_an_empty_configuration() -> None:
    assert parse_config("", "a.toml", {}) == CollectorConfig("a.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('x = "', "alerts.toml:1: not valid TOML"),
        ("[[notifier]]\nname = 1\n", "alerts.toml:2: notifier #1: name: must be a string"),
        ("[[notifier]]\nkind = 'webhook'\n", "alerts.toml:1: notifier #1: name: is required"),
        (
            "[[notifier]]\nname = 'a'\nkind = 'fax'\n",
            "alerts.toml:3: notifier 'a': kind: must be one of webhook, slack, pagerduty, email",
        ),
        (
            "[[notifier]]\nname = 'a'\nkind = 'webhook'\nurl = 'ftp://x'\n",
            "alerts.toml:4: notifier 'a': url: must be an http:// or https:// URL",
        ),
        (
            "[[notifier]]\nname = 'a'\nkind = 'webhook'\nurl = 'http://x'\nsecret = 'x'\n",
            "alerts.toml:5: notifier 'a': secret: secrets never go in the file: set secret_env",
        ),
        (
            "[[notifier]]\nname = 'a'\nkind = 'webhook'\nurl = 'http://x'\nsecret_env = 'NOPE'\n",
            "alerts.toml:5: notifier 'a': secret_env: environment variable NOPE is not set",
        ),
        (
            "[[notifier]]\nname = 'a'\nkind = 'slack'\nurl = 'http://x'\nhost = 'h'\n",
            "alerts.toml:5: notifier 'a': host: unknown key for kind = 'slack'",
        ),
        (
            "[[notifier]]\nname = 'a'\nkind = 'pagerduty'\n",
            "alerts.toml:1: notifier 'a': routing_key_env: is required",
        ),
        (
            "[[notifier]]\nname = 'a'\nkind = 'webhook'\nurl = 'http://x'\n"
            "[[notifier]]\n name = 'a'\nkind = 'webhook'\nurl = 'http://y'\n",
            "alerts.toml:6: notifier #2: name: 'a' is used twice",
        ),
        (
            "[[notifier]]\nname = 'a'\nkind = 'webhook'\nurl = 'http://x'\ntimeout = '5m'\n",
            "alerts.toml:5: notifier 'a': timeout: must be at most 120 seconds",
        ),
        ("[[alerts]]\nname = 'a'\n", "alerts.toml:1: alerts: unknown section"),
        ("alert = 3\n", "alerts.toml:1: alert: must be written [[alert]]"),
        ("[alert]\nname = 'a'\n", "alerts.toml:1: alert: must be written [[alert]]"),
        (
            "[[alert]]\nname = 'a'\nwhen = 'rate'\nthreshold = 5\nwindow = '1m'\n",
            "alerts.toml:1: alert 'a': notify: is required",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'rate'\nwindow = '1m'\nnotify = ['x']\n",
            "alerts.toml:5: alert 'a': notify: no notifier is called 'x' (known: none)",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'rate'\nwindow = '1m'\nnotify = []\n",
            "alerts.toml:1: alert 'a': threshold: is required for when = 'rate'",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'rate'\nthreshold = 0\nwindow = '1m'\nnotify = []\n",
            "alerts.toml:4: alert 'a': threshold: must be between 1 and",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'rate'\nthreshold = 2\nnotify = []\n",
            "alerts.toml:1: alert 'a': window: is required",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'rate'\nthreshold = 2\nwindow = true\nnotify = []\n",
            "alerts.toml:5: alert 'a': window: must be a duration",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'new_issue'\nthreshold = 2\nnotify = []\n",
            "alerts.toml:4: alert 'a': threshold: unknown key for when = 'new_issue'",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'new_issue'\nlevel = 'loud'\nnotify = []\n",
            "alerts.toml:4: alert 'a': level: must be one of debug, info",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'self'\nnotify = []\n",
            "alerts.toml:1: alert 'a': metric: is required",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'self'\nmetric = 'send_failed'\nnotify = []\n",
            "alerts.toml:1: alert 'a': above: is required for when = 'self'",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'self'\nmetric = 'x'\nnotify = []\n",
            "alerts.toml:4: alert 'a': metric: must be one of dropped_reentrant",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'health'\nnotify = [1]\n",
            "alerts.toml:4: alert 'a': notify: must be a list of non-empty strings",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'uptime'\nurl = 'x'\nnotify = []\n",
            "alerts.toml:4: alert 'a': url: must be an http:// or https:// URL",
        ),
        (
            "[[alert]]\nname = 'a'\nwhen = 'health'\nnotify = []\n"
            "[[alert]]\nname = 'a'\nwhen = 'health'\nnotify = []\n",
            "alerts.toml:6: alert #2: name: 'a' is used twice",
        ),
        ("[[uptime]]\ninterval = '1m'\n", "alerts.toml:1: uptime #1: url: is required"),
        (
            "[[uptime]]\nurl = 'http://x'\ninterval = '100ms'\n",
            "alerts.toml:3: uptime 'http://x': interval: must be at least 1 second",
        ),
        (
            "[[uptime]]\nurl = 'http://x'\nexpect_status = [200, 'ok']\n",
            "alerts.toml:3: uptime 'http://x': expect_status: must be an HTTP status",
        ),
        (
            "[[uptime]]\nurl = 'http://x'\n[[uptime]]\nurl = 'http://x'\n",
            "alerts.toml:4: uptime 'http://x': url: 'http://x' is checked twice",
        ),
        (
            "[[uptime]]\nurl = 'http://x'\nname = 'n'\n[[uptime]]\nurl = 'http://y'\nname = 'n'\n",
            "alerts.toml:6: uptime 'http://y': name: 'n' is used twice",
        ),
        (
            "[[uptime]]\nurl = 'http://x'\nretries = 3\n",
            "alerts.toml:3: uptime 'http://x': retries: unknown key for [[uptime]]",
        ),
    ],
)
def test_mistakes_are_one_line_naming_line_and_key(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected)


EMAIL = """\
[[notifier]]
name = "m"
kind = "email"
host = "127.0.0.1"
sender = "a@example.com"
recipients = ["b@example.com"]
"""


def test_email_defaults_and_checks() -> None:
    smtp = parse_config(EMAIL, "a", {}).notifiers[0].smtp
    assert smtp is not None
    assert (smtp.port, smtp.starttls, smtp.ssl, smtp.username) == (25, False, False, None)
    smtp = parse_config(EMAIL + "ssl = true\n", "a", {}).notifiers[0].smtp
    assert smtp is not None
    assert smtp.port == 465
    assert "exclude each other" in error_of(EMAIL + "ssl = true\nstarttls = true\n")
    assert "username and password_env go together" in error_of(EMAIL + "username = 'u'\n")
    assert "recipients: is required" in error_of(EMAIL.replace('["b@example.com"]', "[]"))
    assert "sender: 'nobody'?" in error_of(EMAIL.replace('"a@example.com"', '"nobody"'))
    assert "port: must be between 1 and 65535" in error_of(EMAIL + "port = 0\n")
    assert "password: secrets never go in the file" in error_of(EMAIL + "password = 'x'\n")


def test_a_key_is_found_in_its_own_block_even_when_other_blocks_have_it() -> None:
    text = (
        "[[notifier]]\nname = 'a'\nkind = 'webhook'\nurl = 'http://x'\n\n"
        "[[notifier]]\n'name' = 'b'\nkind = 'webhook'\n  url = 'nope'\n"
    )
    assert error_of(text).startswith("alerts.toml:9: notifier 'b': url:")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        (" 10 ", 10.0),
        (7, 7.0),
        (0.5, 0.5),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5", "-5s", "0s", "5 minutes", "1y", "367d", True, None])
def test_bad_durations(value: object) -> None:
    if value == "5":
        assert parse_duration(value) == 5.0
        return
    with pytest.raises(ValueError, match="must be"):
        parse_duration(value)


@given(st.one_of(st.text(max_size=20), st.floats(), st.integers(), st.booleans(), st.none()))
def test_any_duration_input_is_a_bounded_number_or_a_value_error(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert math.isfinite(seconds)
    assert 0 < seconds <= 366 * 86400


@given(
    st.sampled_from(["window", "threshold", "notify", "per", "name", "when", "bogus"]),
    st.one_of(st.text(max_size=10), st.integers(), st.floats(), st.booleans(), st.lists(st.text())),
)
def test_any_value_for_any_key_is_accepted_or_one_config_error(key: str, value: object) -> None:
    import json

    fields = {"name": "r", "when": "rate", "threshold": 5, "window": "1m", "notify": []}
    fields[key] = value
    lines = [f"{k} = {json.dumps(v)}" for k, v in fields.items() if _toml_safe(v)]
    text = "[[alert]]\n" + "\n".join(lines) + "\n"
    message = ""
    try:
        parse_config(text, "h.toml", {})
    except ConfigError as exc:
        message = str(exc)
    assert message == "" or message.startswith("h.toml:")
    assert "\n" not in message


def _toml_safe(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_toml_safe(v) for v in value)
    if isinstance(value, str):
        return value.isprintable()
    return True
