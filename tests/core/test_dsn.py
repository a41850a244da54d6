"""DSN parsing: examples, sentry-sdk's parser as oracle, and hypothesis round trips."""

from __future__ import annotations

import http.client
import string
from typing import Optional
from urllib.parse import quote

import pytest
import sentry_sdk.utils
from hypothesis import example, given
from hypothesis import strategies as st

from selfreport import ConfigError
from selfreport._core.dsn import Dsn, parse_dsn

# --- examples ------------------------------------------------------------------------------


def test_minimal_dsn() -> None:
    dsn = parse_dsn("https://abc123@o1.ingest.example.com/42")
    assert dsn == Dsn(scheme="https", public_key="abc123", host="o1.ingest.example.com",
                      project_id="42")  # fmt: skip
    assert dsn.envelope_url == "https://o1.ingest.example.com/api/42/envelope/"
    assert dsn.envelope_path == "/api/42/envelope/"
    assert str(dsn) == "https://abc123@o1.ingest.example.com/42"


def test_port_path_and_secret_key() -> None:
    dsn = parse_dsn("http://pub:sec@localhost:9000/sentry/relay/7")
    assert (dsn.public_key, dsn.secret_key) == ("pub", "sec")
    assert (dsn.host, dsn.port, dsn.path, dsn.project_id) == (
        "localhost",
        9000,
        "/sentry/relay",
        "7",
    )
    assert dsn.envelope_url == "http://localhost:9000/sentry/relay/api/7/envelope/"
    assert str(dsn) == "http://pub:sec@localhost:9000/sentry/relay/7"


def test_surrounding_whitespace_and_trailing_slash_are_tolerated() -> None:
    assert parse_dsn("  http://k@h/1/ \n") == parse_dsn("http://k@h/1")


def test_host_is_case_insensitive() -> None:
    assert parse_dsn("http://k@Example.COM/1").host == "example.com"


@pytest.mark.parametrize(
    ("text", "host", "netloc"),
    [
        ("http://k@[::1]:9000/1", "::1", "[::1]:9000"),
        ("http://k@[2001:db8::7]/1", "2001:db8::7", "[2001:db8::7]"),
        ("http://k@127.0.0.1:80/1", "127.0.0.1", "127.0.0.1:80"),
    ],
)
def test_ip_hosts(text: str, host: str, netloc: str) -> None:
    dsn = parse_dsn(text)
    assert dsn.host == host
    assert dsn.netloc == netloc
    assert parse_dsn(str(dsn)) == dsn
    assert dsn.envelope_url.startswith(f"http://{netloc}/api/1/")


def test_percent_encoded_keys_are_decoded_and_re_encoded() -> None:
    dsn = parse_dsn("http://a%40b:s%3Ae@h/1")
    assert (dsn.public_key, dsn.secret_key) == ("a@b", "s:e")
    assert str(dsn) == "http://a%40b:s%3Ae@h/1"
    assert "sentry_key=a@b" in dsn.auth_header("c/1")


def test_non_ascii_path_is_percent_encoded() -> None:
    dsn = parse_dsn("http://k@h/über/1")
    assert dsn.path == "/%C3%BCber"
    assert parse_dsn(str(dsn)) == dsn


def test_empty_secret_is_no_secret() -> None:
    assert parse_dsn("http://k:@h/1").secret_key is None


def test_auth_header() -> None:
    dsn = parse_dsn("http://pub:sec@h/1")
    assert dsn.auth_header("selfreport/1.0", 1700000000.5) == (
        "Sentry sentry_version=7, sentry_client=selfreport/1.0, sentry_key=pub, "
        "sentry_timestamp=1700000000.500, sentry_secret=sec"
    )
    assert "sentry_timestamp" not in parse_dsn("http://pub@h/1").auth_header("c")
    assert "sentry_secret" not in parse_dsn("http://pub@h/1").auth_header("c")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ftp://k@h/1", "scheme"),
        ("h/1", "scheme"),
        ("http://h/1", "public key"),
        ("http://@h/1", "public key"),
        ("http://k@/1", "host"),
        ("http://k@:80/1", "host"),
        ("http://k@h", "project id"),
        ("http://k@h/", "project id"),
        ("http://k@h/a.b", "project id"),
        ("http://k@h/1?x=1", "query"),
        ("http://k@h/1#frag", "fragment"),
        ("http://k@h:0/1", "port 0"),
        ("http://k@h:99999/1", "valid URL"),
        ("http://k@h:abc/1", "valid URL"),
        ("http://k@[::1/1", "valid URL"),
        ("http://k @h/1", "whitespace"),
        ("http://k@h/1\x00", "control"),
        ("http://k%0d%0aX-Evil:%201@h/1", "public key"),
        ("http://k:s%20s@h/1", "secret key"),
        ("http://k%2C@h/1", "public key"),
        ("http://k@h<x>/1", "host"),
        ("http://k@a..b/1", "host"),
    ],
)
def test_malformed(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_dsn(text)
    assert info.value.option == "dsn"
    assert str(info.value).startswith("dsn: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", [None, 42, b"http://k@h/1"])
def test_not_a_string(value: object) -> None:
    with pytest.raises(ConfigError, match="dsn: expected a string"):
        parse_dsn(value)  # type: ignore[arg-type]


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="dsn"):
        parse_dsn("nonsense")


