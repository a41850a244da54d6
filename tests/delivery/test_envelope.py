"""Envelope parsing: our serializer and sentry-sdk's as producers, malformed bodies as errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sentry_sdk.envelope import Envelope as SentryEnvelope
from sentry_sdk.envelope import Item as SentryItem
from sentry_sdk.envelope import PayloadRef

from selfreport._core.dsn import parse_dsn
from selfreport._delivery.envelope import Envelope, EnvelopeError, Item, parse_envelope
from selfreport._delivery.transport import serialize_envelope


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
