"""Snapshots and Sentry events, checked with sentry-sdk's envelope parser and Relay."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from sentry_sdk.envelope import Envelope as SentryEnvelope
from tests.conftest import ClientFactory, import_relay

from selfreport import LoggingHandler
from selfreport._capture.event import (
    MAX_CHAINED,
    MAX_FRAMES,
    MAX_STRING,
    SDK_INFO,
    Capture,
    build_event,
    capture_from_exception,
    capture_from_message,
    capture_from_record,
    level_name,
    safe_repr,
    safe_str,
)
from selfreport._core.dsn import parse_dsn
from selfreport._delivery.envelope import serialize_envelope
from selfreport.testing import FakeCollector

DSN = parse_dsn("https://public@sentry.example.com/1")
SENT_AT = "2024-01-01T00:00:00.000000Z"


def make_record(
    msg: object = "boom %s",
    args: Any = ("x",),
    level: int = logging.ERROR,
    exc_info: Any = None,
    **extra: Any,
) -> logging.LogRecord:
    record = logging.LogRecord("app.module", level, __file__, 10, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def nulls(value: Any, path: str = "event") -> Iterator[str]:
    """Paths of every None value in ``value``."""
    if value is None:
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from nulls(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from nulls(item, f"{path}[{index}]")


def assert_valid_for_sentry(event: dict[str, Any]) -> dict[str, Any]:
    """sentry-sdk parses our envelope back to the same event; Relay normalizes it cleanly."""
    body = serialize_envelope(event, DSN, SENT_AT)
    parsed = SentryEnvelope.deserialize(body)
    assert parsed.headers["event_id"] == event["event_id"]
    assert parsed.headers["dsn"] == str(DSN)
    assert [item.type for item in parsed.items] == ["event"]
    assert parsed.get_event() == json.loads(json.dumps(event))
    relay = import_relay()
    normalized = relay.StoreNormalizer(project_id=1).normalize_event(event)
    assert normalized.get("errors") is None, normalized["errors"]
    assert normalized.get("_meta") is None, normalized["_meta"]
    assert list(nulls(event)) == []
    return normalized


# --- helpers ---------------------------------------------------------------------------------


def test_safe_str_survives_a_broken_str_and_truncates() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert safe_str(Broken()) == "<unprintable Broken: RuntimeError>"
    long = safe_str("x" * (MAX_STRING + 10))
    assert len(long) == MAX_STRING
    assert long.endswith("...")
    assert safe_str(42) == "42"


def test_safe_repr_survives_a_broken_repr_and_truncates() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert safe_repr(Broken()) == "<unrepresentable Broken: RuntimeError>"
    assert len(safe_repr("y" * 5000)) == 1024


@pytest.mark.parametrize(
    ("levelno", "name"),
    [
        (logging.CRITICAL, "fatal"),
        (logging.CRITICAL + 5, "fatal"),
        (logging.ERROR, "error"),
        (logging.ERROR + 5, "error"),
        (logging.WARNING, "warning"),
        (35, "warning"),
        (logging.INFO, "info"),
        (25, "info"),
        (logging.DEBUG, "debug"),
        (5, "debug"),
    ],
)
def test_level_names(levelno: int, name: str) -> None:
    assert level_name(levelno) == name


# --- snapshots -----------------------------------------------------------------------------


def test_capture_from_record() -> None:
    record = make_record("user %s failed %d times", ("ana", 3), custom="yes")
    capture = capture_from_record(record)
    assert capture.level == "error"
    assert capture.logger == "app.module"
    assert capture.message == "user %s failed %d times"
    assert capture.params == ["ana", 3]
    assert capture.formatted == "user ana failed 3 times"
    assert capture.timestamp == record.created
    assert capture.mechanism == "logging"
    assert capture.thread == record.threadName
    assert capture.extra == {"custom": "yes"}
    assert capture.exc_info is None
    assert len(capture.event_id) == 32


def test_record_args_are_rendered_at_call_time() -> None:
    items = ["first"]
    record = make_record("items: %s", (items,))
    capture = capture_from_record(record)
    items.append("added later")
    event = build_event(capture)
    assert event["logentry"]["formatted"] == "items: ['first']"
    assert event["logentry"]["params"] == ["['first']"]


def test_logged_args_are_sent_as_they_were_at_call_time(
    collector: FakeCollector, make_client: ClientFactory
) -> None:
    client = make_client(collector.dsn)
    logger = logging.getLogger("test_event.call_time")
    handler = LoggingHandler(client=client)
    logger.addHandler(handler)
    state = {"status": "at call time"}
    try:
        logger.error("state is %s", state)
        state["status"] = "mutated after logging"
    finally:
        logger.removeHandler(handler)
    assert client.flush(5)
    assert collector.wait_for(1)
    assert collector.events[0]["logentry"]["formatted"] == "state is {'status': 'at call time'}"


def test_record_with_mapping_args_and_broken_str() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    mapping = make_record("%(a)s", ({"a": 1},))
    assert capture_from_record(mapping).formatted == "1"
    assert capture_from_record(mapping).params == ["{'a': 1}"]
    broken = capture_from_record(make_record("value %s", (Broken(),)))
    assert broken.formatted == "value %s"  # formatting failed: the template instead
    assert broken.params is not None
    assert ".Broken object at 0x" in str(broken.params[0])  # repr: never the broken __str__


def test_record_with_non_string_message_and_scalar_args() -> None:
    capture = capture_from_record(make_record(ValueError("as msg"), (None, True, 1.5)))
    assert capture.message == "as msg"
    assert capture.params == [None, True, 1.5]


def test_record_with_exc_info_and_locals() -> None:
    def failing() -> None:
        secret_local = "visible"  # noqa: F841
        raise RuntimeError("inside")

    try:
        failing()
    except RuntimeError:
        record = make_record("failed", (), exc_info=sys.exc_info())
    capture = capture_from_record(record, include_locals=True)
    assert capture.exc_info is not None
    assert capture.vars is not None
    assert capture.vars[-1] == {"secret_local": "'visible'"}
    event = build_event(capture)
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    assert frames[-1]["vars"] == {"secret_local": "'visible'"}
    assert event["exception"]["values"][-1]["mechanism"] == {"type": "logging", "handled": True}
    assert_valid_for_sentry(event)


def test_record_with_exc_info_without_exception_is_a_message() -> None:
    capture = capture_from_record(make_record("no exception", (), exc_info=(None, None, None)))
    assert capture.exc_info is None


def test_capture_from_exception_levels() -> None:
    exc = raised(ValueError("x"))
    handled = capture_from_exception(exc, "generic", handled=True)
    unhandled = capture_from_exception(exc, "excepthook", handled=False)
    # Sentry's convention: uncaught is level "error" with mechanism.handled False.
    assert (handled.level, unhandled.level) == ("error", "error")
    assert unhandled.mechanism == "excepthook"
    assert not unhandled.handled
    assert handled.vars is None


def test_capture_from_message_levels() -> None:
    assert capture_from_message("hi", "warning").level == "warning"
    assert capture_from_message("hi", "LOUD").level == "error"
    assert capture_from_message("hi", "info").formatted == "hi"


# --- building events -------------------------------------------------------------------------


def test_message_event() -> None:
    capture = capture_from_message("disk almost full", "warning")
    event = build_event(capture, environment="production", release="app@1.2", server_name="web1")
    assert event["event_id"] == capture.event_id
    assert event["level"] == "warning"
    assert event["platform"] == "python"
    assert event["sdk"] == SDK_INFO
    assert event["environment"] == "production"
    assert event["release"] == "app@1.2"
    assert event["server_name"] == "web1"
    assert event["logentry"] == {"message": "disk almost full"}
    assert event["contexts"]["runtime"]["version"] == sys.version.split()[0]
    assert "exception" not in event
    assert "logger" not in event
    assert "extra" not in event
    assert event["timestamp"].endswith("Z")
    normalized = assert_valid_for_sentry(event)
    assert normalized["logentry"]["formatted"] == "disk almost full"


def test_defaults_leave_optional_fields_out() -> None:
    event = build_event(capture_from_message("x", "error"))
    assert "environment" not in event
    assert "release" not in event
    assert event["server_name"]


def test_record_event_with_params_and_extra() -> None:
    record = make_record("user %s failed", ("ana",), request_id="r-1", obj=object())
    capture = capture_from_record(record)
    capture.repeats = 4
    event = build_event(capture)
    assert event["logger"] == "app.module"
    assert event["logentry"] == {
        "message": "user %s failed",
        "params": ["ana"],
        "formatted": "user ana failed",
    }
    assert event["extra"]["request_id"] == "r-1"
    assert event["extra"]["obj"].startswith("<object object at")
    assert event["extra"]["selfreport_repeats"] == 4
    assert event["extra"]["thread"] == record.threadName
    assert_valid_for_sentry(event)


def _frames(value: dict[str, Any]) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = value["stacktrace"]["frames"]
    return frames


def innermost_frame(exc: BaseException) -> dict[str, Any]:
    return _frames(build_event(capture_from_exception(exc, "g", True))["exception"]["values"][0])[
        -1
    ]


def test_exception_event_frames() -> None:
    exc = raised(KeyError("missing"))
    event = build_event(capture_from_exception(exc, "generic", True))
    (value,) = event["exception"]["values"]
    assert value["type"] == "KeyError"
    assert value["value"] == "'missing'"
    assert "module" not in value  # builtins: left out, never null
    assert value["mechanism"] == {"type": "generic", "handled": True}
    frame = _frames(value)[-1]
    assert frame["function"] == "raised"
    assert frame["abs_path"] == os.path.abspath(__file__)
    assert frame["filename"] == "tests/capture/test_event.py"  # relative to the top package
    assert frame["module"] == __name__
    assert frame["in_app"] is True
    assert frame["context_line"].strip() == "raise exc"
    assert frame["pre_context"][-1].strip() == "try:"
    assert frame["post_context"][0].strip() == "except BaseException as caught:"
    assert exc.__traceback__ is not None
    assert frame["lineno"] == exc.__traceback__.tb_lineno
    assert_valid_for_sentry(event)


def test_exception_type_module_and_library_frames() -> None:
    try:
        json.loads("{not json")
    except json.JSONDecodeError as caught:
        exc = caught
    event = build_event(capture_from_exception(exc, "generic", True))
    (value,) = event["exception"]["values"]
    assert value["type"] == "JSONDecodeError"
    assert value["module"] == "json.decoder"
    frames = _frames(value)
    assert frames[0]["in_app"] is True
    assert frames[-1]["in_app"] is False  # the standard library is not the app
    assert frames[-1]["module"].startswith("json")
    assert_valid_for_sentry(event)


def test_chained_exceptions_oldest_first() -> None:
    try:
        try:
            raise OSError("disk")
        except OSError as cause:
            raise RuntimeError("save failed") from cause
    except RuntimeError as caught:
        exc = caught
    values = build_event(capture_from_exception(exc, "generic", True))["exception"]["values"]
    assert [v["type"] for v in values] == ["OSError", "RuntimeError"]
    assert values[0]["mechanism"] == {"type": "chained", "handled": True}
    assert values[1]["mechanism"] == {"type": "generic", "handled": True}
    assert_valid_for_sentry(build_event(capture_from_exception(exc, "generic", True)))


def test_implicit_context_is_included() -> None:
    try:
        try:
            raise OSError("first")
        except OSError:
            raise ValueError("while handling")  # noqa: B904
    except ValueError as caught:
        exc = caught
    values = build_event(capture_from_exception(exc, "generic", True))["exception"]["values"]
    assert [v["type"] for v in values] == ["OSError", "ValueError"]


def test_suppressed_context_is_left_out() -> None:
    try:
        try:
            raise OSError("hidden")
        except OSError:
            raise ValueError("shown") from None
    except ValueError as caught:
        exc = caught
    values = build_event(capture_from_exception(exc, "generic", True))["exception"]["values"]
    assert [v["type"] for v in values] == ["ValueError"]


def test_cyclic_and_long_chains_terminate() -> None:
    first, second = ValueError("a"), KeyError("b")
    first.__context__ = second
    second.__context__ = first
    values = build_event(capture_from_exception(first, "generic", True))["exception"]["values"]
    assert [v["type"] for v in values] == ["KeyError", "ValueError"]

    exc: BaseException = ValueError(0)
    for n in range(1, 30):
        outer = ValueError(n)
        outer.__cause__ = exc
        exc = outer
    values = build_event(capture_from_exception(exc, "generic", True))["exception"]["values"]
    assert len(values) == MAX_CHAINED
    assert values[-1]["value"] == "29"


def test_unraised_exception_has_no_frames() -> None:
    event = build_event(capture_from_exception(ValueError("never raised"), "generic", True))
    assert event["exception"]["values"][0]["stacktrace"] == {"frames": []}


def test_deep_recursion_keeps_both_ends() -> None:
    def recurse(n: int) -> None:
        if n == 0:
            raise RecursionError("bottom")
        recurse(n - 1)

    exc = raised_from(lambda: recurse(MAX_FRAMES * 2))
    frames = _frames(build_event(capture_from_exception(exc, "g", True))["exception"]["values"][0])
    assert len(frames) == MAX_FRAMES
    assert frames[0]["function"].endswith("raised_from")
    assert frames[-1]["context_line"].strip() == 'raise RecursionError("bottom")'


def test_deep_recursion_keeps_the_locals_of_the_innermost_frames() -> None:
    def recurse(depth: int) -> None:
        if depth == 0:
            raise RecursionError("bottom")
        recurse(depth - 1)

    exc = raised_from(lambda: recurse(MAX_FRAMES * 2))
    capture = capture_from_exception(exc, "g", True, include_locals=True)
    frames = _frames(build_event(capture)["exception"]["values"][0])
    assert len(frames) == MAX_FRAMES
    assert frames[-1]["vars"]["depth"] == "0"  # where it failed: not cut off with the middle
    assert frames[-2]["vars"]["depth"] == "1"
    assert frames[MAX_FRAMES // 2]["vars"]["depth"] == str(MAX_FRAMES // 2 - 1)


def raised_from(func: Any) -> BaseException:
    try:
        func()
    except BaseException as caught:
        return caught
    raise AssertionError("did not raise")


def test_frames_of_code_without_source() -> None:
    namespace: dict[str, Any] = {}
    exec(compile("def f():\n    raise ValueError('generated')\n", "<generated>", "exec"), namespace)
    exc = raised_from(namespace["f"])
    frame = innermost_frame(exc)
    assert frame["filename"] == "<generated>"
    assert frame["in_app"] is False
    assert "context_line" not in frame
    assert "module" not in frame  # the exec namespace has no __name__


def test_unprintable_exception_value() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("nope")

    event = build_event(capture_from_exception(raised(Unprintable()), "g", True))
    value = event["exception"]["values"][0]
    assert value["value"] == "<unprintable Unprintable: RuntimeError>"
    assert value["type"] == "test_unprintable_exception_value.<locals>.Unprintable"
    assert_valid_for_sentry(event)


def test_capture_holds_the_caller_context_slot() -> None:
    capture = Capture("error")
    assert capture.context is None
    assert capture.repeats == 0


def test_locals_are_taken_only_from_app_frames() -> None:
    try:
        json.loads("{broken")
    except json.JSONDecodeError as caught:
        exc = caught
    capture = capture_from_exception(exc, "generic", True, include_locals=True)
    assert capture.vars is not None
    assert capture.vars[0] is not None  # this test's frame
    assert capture.vars[-1] is None  # json's: library code keeps its locals


def test_filename_of_a_top_level_module_is_its_basename() -> None:
    namespace: dict[str, Any] = {"__name__": "toolbox"}
    code = "def f():\n    raise ValueError('top level module')\n"
    exec(compile(code, "/opt/scripts/toolbox.py", "exec"), namespace)
    exc = raised_from(namespace["f"])
    frame = innermost_frame(exc)
    assert frame["filename"] == "toolbox.py"
    assert frame["abs_path"] == "/opt/scripts/toolbox.py"
    assert frame["module"] == "toolbox"


def test_exception_message_is_rendered_at_capture_time() -> None:
    class Mutable(Exception):
        def __init__(self) -> None:
            super().__init__()
            self.state = "at call time"

        def __str__(self) -> str:
            return self.state

    exc = raised(Mutable())
    capture = capture_from_exception(exc, "generic", handled=True)
    exc.state = "changed later"
    event = build_event(capture)
    assert event["exception"]["values"][-1]["value"] == "at call time"


def test_request_becomes_sentrys_request_interface() -> None:
    capture = capture_from_exception(raised(ValueError("in a view")), "asgi", handled=False)
    capture.request = {
        "method": "POST",
        "url": "http://shop.example/items/7?page=2",
        "headers": {"user-agent": "tests", "authorization": "[Filtered]"},
        "route": "/items/{item_id}",
        "endpoint": "shop.views.item",
    }
    event = build_event(capture)
    assert event["request"] == {
        "method": "POST",
        "url": "http://shop.example/items/7?page=2",
        "headers": {"user-agent": "tests", "authorization": "[Filtered]"},
    }
    assert event["transaction"] == "/items/{item_id}"
    assert event["tags"] == {"route": "/items/{item_id}", "endpoint": "shop.views.item"}
    normalized = assert_valid_for_sentry(event)
    assert normalized["request"]["method"] == "POST"


# --- exception groups and notes (PEP 654, PEP 678) -------------------------------------------

needs_groups = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="ExceptionGroup and add_note are builtins from 3.11"
)


def _nested_group() -> BaseException:
    def inner() -> BaseException:
        key = raised(KeyError("k"))
        key.add_note("looked up in the cache")  # type: ignore[attr-defined]
        group = ExceptionGroup("inner", [key, raised(TypeError("t"))])  # type: ignore[name-defined]  # noqa: F821
        return raised(group)

    outer = ExceptionGroup("outer", [raised(ValueError("a")), inner()])  # type: ignore[name-defined]  # noqa: F821
    outer = raised(outer)
    outer.add_note("while syncing")  # type: ignore[attr-defined]
    return outer


def _shape(values: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("exception_id", "parent_id", "source", "is_exception_group")
    return [(v["type"], v["value"], *(v["mechanism"].get(key) for key in keys)) for v in values]


@needs_groups
def test_exception_group_is_sent_as_sentry_sdk_sends_it() -> None:
    from sentry_sdk.utils import exceptions_from_error_tuple

    group = _nested_group()
    event = build_event(capture_from_exception(group, "generic", False))
    ours = event["exception"]["values"]
    theirs = exceptions_from_error_tuple((type(group), group, group.__traceback__))
    assert _shape(ours) == _shape(theirs)
    assert [v["type"] for v in ours] == [
        "TypeError", "KeyError", "ExceptionGroup", "ValueError", "ExceptionGroup"
    ]  # fmt: skip
    root = ours[-1]
    assert root["value"] == "outer\nwhile syncing"
    assert root["mechanism"] == {
        "type": "generic", "handled": False, "exception_id": 0, "is_exception_group": True
    }  # fmt: skip
    key = ours[1]
    assert key["value"] == "'k'\nlooked up in the cache"
    assert key["mechanism"]["parent_id"] == 2
    assert key["mechanism"]["source"] == "exceptions[0]"
    assert all(v["stacktrace"]["frames"] for v in ours)  # each member with its own stack
    assert_valid_for_sentry(event)


@needs_groups
def test_notes_and_members_are_rendered_at_capture_time() -> None:
    group = _nested_group()
    capture = capture_from_exception(group, "generic", True)
    group.add_note("added later")  # type: ignore[attr-defined]
    group.exceptions[0].args = ("changed",)  # type: ignore[attr-defined]
    values = build_event(capture)["exception"]["values"]
    assert values[-1]["value"] == "outer\nwhile syncing"
    assert values[-2]["value"] == "a"


def test_a_plain_chain_carries_no_group_ids() -> None:
    try:
        try:
            raise KeyError("first")
        except KeyError as exc:
            raise ValueError("second") from exc
    except ValueError as exc:
        values = build_event(capture_from_exception(exc, "generic", True))["exception"]["values"]
    assert [v["mechanism"] for v in values] == [
        {"type": "chained", "handled": True},
        {"type": "generic", "handled": True},
    ]


@needs_groups
def test_members_that_escaped_the_reporting_path_are_left_out() -> None:
    from selfreport import reporting_path

    def from_path() -> BaseException:
        try:
            with reporting_path():
                raise RuntimeError("the path's own")
        except RuntimeError as exc:
            return exc

    group = raised(ExceptionGroup("g", [from_path(), raised(ValueError("real"))]))  # type: ignore[name-defined]  # noqa: F821
    values = build_event(capture_from_exception(group, "generic", True))["exception"]["values"]
    assert [(v["type"], v["mechanism"].get("source")) for v in values] == [
        ("ValueError", "exceptions[1]"),
        ("ExceptionGroup", None),
    ]


@needs_groups
def test_a_huge_group_is_bounded() -> None:
    from selfreport._capture.event import MAX_EXCEPTIONS

    members = [raised(ValueError(str(i))) for i in range(1000)]
    group = raised(ExceptionGroup("many", members))  # type: ignore[name-defined]  # noqa: F821
    values = build_event(capture_from_exception(group, "generic", True))["exception"]["values"]
    assert len(values) == MAX_EXCEPTIONS


def test_notes_that_are_not_a_list_of_strings_are_ignored() -> None:
    exc = raised(ValueError("v"))
    exc.__notes__ = ["kept", 42, b"bytes"]  # type: ignore[attr-defined]
    values = build_event(capture_from_exception(exc, "generic", True))["exception"]["values"]
    assert values[0]["value"] == "v\nkept"
    exc.__notes__ = "not a list"  # type: ignore[attr-defined]
    values = build_event(capture_from_exception(exc, "generic", True))["exception"]["values"]
    assert values[0]["value"] == "v"
