"""Untrusted JSON: the depth limit measured without recursion, lone surrogates replaced."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfreport._core.untrusted_json import (
    MAX_DEPTH,
    JSONDepthError,
    check_depth,
    loads,
    repair_surrogates,
)


def nested(depth: int, opening: str = "[", closing: str = "]") -> str:
    return opening * depth + closing * depth


def depth_of(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


@pytest.mark.parametrize("kind", [str, bytes])
def test_the_depth_limit(kind: type) -> None:
    def text(depth: int) -> object:
        data = (
            nested(depth - 1, '{"a":[', "]}") if depth % 2 else nested(depth // 2, '{"a":[', "]}")
        )
        return data.encode() if kind is bytes else data

    assert loads(nested(MAX_DEPTH)) is not None
    with pytest.raises(JSONDepthError, match=f"JSON nested deeper than {MAX_DEPTH} levels"):
        loads(nested(MAX_DEPTH + 1))
    with pytest.raises(JSONDepthError):  # was a RecursionError
        loads(nested(100_000).encode())
    check_depth(text(2 * MAX_DEPTH), 2 * MAX_DEPTH + 2)
    with pytest.raises(JSONDepthError):
        check_depth(text(2 * MAX_DEPTH), 2 * MAX_DEPTH - 2)


def test_brackets_inside_strings_do_not_count() -> None:
    inside = json.dumps({"a": "[" * 1000, "b": '\\"[[[[' * 100, "c": "\\" * 10})
    assert loads(inside)["a"] == "[" * 1000
    # Wide, not deep: many siblings, one level each.
    assert len(loads("[" + ",".join(["[]"] * 1000) + "]")) == 1000


def test_unbalanced_text_is_left_to_the_parser() -> None:
    with pytest.raises(json.JSONDecodeError):
        loads("[]}" * 200)


@given(
    st.recursive(st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c))
)
def test_check_depth_agrees_with_the_parsed_depth(value: object) -> None:
    text = json.dumps(value)
    depth = depth_of(value)
    check_depth(text, depth)
    if depth:
        with pytest.raises(JSONDepthError):
            check_depth(text, depth - 1)


def test_lone_surrogates_are_replaced() -> None:
    assert loads('"cut \\ud83d"') == "cut \ufffd"
    assert loads('"\\udc00x"') == "\ufffdx"
    assert loads('{"\\ud800": "\\ud83d\\ude00"}') == {"\ufffd": "\U0001f600"}  # a pair is kept
    assert loads('"\\\\ud800"') == "\\ud800"  # an escaped backslash, then text
    assert loads('"\\\\\\ud800"') == "\\\ufffd"
    assert loads(b'"\\uD800\\uDBFF\\uDFFF"') == "\ufffd\U0010ffff"
    assert repair_surrogates('"plain \\u00e9"') == '"plain \\u00e9"'
    assert loads('"\\ud800"', repair=False) == "\ud800"


@given(st.text())
def test_any_text_round_trips_with_surrogates_replaced(text: str) -> None:
    expected = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    assert loads(json.dumps(text)) == expected
    assert (
        loads(
            json.dumps(text, ensure_ascii=False)
            .encode("utf-8", "surrogatepass")
            .decode("utf-8", "surrogatepass")
        )
        == expected
    )


def test_a_bom_is_refused_as_json_refuses_it() -> None:
    with pytest.raises(json.JSONDecodeError, match="Unexpected UTF-8 BOM"):
        loads("\ufeff{}")


def test_short_and_long_texts_are_checked_alike() -> None:
    # Short texts skip the one-pass scan (they cannot nest too deep): surrogates still go.
    assert loads('"\\ud800"', max_depth=2) == "\ufffd"
    assert loads('["\\ud800", ' + "0, " * 10 + "0]", max_depth=2)[0] == "\ufffd"
    with pytest.raises(JSONDepthError):
        loads(nested(3) + " " * 10, max_depth=2)


def test_decoders_are_made_once_per_parse_constant_and_stay_few() -> None:
    from selfreport._core import untrusted_json as _json

    def constant(name: str) -> float:
        return 0.0

    assert loads("NaN", parse_constant=constant) == 0.0
    assert _json._DECODERS[constant] is _json._decoder(constant)
    for _ in range(40):  # a new function each time: the cache is cleared, never grows past 16
        loads("[NaN]", parse_constant=lambda name: 1.0)
    assert len(_json._DECODERS) <= 16
