"""Normalizing events and grouping them: titles, culprits, levels, timestamps, fingerprints."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfreport.collector import events
from selfreport.collector.events import (
    MAX_BREADTH,
    EventError,
    event_fingerprint,
    json_type,
    normalize_event_id,
    parse_event_json,
    prepare_event,
)

Event = dict[str, Any]
dumps = events._dumps


def frame(module: str, function: str, lineno: int, in_app: bool = True) -> dict[str, Any]:
    return {"module": module, "function": function, "lineno": lineno, "in_app": in_app}


def exc_event(kind: str, value: str, frames: list[dict[str, Any]]) -> Event:
    return {
        "exception": {"values": [{"type": kind, "value": value, "stacktrace": {"frames": frames}}]}
    }


def test_exception_grouping_ignores_values_and_line_numbers() -> None:
    a = exc_event("KeyError", "'a'", [frame("app.x", "f", 10), frame("lib", "g", 5, False)])
    b = exc_event("KeyError", "'b'", [frame("app.x", "f", 99), frame("lib", "h", 7, False)])
    c = exc_event("KeyError", "'a'", [frame("app.y", "f", 10)])
    d = exc_event("TypeError", "'a'", [frame("app.x", "f", 10)])
    assert event_fingerprint(a) == event_fingerprint(b)  # same type and in-app frames
    assert event_fingerprint(a) != event_fingerprint(c)
    assert event_fingerprint(a) != event_fingerprint(d)


def test_without_frames_the_value_tells_exceptions_apart() -> None:
    assert event_fingerprint(exc_event("E", "one", [])) != event_fingerprint(
        exc_event("E", "two", [])
    )


def test_without_in_app_frames_all_frames_count() -> None:
    a = exc_event("E", "v", [frame("lib", "f", 1, False)])
    b = exc_event("E", "v", [frame("lib", "g", 1, False)])
    assert event_fingerprint(a) != event_fingerprint(b)


def test_messages_group_by_template_not_by_formatted_text() -> None:
    a = {"logentry": {"message": "user %s failed", "formatted": "user 1 failed"}}
    b = {"logentry": {"message": "user %s failed", "formatted": "user 2 failed"}}
    c = {"message": "user %s failed"}
    assert event_fingerprint(a) == event_fingerprint(b) == event_fingerprint(c)
    assert event_fingerprint(a) != event_fingerprint({"message": "something else"})


def test_custom_fingerprints_and_the_default_placeholder() -> None:
    base = exc_event("E", "v", [frame("app", "f", 1)])
    custom = {**base, "fingerprint": ["payments", "timeout"]}
    assert event_fingerprint(custom) == event_fingerprint({"fingerprint": ["payments", "timeout"]})
    extended = {**base, "fingerprint": ["{{ default }}", "eu"]}
    other_base = exc_event("F", "v", [frame("app", "f", 1)])
    assert event_fingerprint(extended) != event_fingerprint(
        {**other_base, "fingerprint": ["{{ default }}", "eu"]}
    )
    assert event_fingerprint(extended) == event_fingerprint(
        {**base, "fingerprint": ["{{default}}", "eu"]}  # Sentry's other spelling
    )
    assert event_fingerprint({**base, "fingerprint": ["{{ default }}"]}) == event_fingerprint(base)
    bad = {**base, "fingerprint": [1, 2]}  # not strings: ignored
    assert event_fingerprint(bad) == event_fingerprint(base)


def test_title_and_culprit() -> None:
    event = exc_event(
        "ValueError",
        "bad\n  input",
        [frame("app.a", "outer", 1), frame("lib.b", "inner", 2, False)],
    )
    prepared = prepare_event(event)
    assert prepared.title == "ValueError: bad input"  # whitespace folded for one line
    assert prepared.culprit == "app.a in outer"  # the innermost in-app frame
    assert prepare_event(exc_event("E", "", [])).title == "E"
    message = prepare_event(
        {"logentry": {"message": "first line\nsecond", "formatted": ""}, "logger": "app.db"}
    )
    assert message.title == "first line"
    assert message.culprit == "app.db"
    assert prepare_event({"transaction": "/orders"}).culprit == "/orders"
    assert prepare_event({}).title == "<no message>"
    long = prepare_event({"message": "x" * 500})
    assert len(long.title) == 200
    assert long.title.endswith("\u2026")


def _value(kind: str, value: str, function: str, **mechanism: Any) -> dict[str, Any]:
    frames = [frame("app.jobs", function, 1)]
    return {"type": kind, "value": value, "stacktrace": {"frames": frames}, "mechanism": mechanism}


def test_an_exception_group_is_named_after_its_first_leaf() -> None:
    # What sentry-sdk (and selfreport) send for ExceptionGroup("outer", [KeyError, ValueError]),
    # the outer group last; the group's own text names no error.
    group = {
        "exception": {
            "values": [
                _value("ValueError", "v", "second", exception_id=2, parent_id=0,
                       source="exceptions[1]"),
                _value("KeyError", "'k'", "first", exception_id=1, parent_id=0,
                       source="exceptions[0]"),
                _value("ExceptionGroup", "outer", "gather", exception_id=0,
                       is_exception_group=True),
            ]
        }
    }  # fmt: skip
    prepared = prepare_event(group)
    assert prepared.title == "KeyError: 'k'"
    assert prepared.culprit == "app.jobs in first"
    # A group of groups only, or ids a stranger left out: the group itself names the issue.
    for value in group["exception"]["values"][:2]:
        value["mechanism"] = {"is_exception_group": True}
    assert prepare_event(group).title == "ExceptionGroup: outer"


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("fatal", "fatal"),
        ("CRITICAL", "fatal"),
        ("warn", "warning"),
        ("info", "info"),
        ("nonsense", "error"),
        (5, "error"),
        (None, "error"),
    ],
)
def test_levels(level: object, expected: str) -> None:
    assert prepare_event({"level": level}).level == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1700000000.5, 1700000000.5),
        ("2026-01-02T03:04:05Z", 1767323045.0),
        ("2026-01-02T03:04:05.250000+00:00", 1767323045.25),
        ("2026-01-02T03:04:05", 1767323045.0),  # naive: UTC
        ("1700000000", 1700000000.0),
        ("yesterday", 42.0),
        (-5, 42.0),
        (True, 42.0),
        ({"a": 1}, 42.0),
    ],
)
def test_timestamps(value: object, expected: float) -> None:
    assert prepare_event({"timestamp": value}, received=42.0).timestamp == expected


def test_event_ids() -> None:
    assert normalize_event_id("ABCDEF00" * 4) == "abcdef00" * 4
    assert (
        normalize_event_id("{12345678-1234-1234-1234-123456789abc}")
        == "12345678123412341234123456789abc"
    )
    for bad in ("", "xyz", "a" * 31, "a" * 33):
        with pytest.raises(EventError, match="32 hex digits"):
            normalize_event_id(bad)
    with pytest.raises(EventError, match="got int"):
        normalize_event_id(5)
    event: Event = {"event_id": "ABCDEF00" * 4}
    prepared = prepare_event(event, original=json.dumps(event))
    assert json.loads(prepared.payload)["event_id"] == "abcdef00" * 4  # re-serialized, not original
    assert len(prepare_event({}).event_id) == 32
    assert prepare_event({}, default_event_id="c" * 32).event_id == "c" * 32


def test_the_original_text_is_stored_when_nothing_changed() -> None:
    text = '{"event_id": "' + "a" * 32 + '",   "message": "kept as sent"}'
    assert prepare_event(json.loads(text), original=text).payload == text


def test_fields_are_cut_and_repeats_read() -> None:
    prepared = prepare_event(
        {
            "environment": "e" * 100,
            "release": ["not", "a", "string"],
            "extra": {"selfreport_repeats": 7},
        }
    )
    assert prepared.environment is not None
    assert len(prepared.environment) == 64
    assert prepared.release == '["not", "a", "string"]'
    assert prepared.repeats == 7
    assert prepare_event({"extra": {"selfreport_repeats": True}}).repeats == 0
    assert prepare_event({"environment": ""}).environment is None


def test_refusals_say_what_is_wrong() -> None:
    with pytest.raises(EventError, match="must be a JSON object, got an array"):
        prepare_event([1])
    with pytest.raises(EventError, match="number JSON cannot carry"):
        prepare_event({"extra": {"x": float("nan")}})
    with pytest.raises(EventError, match="NaN is not a JSON number"):
        parse_event_json('{"a": NaN}')
    assert [json_type(v) for v in ([], "", True, None, 1, 1.5, {})] == [
        "an array",
        "a string",
        "a boolean",
        "null",
        "a number",
        "a number",
        "dict",
    ]


json_values: Callable[..., Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
sentry_keys = st.sampled_from(
    [
        "event_id",
        "level",
        "timestamp",
        "exception",
        "logentry",
        "message",
        "fingerprint",
        "extra",
        "environment",
        "release",
        "logger",
        "culprit",
        "transaction",
        "tags",
    ]
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "event",
    [
        {"logentry": " "},
        {"message": "\n\t"},
        {"exception": {"values": [{"type": " ", "value": " "}]}},
    ],
)
def test_an_event_of_whitespace_still_has_a_title(event: Event) -> None:
    # Failed before: {"logentry": " "} was an issue titled "" (found by the property below).
    assert prepare_event(event, received=1.0).title.strip()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(sentry_keys | st.text(max_size=8), json_values, max_size=8))
def test_any_json_object_is_accepted_or_refused_clearly(event: Event) -> None:
    if "event_id" in event and not isinstance(event["event_id"], type(None)):
        try:
            normalize_event_id(event["event_id"])
        except EventError:  # the only field that refuses an event
            with pytest.raises(EventError, match="event_id"):
                prepare_event(event, received=1.0)
            return
    prepared = prepare_event(event, received=1.0)
    assert prepared.level in ("fatal", "error", "warning", "info", "debug")
    assert isinstance(prepared.title, str)
    assert prepared.title
    assert len(prepared.fingerprint) == 40
    assert json.loads(prepared.payload)["event_id"] == prepared.event_id


# --- trimming before storage, as Relay does ---------------------------------------------------


def stored(event: Event) -> Event:
    """What prepare_event stores of ``event``."""
    loaded: Event = json.loads(prepare_event(event).payload)
    return loaded


def test_a_small_event_is_stored_as_it_came() -> None:
    event = exc_event("ValueError", "x" * 9000, [frame("app", "f", 1)])
    event["event_id"] = "a" * 32
    text = json.dumps(event)
    assert prepare_event(json.loads(text), original=text).payload == text


def test_breadcrumbs_keep_the_newest_and_their_data_is_limited() -> None:
    crumbs = [{"message": f"crumb {n}", "data": {"n": n}} for n in range(300)]
    crumbs[-1]["data"] = {"deep": {"a": {"b": {"c": {"d": {"e": 1}}}}}, "big": ["y" * 500] * 20}
    kept = stored({"message": "m", "breadcrumbs": {"values": crumbs}})
    values = kept["breadcrumbs"]["values"]
    assert [c["message"] for c in values] == [f"crumb {n}" for n in range(200, 300)]
    assert len(json.dumps(values[-1]["data"])) < 3000
    assert values[-1]["data"]["deep"]["a"]["b"]["c"]["d"] == "{\u2026}"
    assert kept["extra"]["selfreport_trimmed"][0] == "breadcrumbs"


def test_strings_frames_and_frame_vars_are_limited() -> None:
    frames = [frame("app", f"f{n}", n) for n in range(1000)]
    frames[-1]["vars"] = {f"v{n}": "z" * 1000 for n in range(50)}
    event = exc_event("ValueError", "bad", frames)
    event["message"] = "m" * 100_000
    event["tags"] = {"t": "q" * 1000}
    event["extra"] = {"huge": list(range(100_000))}
    before = prepare_event(json.loads(json.dumps(event)))
    kept = json.loads(before.payload)
    assert before.fingerprint == event_fingerprint(event)  # grouped by the event as it came
    assert len(kept["message"]) == 8192
    assert kept["message"].endswith("\u2026")
    assert len(kept["tags"]["t"]) == 200
    stack = kept["exception"]["values"][0]["stacktrace"]["frames"]
    assert len(stack) == 250
    assert (stack[0]["function"], stack[-1]["function"]) == ("f0", "f999")
    assert len(json.dumps(stack[-1]["vars"])) < 2048 + 1100
    assert len(json.dumps(kept["extra"]["huge"])) < 16384 * 2
    assert set(kept["extra"]["selfreport_trimmed"][:-1]) == {
        "extra: 1000 items per list or object",
        "frames",
        "strings",
        "tags",
        "vars",
    }
    assert kept["extra"]["selfreport_trimmed"][-1].startswith("size ")


def test_an_event_still_too_large_sheds_whole_parts_then_keeps_the_essentials() -> None:
    contexts = {f"c{n}": {"k": "v" * 8000} for n in range(200)}  # 1.6 MB after trimming
    kept = stored({"message": "m", "level": "warning", "contexts": contexts, "user": {"id": 1}})
    assert "contexts" in kept["extra"]["selfreport_trimmed"]
    assert "contexts" not in kept
    assert kept["user"] == {"id": 1}
    unknown = {"message": "m", "stuff": ["w" * 8000] * 200}  # a field Relay does not know
    event = exc_event("KeyError", "k", [frame("app", "f", 1)])
    event.update(unknown)
    kept = stored(event)
    assert set(kept) == {"event_id", "message", "exception", "extra"}
    assert kept["exception"]["values"] == [{"type": "KeyError", "value": "k"}]
    assert "everything but the essentials" in kept["extra"]["selfreport_trimmed"]
    assert len(json.dumps(kept)) < 2**20


def test_a_huge_event_is_trimmed_in_breadth_and_serialized_whole_twice_at_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 11 MiB: trimming used to walk all 4 million items and serialize the whole event once
    # per interface it could shed (10 s on the event loop); now 1000 items are kept per list.
    bag = dict.fromkeys((f"k{n}" for n in range(5000)), 1)
    text = json.dumps({"message": "x", "foo": [1] * 4_000_000, "extra": {"d": bag}})
    serialized: list[int] = []

    def counting(event: Event) -> str:
        out = dumps(event)
        serialized.append(len(out))
        return out

    monkeypatch.setattr(events, "_dumps", counting)
    kept = json.loads(prepare_event(parse_event_json(text), original=text).payload)
    assert kept["foo"] == [1] * MAX_BREADTH
    assert len(kept["extra"]["d"]) == MAX_BREADTH
    assert kept["extra"]["selfreport_trimmed"] == [
        "extra: 1000 items per list or object",
        "strings: 1000 items per list or object",
        f"size {len(text)}",
    ]
    assert len(serialized) <= 2
    assert max(serialized) < 64 * 1024  # never the event as it came


def test_shedding_measures_the_event_once_then_subtracts_what_it_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    contexts = {f"c{n}": {"k": "v" * 8000} for n in range(200)}  # 1.6 MB after trimming
    event: Event = {"message": "m", "contexts": contexts}
    event.update({key: {"k": "v"} for key in ("spans", "extra", "modules", "sdk", "tags")})
    whole: list[int] = []

    def counting(value: Event) -> str:
        out = dumps(value)
        if "message" in value:
            whole.append(len(out))
        return out

    monkeypatch.setattr(events, "_dumps", counting)
    text = json.dumps(event)
    kept = json.loads(prepare_event(json.loads(text), original=text).payload)
    assert kept["extra"]["selfreport_trimmed"][:-1] == ["contexts", "extra", "spans"]
    # Dropped in order, and only while the event is over the limit.
    assert [kept[key] for key in ("modules", "sdk", "tags")] == [{"k": "v"}] * 3
    assert len(whole) == 2  # measured once, then stored: not once per key shed


def test_nesting_deeper_than_the_limit_is_cut_not_recursed_into() -> None:
    deep: Any = "bottom"
    for _ in range(600):
        deep = [deep]
    kept = stored({"message": "m", "nested": deep, "pad": "p" * 40_000})
    depth, node = 0, kept["nested"]
    while isinstance(node, list):
        depth, node = depth + 1, node[0]
    assert depth == 20
    assert node == "[\u2026]"