# --- hypothesis --------------------------------------------------------------------------

_UNRESERVED = string.ascii_letters + string.digits + "-._~"
_KEY_CHARS = "".join(chr(c) for c in range(33, 127) if chr(c) not in '",')

keys = st.text(_KEY_CHARS, min_size=1, max_size=40)
label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
host_names = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hosts = st.one_of(host_names, ipv4, ipv6)
ports = st.one_of(st.none(), st.integers(1, 65535))
paths = st.lists(st.text(_UNRESERVED, min_size=1, max_size=10), max_size=3).map(
    lambda segments: "".join("/" + s for s in segments)
)
project_ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")


@st.composite
def dsns(draw: st.DrawFn, project_id: st.SearchStrategy[str] = project_ids) -> Dsn:
    return Dsn(
        scheme=draw(st.sampled_from(["http", "https"])),
        public_key=draw(keys),
        secret_key=draw(st.one_of(st.none(), keys)),
        host=draw(hosts),
        port=draw(ports),
        path=draw(paths),
        project_id=draw(project_id),
    )


def _assert_usable_by_http_client(dsn: Dsn) -> None:
    """http.client accepts the request line and headers without connecting anywhere."""
    conn = http.client.HTTPConnection(dsn.host, dsn.port or 80)
    try:
        conn.putrequest("POST", dsn.envelope_path)
        conn.putheader("X-Sentry-Auth", dsn.auth_header("selfreport/test", 1.0))
    finally:
        conn.close()


@given(dsns())
def test_valid_dsns_round_trip_through_str(dsn: Dsn) -> None:
    parsed = parse_dsn(str(dsn))
    assert parsed == dsn
    assert str(parsed) == str(dsn)
    _assert_usable_by_http_client(parsed)


@given(dsns(project_id=st.integers(1, 10**9).map(str)))
def test_envelope_url_agrees_with_sentry_sdk(dsn: Dsn) -> None:
    text = str(dsn)
    ours = parse_dsn(text)
    theirs = sentry_sdk.utils.Dsn(text)
    assert theirs.public_key == quote(ours.public_key, safe="")
    assert theirs.project_id == ours.project_id
    assert theirs.host == ours.host
    assert theirs.port == (ours.port or {"http": 80, "https": 443}[ours.scheme])
    if ":" not in ours.host:  # sentry-sdk writes IPv6 hosts without brackets
        url = ours.envelope_url
        default = {"http": 80, "https": 443}[ours.scheme]
        if ours.port == default:  # sentry-sdk leaves default ports out
            url = url.replace(f":{default}/", "/", 1)
        assert url == theirs.to_auth().get_api_url()


def _is_config_error_or_dsn(text: str) -> Optional[Dsn]:
    try:
        dsn = parse_dsn(text)
    except ConfigError as caught:
        error: ConfigError = caught
    else:
        # Whatever is accepted is usable: it round-trips and http.client takes it.
        assert parse_dsn(str(dsn)) == dsn
        _assert_usable_by_http_client(dsn)
        return dsn
    assert error.option == "dsn"
    assert str(error).startswith("dsn: ")
    return None


@given(st.text(max_size=80))
@example("http://k@[fe80::1%25eth0]/1")
@example("http://k@[\x7f::]/1")  # accepted by urlsplit before Python 3.11
@example("http://k@[::1%\x7f]/1")
@example("http://k@h/%zz/1")
@example("http://k@ä.example/1")
@example("http://k@h:/1")
@example("https://k@h/1/\u2028")
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    _is_config_error_or_dsn(text)


@given(
    dsns(),
    st.integers(min_value=0, max_value=200),
    st.text(string.printable + "\x00\x7f\u00e4\u2028[]@:/?#%", min_size=1, max_size=3),
)
def test_mutated_dsns_raise_only_config_error(dsn: Dsn, position: int, inserted: str) -> None:
    text = str(dsn)
    position %= len(text) + 1
    _is_config_error_or_dsn(text[:position] + inserted + text[position:])
