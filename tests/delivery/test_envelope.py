"""Envelopes: what we write, parsed back by us and by sentry-sdk; malformed bodies as errors."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sentry_sdk.envelope import Envelope as SentryEnvelope
from sentry_sdk.envelope import Item as SentryItem
from sentry_sdk.envelope import PayloadRef

from selfreport import __version__
from selfreport._core.dsn import parse_dsn
from selfreport._delivery.envelope import (
    Envelope,
    EnvelopeError,
    Item,
    parse_envelope,
    serialize_envelope,
)

SENT_AT = "2024-01-01T00:00:00.000000Z"


# --- serialization -------------------------------------------------------------------------


def test_serialized_envelope_is_what_sentry_sdk_reads() -> None:
    dsn = parse_dsn("http://pub@h/3")
    event = {"event_id": "a" * 32, "message": "ünïcode ✓", "nested": {"list": [1, 2.5, None]}}
    body = serialize_envelope(event, dsn, SENT_AT)
    theirs = SentryEnvelope.deserialize(body)
    assert theirs.headers == {
        "event_id": "a" * 32,
        "sent_at": SENT_AT,
        "sdk": {"name": "selfreport.python", "version": __version__},
        "dsn": "http://pub@h/3",
    }
    assert theirs.get_event() == event
    assert theirs.items[0].headers["length"] == len(body.split(b"\n")[2])


def test_serialization_survives_what_json_cannot_carry() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "<thing>"

    event = {"event_id": "x", "nan": float("nan"), "inf": [float("-inf")], 3: Thing(), "t": (1,)}
    body = serialize_envelope(event, None, SENT_AT)
    (parsed,) = parse_envelope(body).events()
    assert parsed == {"event_id": "x", "nan": "nan", "inf": ["-inf"], "3": "<thing>", "t": [1]}
    assert "dsn" not in parse_envelope(body).headers


def test_serialization_of_lone_surrogates_does_not_raise() -> None:
    body = serialize_envelope({"event_id": "x", "message": "bad \udc80 text"}, None, SENT_AT)
    assert parse_envelope(body).events()[0]["message"].startswith("bad ")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(
    st.dictionaries(st.text(), _json_values, max_size=6),
    st.sampled_from([None, "http://pub@h/3", "https://k:s3kr1t@host:9000/7"]),
)
def test_what_we_write_reads_back(extra: dict[str, object], dsn: str | None) -> None:
    event: dict[str, object] = {**extra, "event_id": "e" * 32}
    body = serialize_envelope(event, parse_dsn(dsn) if dsn else None, SENT_AT)
    envelope = parse_envelope(body)
    assert envelope.headers["event_id"] == "e" * 32
    assert envelope.headers["sent_at"] == SENT_AT
    assert envelope.headers.get("dsn") == (str(parse_dsn(dsn).public()) if dsn else None)
    assert b"s3kr1t" not in body.split(b"\n")[0]  # never the DSN's secret key
    (item,) = envelope.items
    assert item.headers == {
        "type": "event",
        "length": len(item.payload),
        "content_type": "application/json",
    }
    (parsed,) = envelope.events()
    # What JSON carries survives unchanged; NaN and infinities come back as their repr.
    assert parsed == json.loads(json.dumps(_jsonable_floats(event)))


def _jsonable_floats(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _jsonable_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable_floats(v) for v in value]
    return value


def test_parses_what_we_serialize() -> None:
    event = {"event_id": "a" * 32, "message": "line one\nline two", "extra": {"n": 1}}
    body = serialize_envelope(event, parse_dsn("http://k@h/1"), "2024-01-01T00:00:00Z")
    envelope = parse_envelope(body)
    assert envelope.headers["event_id"] == "a" * 32
    assert envelope.headers["dsn"] == "http://k@h/1"
    assert [item.type for item in envelope.items] == ["event"]
    assert envelope.events() == [event]


def test_parses_what_sentry_sdk_serializes() -> None:
    theirs = SentryEnvelope(headers={"event_id": "e1"})
    theirs.add_event({"event_id": "e1", "level": "error"})
    theirs.add_item(SentryItem(payload=PayloadRef(bytes=b"a\nb\n"), type="attachment"))
    theirs.add_item(SentryItem(payload=PayloadRef(json={"sid": "s"}), type="session"))
    envelope = parse_envelope(theirs.serialize())
    assert envelope.headers == {"event_id": "e1"}
    assert [item.type for item in envelope.items] == ["event", "attachment", "session"]
    assert envelope.items[1].payload == b"a\nb\n"
    assert envelope.items[2].json() == {"sid": "s"}
    assert envelope.events() == [{"event_id": "e1", "level": "error"}]


def test_items_without_length_end_at_the_newline() -> None:
    body = b'{}\n{"type":"event"}\n{"a":1}\n\n{"type":"attachment"}\nraw'
    envelope = parse_envelope(body)
    assert [(item.type, item.payload) for item in envelope.items] == [
        ("event", b'{"a":1}'),
        ("attachment", b"raw"),
    ]


def test_length_delimited_payload_without_trailing_newline() -> None:
    envelope = parse_envelope(b'{}\n{"type":"event","length":7}\n{"a":1}')
    assert envelope.events() == [{"a": 1}]


def test_envelope_of_only_a_header() -> None:
    assert parse_envelope(b'{"event_id":"x"}') == Envelope({"event_id": "x"}, [])
    assert parse_envelope(b'{"event_id":"x"}\n').items == []


def test_item_without_type() -> None:
    item = Item({}, b"{}")
    assert item.type == ""
    assert Envelope({}, [item]).events() == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"  \n ", "empty"),
        (b"not json\n", "envelope header is not valid JSON"),
        (b"[1]\n", "envelope header must be a JSON object, got list"),
        (b"{}\n{bad\n{}", "item 1 header is not valid JSON"),
        (b'{}\n"str"\n{}', "item 1 header must be a JSON object"),
        (b'{}\n{"length":-1}\n', "length must be a non-negative integer"),
        (b'{}\n{"length":true}\n', "length must be a non-negative integer"),
        (b'{}\n{"length":"3"}\n', "length must be a non-negative integer"),
        (b'{}\n{"length":99}\n{}', "runs past the end"),
        (b"{}\n\xff\xfe\n", "item 1 header is not valid JSON"),
    ],
)
def test_malformed_envelopes(body: bytes, message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        parse_envelope(body)


def test_item_count_is_bounded() -> None:
    body = b"{}\n" + b'{"type":"x","length":0}\n\n' * 5
    assert len(parse_envelope(body, max_items=5).items) == 5
    with pytest.raises(EnvelopeError, match="more than 4 items"):
        parse_envelope(body, max_items=4)


def test_envelope_error_is_a_value_error() -> None:
    assert issubclass(EnvelopeError, ValueError)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_envelope_error(body: bytes) -> None:
    try:
        envelope = parse_envelope(body)
    except EnvelopeError:
        return
    assert isinstance(envelope.headers, dict)
    for item in envelope.items:
        assert isinstance(item.headers, dict)
        assert isinstance(item.payload, bytes)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["event", "attachment", "session"]),
            st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=10), max_size=3),
        ),
        max_size=5,
    )
)
def test_sentry_sdk_envelopes_round_trip(items: list[tuple[str, dict[str, object]]]) -> None:
    theirs = SentryEnvelope(headers={"event_id": "x"})
    for item_type, payload in items:
        theirs.add_item(SentryItem(payload=PayloadRef(json=payload), type=item_type))
    envelope = parse_envelope(theirs.serialize())
    assert [(item.type, item.json()) for item in envelope.items] == [
        (item_type, json.loads(json.dumps(payload))) for item_type, payload in items
    ]
