"""Scopes and breadcrumbs: each function, the isolation model, logging breadcrumbs, the guard."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import FAST_OPTIONS, ClientFactory

import selfreport
from selfreport import Client
from selfreport._capture import scope
from selfreport._capture.event import Capture, build_event
from selfreport.exceptions import ConfigError
from selfreport.testing import MemoryTransport


@pytest.fixture
def transport() -> Iterator[MemoryTransport]:
    """The global client (hooks installed), reporting into memory; INFO logs reach it."""
    memory = MemoryTransport()
    selfreport.init(transport=memory, **FAST_OPTIONS)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield memory
    root.setLevel(level)


def event_now() -> dict[str, Any]:
    """The event a capture made now would carry (built at once, no client)."""
    capture = Capture("error")
    capture.scope = scope.current_state()
    return build_event(capture)


def crumbs(event: dict[str, Any]) -> list[dict[str, Any]]:
    return list(event.get("breadcrumbs", {}).get("values", []))


def sent(memory: MemoryTransport) -> list[dict[str, Any]]:
    assert selfreport.flush(10)
    return memory.events


# --- each function -------------------------------------------------------------------------------


def test_set_tag_renders_and_bounds_values() -> None:
    selfreport.set_tag("plain", "value")
    selfreport.set_tag("number", 5)
    selfreport.set_tag("long", "v" * 500)
    selfreport.set_tag("lines", "one\ntwo\r")
    selfreport.set_tags({"a": 1, "b": True})
    tags = event_now()["tags"]
    assert tags == {
        "plain": "value",
        "number": "5",
        "long": "v" * 197 + "...",
        "lines": "one two ",
        "a": "1",
        "b": "True",
    }


@pytest.mark.parametrize("key", ["", "k" * 201, 5, None])
def test_bad_tag_keys_are_dropped_and_told(key: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="selfreport"):
        scope._diagnostics._last.clear()
        selfreport.set_tag(key, "v")
    assert "tags" not in event_now()
    assert any("names must be strings" in r.getMessage() for r in caplog.records)


def test_empty_tag_values_and_too_many_tags_are_dropped() -> None:
    selfreport.set_tag("empty", "")
    selfreport.set_tags({f"t{i}": i for i in range(scope.MAX_TAGS + 10)})
    tags = event_now()["tags"]
    assert "empty" not in tags
    assert len(tags) == scope.MAX_TAGS
    selfreport.set_tag("t0", "changed")  # an existing tag may still change
    assert event_now()["tags"]["t0"] == "changed"


def test_nothing_raises_into_the_caller() -> None:
    class Hostile(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            raise RuntimeError("no items for you")

    selfreport.set_tags(5)  # type: ignore[arg-type]
    selfreport.set_tags(Hostile())
    selfreport.set_user("alice")  # type: ignore[arg-type]
    selfreport.set_user(Hostile())
    selfreport.set_context("ctx", [1, 2])  # type: ignore[arg-type]
    selfreport.set_context(7, {"a": 1})  # type: ignore[arg-type]
    selfreport.add_breadcrumb("m", data=Hostile())
    selfreport.add_breadcrumb("m", data="not a dict")  # type: ignore[arg-type]
    event = event_now()
    assert "user" not in event
    assert set(event["contexts"]) == {"runtime", "os"}
    # The breadcrumb with data that is no dict is kept, without it; the hostile one is not.
    assert [(c["message"], "data" in c) for c in crumbs(event)] == [("m", False)]


def test_set_user_and_clear_it() -> None:
    selfreport.set_user({"id": 42, "email": "a@example.com"})
    assert event_now()["user"] == {"id": 42, "email": "a@example.com"}
    selfreport.set_user(None)
    assert "user" not in event_now()


def test_set_context_merges_with_runtime_and_os_and_can_be_removed() -> None:
    selfreport.set_context("checkout", {"cart": [1, 2], "total": 3.5})
    contexts = event_now()["contexts"]
    assert contexts["checkout"] == {"cart": [1, 2], "total": 3.5}
    assert {"runtime", "os"} <= set(contexts)
    selfreport.set_context("checkout", None)
    assert "checkout" not in event_now()["contexts"]


def test_values_are_rendered_when_set_and_bounded() -> None:
    data: dict[str, Any] = {"items": [1]}
    selfreport.set_extra("data", data)
    data["items"].append(2)  # a later change of the caller's object is not seen
    deep: Any = "bottom"
    for _ in range(10):
        deep = {"d": deep}
    selfreport.set_extra("deep", deep)
    selfreport.set_extra("object", object())
    selfreport.set_extra("many", list(range(1000)))
    selfreport.set_extra("nan", float("nan"))
    extra = event_now()["extra"]
    assert extra["data"] == {"items": [1]}
    level = extra["deep"]
    for _ in range(scope.MAX_DEPTH):
        level = level["d"]
    assert isinstance(level, str)  # cut at MAX_DEPTH: the rest as its repr
    assert extra["object"].startswith("<object object at")
    assert len(extra["many"]) == scope.MAX_ITEMS
    assert extra["nan"] == "nan"


def test_a_repr_that_logs_while_rendering_is_not_reported(
    transport: MemoryTransport,
) -> None:
    class Loud:
        def __repr__(self) -> str:
            logging.getLogger("app").error("logged from __repr__")
            return "Loud()"

    selfreport.set_extra("loud", Loud())
    selfreport.capture_message("after")
    events = sent(transport)
    assert [e["logentry"]["message"] for e in events] == ["after"]
    assert events[0]["extra"]["loud"] == "Loud()"
    assert selfreport.stats()["dropped_reentrant"] == 1


def test_add_breadcrumb_shape_and_levels() -> None:
    selfreport.add_breadcrumb("plain")
    selfreport.add_breadcrumb(
        "full", category="auth", level="warning", data={"user": 1}, type="navigation"
    )
    selfreport.add_breadcrumb(category="only-category", level="CRITICAL")
    selfreport.add_breadcrumb("warn alias", level="warn")
    selfreport.add_breadcrumb("by number", level=logging.ERROR)  # type: ignore[arg-type]
    selfreport.add_breadcrumb("unknown", level="loud")
    values = crumbs(event_now())
    for value in values:
        assert value.pop("timestamp").endswith("Z")
    assert values == [
        {"type": "default", "level": "info", "message": "plain"},
        {
            "type": "navigation",
            "level": "warning",
            "category": "auth",
            "message": "full",
            "data": {"user": 1},
        },
        {"type": "default", "level": "fatal", "category": "only-category"},
        {"type": "default", "level": "warning", "message": "warn alias"},
        {"type": "default", "level": "error", "message": "by number"},
        {"type": "default", "level": "info", "message": "unknown"},
    ]


def test_the_breadcrumb_ring_keeps_the_newest_in_order() -> None:
    scope.configure(10)
    for i in range(57):
        selfreport.add_breadcrumb(f"crumb {i}")
    node = scope.current_state().crumbs
    assert node is not None
    assert node[7] <= 10 * scope._SLACK  # the chain never grows past _SLACK times the limit
    capture = Capture("error")
    capture.scope = scope.current_state(max_breadcrumbs=10)
    values = crumbs(build_event(capture))
    assert [v["message"] for v in values] == [f"crumb {i}" for i in range(47, 57)]
    capture.scope = scope.current_state(max_breadcrumbs=3)  # a client may carry fewer
    assert [v["message"] for v in crumbs(build_event(capture))] == [
        "crumb 54",
        "crumb 55",
        "crumb 56",
    ]


def test_max_breadcrumbs_zero_records_none(make_client: ClientFactory) -> None:
    scope.configure(0)
    selfreport.add_breadcrumb("nothing")
    assert crumbs(event_now()) == []


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_breadcrumbs", -1), ("max_breadcrumbs", 5000), ("breadcrumbs_level", "LOUD")],
)
def test_options_are_checked(option: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=option):
        Client(None, **{option: value})


def test_init_sets_the_ring_size() -> None:
    memory = MemoryTransport()
    selfreport.init(transport=memory, max_breadcrumbs=7)
    for i in range(30):
        selfreport.add_breadcrumb(str(i))
    node = scope.current_state().crumbs
    assert node is not None
    assert node[7] <= 7 * scope._SLACK
    selfreport.capture_message("event")
    (event,) = sent(memory)
    assert [c["message"] for c in crumbs(event)] == [str(i) for i in range(23, 30)]


# --- the snapshot at capture time ----------------------------------------------------------------


def test_an_event_carries_the_scope_as_it_was_when_captured() -> None:
    memory = MemoryTransport()
    release = threading.Event()
    building = threading.Event()

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        building.set()
        release.wait(10)  # the caller changes its scope before this event is built
        return event

    selfreport.init(transport=memory, before_send=before_send, **FAST_OPTIONS)
    selfreport.set_tag("when", "before")
    selfreport.set_user({"id": 1})
    selfreport.add_breadcrumb("before")
    selfreport.capture_message("first")
    assert building.wait(10)
    selfreport.set_tag("when", "after")
    selfreport.set_user({"id": 2})
    selfreport.set_context("later", {"a": 1})
    selfreport.add_breadcrumb("after")
    release.set()
    selfreport.capture_message("second")
    first, second = sent(memory)
    assert first["tags"] == {"when": "before"}
    assert first["user"] == {"id": 1}
    assert "later" not in first["contexts"]
    assert [c["message"] for c in crumbs(first)] == ["before"]
    assert second["tags"] == {"when": "after"}
    assert [c["message"] for c in crumbs(second)] == ["before", "after"]


def test_event_fields_win_over_the_scope(transport: MemoryTransport) -> None:
    selfreport.set_extra("thread", "from the scope")
    selfreport.set_extra("mine", 1)
    logging.getLogger("app").error("with extra", extra={"mine": 2})
    (event,) = sent(transport)
    assert event["extra"]["mine"] == 2
    assert event["extra"]["thread"] == "MainThread"


# --- new_scope -----------------------------------------------------------------------------------


def test_new_scope_isolates_what_is_set_inside() -> None:
    selfreport.set_tag("outer", "1")
    selfreport.add_breadcrumb("outer")
    with selfreport.new_scope():
        assert event_now()["tags"] == {"outer": "1"}  # starts as the outside was
        selfreport.set_tag("inner", "2")
        selfreport.set_user({"id": "inner"})
        selfreport.add_breadcrumb("inner")
        with selfreport.new_scope():
            selfreport.set_tag("innermost", "3")
        assert event_now()["tags"] == {"outer": "1", "inner": "2"}
        assert [c["message"] for c in crumbs(event_now())] == ["outer", "inner"]
    event = event_now()
    assert event["tags"] == {"outer": "1"}
    assert "user" not in event
    assert [c["message"] for c in crumbs(event)] == ["outer"]


@pytest.mark.asyncio
async def test_new_scope_async() -> None:
    selfreport.set_tag("outer", "1")
    async with selfreport.new_scope():
        selfreport.set_tag("inner", "2")
        await asyncio.sleep(0)
        assert event_now()["tags"] == {"outer": "1", "inner": "2"}
    assert event_now()["tags"] == {"outer": "1"}


def test_new_scope_left_in_another_context_still_restores() -> None:
    manager = selfreport.new_scope()
    manager.__exit__(None, None, None)  # never entered: nothing to undo
    selfreport.set_tag("outer", "1")
    manager.__enter__()
    selfreport.set_tag("inner", "2")
    contextvars.copy_context().run(manager.__exit__, None, None, None)
    # The copy was restored; this context, where the tokens were made, is left as it was.
    assert event_now()["tags"] == {"outer": "1", "inner": "2"}
    context = contextvars.copy_context()
    context.run(manager.__enter__)
    context.run(selfreport.set_tag, "deeper", "3")
    manager.__exit__(None, None, None)  # tokens of another context: restored by value
    assert event_now()["tags"] == {"outer": "1", "inner": "2"}


def test_use_state_keeps_changes_for_the_next_block() -> None:
    request = scope.use_state(scope.current_state())
    with request:
        selfreport.set_tag("request", "1")
    assert "tags" not in event_now()
    with request:
        assert event_now()["tags"] == {"request": "1"}


# --- isolation -----------------------------------------------------------------------------------


def own_fields(event: dict[str, Any]) -> tuple[str, Any, list[str]]:
    return event["tags"]["worker"], event["user"]["id"], [c["message"] for c in crumbs(event)]


def test_50_threads_never_see_each_others_scope(transport: MemoryTransport) -> None:
    barrier = threading.Barrier(50)
    selfreport.add_breadcrumb("parent")

    def work(n: int) -> None:
        selfreport.set_tag("worker", str(n))
        selfreport.set_user({"id": n})
        barrier.wait(30)
        selfreport.add_breadcrumb(f"crumb {n}")
        barrier.wait(30)  # every thread has set everything before any reports
        selfreport.capture_message(f"from {n}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    events = sent(transport)
    assert len(events) == 50
    for event in events:
        worker, user, messages = own_fields(event)
        assert event["logentry"]["message"] == f"from {worker}"
        assert user == int(worker)
        assert messages == ["parent", f"crumb {worker}"]  # the parent's, then its own
    assert "tags" not in event_now()  # nothing leaked back into the parent


@pytest.mark.asyncio
async def test_200_tasks_never_see_each_others_scope(transport: MemoryTransport) -> None:
    started = asyncio.Event()
    ready = 0

    async def work(n: int) -> None:
        nonlocal ready
        selfreport.set_tag("worker", str(n))
        selfreport.set_user({"id": n})
        selfreport.add_breadcrumb(f"crumb {n}")
        logging.getLogger("app").info("logged by %d", n)
        ready += 1
        if ready == 200:
            started.set()
        await started.wait()  # every task interleaves with all the others
        with selfreport.new_scope():
            selfreport.set_tag("inside", str(n))
        selfreport.capture_message(f"from {n}")

    await asyncio.gather(*(work(n) for n in range(200)))
    events = sent(transport)
    assert len(events) == 200
    for event in events:
        worker, user, messages = own_fields(event)
        assert event["logentry"]["message"] == f"from {worker}"
        assert user == int(worker)
        assert messages == [f"crumb {worker}", f"logged by {worker}"]
        assert "inside" not in event["tags"]
    assert "tags" not in event_now()


def test_executor_jobs_each_start_from_the_submitters_scope(transport: MemoryTransport) -> None:
    selfreport.set_tag("submitter", "yes")

    def job(n: int) -> dict[str, Any]:
        seen = event_now()
        if n % 2 == 0:  # every other job sets something; the next job on its thread must not see it
            selfreport.set_tag("worker", str(n))
            selfreport.add_breadcrumb(f"job {n}")
        return seen

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        seen = list(pool.map(job, range(40)))
        loop_seen = asyncio.run(_in_executor(pool))
    for event in [*seen, loop_seen]:
        assert event["tags"] == {"submitter": "yes"}
        assert crumbs(event) == []


async def _in_executor(pool: concurrent.futures.Executor) -> dict[str, Any]:
    return await asyncio.get_running_loop().run_in_executor(pool, event_now)


def test_a_thread_starts_with_its_parents_scope_and_keeps_its_changes(
    transport: MemoryTransport,
) -> None:
    selfreport.set_tag("parent", "1")
    selfreport.add_breadcrumb("parent")
    seen: list[dict[str, Any]] = []

    class Worker(threading.Thread):
        def run(self) -> None:
            seen.append(event_now())
            selfreport.set_tag("child", "1")

    for thread in (Worker(), threading.Thread(target=lambda: seen.append(event_now()))):
        thread.start()
        thread.join(10)
    for event in seen:
        assert event["tags"] == {"parent": "1"}
        assert [c["message"] for c in crumbs(event)] == ["parent"]
    assert event_now()["tags"] == {"parent": "1"}


def test_without_hooks_threads_start_empty(make_client: ClientFactory) -> None:
    selfreport.set_tag("parent", "1")
    seen: list[dict[str, Any]] = []
    thread = threading.Thread(target=lambda: seen.append(event_now()))
    thread.start()
    thread.join(10)
    assert "tags" not in seen[0]


# --- logging breadcrumbs -------------------------------------------------------------------------


def test_log_records_between_the_levels_become_breadcrumbs(transport: MemoryTransport) -> None:
    log = logging.getLogger("shop.cart")
    log.debug("below breadcrumbs_level")
    log.info("added %d items", 3)
    log.warning("stock low", extra={"sku": "A-1"})
    log.info("x" * 5000)
    log.error("payment failed")
    (event,) = sent(transport)
    values = crumbs(event)
    for value in values:
        assert value.pop("timestamp").endswith("Z")
    assert values == [
        {"type": "log", "level": "info", "category": "shop.cart", "message": "added 3 items"},
        {
            "type": "log",
            "level": "warning",
            "category": "shop.cart",
            "message": "stock low",
            "data": {"sku": "A-1"},
        },
        {
            "type": "log",
            "level": "info",
            "category": "shop.cart",
            "message": "x" * (scope.MAX_VALUE - 3) + "...",
        },
    ]


def test_breadcrumbs_level_none_records_none_and_levels_are_configurable() -> None:
    memory = MemoryTransport()
    selfreport.init(transport=memory, breadcrumbs_level=None, **FAST_OPTIONS)
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        logging.getLogger("app").warning("not a breadcrumb")
        logging.getLogger("app").error("event")
        selfreport.init(
            transport=memory, breadcrumbs_level="DEBUG", logging_level="WARNING", **FAST_OPTIONS
        )
        logging.getLogger("app").debug("a debug breadcrumb")
        logging.getLogger("app").log(5, "a custom low level")
        logging.getLogger("app").warning("an event now")
        assert selfreport.flush(10)
    finally:
        logging.getLogger().setLevel(logging.WARNING)
    first, second = memory.events
    assert "breadcrumbs" not in first
    assert [(c["level"], c["message"]) for c in crumbs(second)] == [("debug", "a debug breadcrumb")]


def test_a_message_that_cannot_be_rendered_is_kept_as_its_template() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    broken = logging.LogRecord("app", logging.INFO, __file__, 1, "value %s", (Broken(),), None)
    custom = logging.LogRecord("app", 25, __file__, 1, "between info and warning", (), None)
    scope.record_log_breadcrumb(broken)
    scope.record_log_breadcrumb(custom)
    assert [(c["level"], c["message"]) for c in crumbs(event_now())] == [
        ("info", "value %s"),
        ("info", "between info and warning"),
    ]


def test_handler_filters_apply_to_breadcrumbs(make_client: ClientFactory) -> None:
    memory = MemoryTransport()
    client = make_client(transport=memory)
    handler = selfreport.LoggingHandler(client=client, breadcrumbs_level=logging.INFO)
    assert (handler.level, handler.event_level) == (logging.INFO, logging.ERROR)
    handler.addFilter(lambda record: "secret" not in record.getMessage())
    log = logging.getLogger("test_scope.filtered")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    try:
        log.info("kept")
        log.info("a secret one")
        log.error("event")
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
        log.propagate = True
    assert client.flush(10)
    assert [c["message"] for c in crumbs(memory.events[0])] == ["kept"]


def test_a_handler_without_breadcrumbs_level_takes_none() -> None:
    handler = selfreport.LoggingHandler(logging.WARNING)
    assert (handler.level, handler.event_level, handler.breadcrumbs_level) == (30, 30, None)
    handler.breadcrumbs_level = logging.INFO
    handler.setLevel(logging.ERROR)  # as dictConfig does
    assert (handler.level, handler.event_level) == (logging.INFO, logging.ERROR)


# --- the reporting path --------------------------------------------------------------------------


def test_breadcrumbs_recorded_in_the_reporting_path_are_dropped_and_counted() -> None:
    memory = MemoryTransport()

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        logging.getLogger("app").info("logged by before_send")
        selfreport.add_breadcrumb("added by before_send")
        return event

    selfreport.init(transport=memory, before_send=before_send, **FAST_OPTIONS)
    logging.getLogger().setLevel(logging.INFO)
    try:
        for i in range(5):
            selfreport.capture_message(f"event {i}")
            assert selfreport.flush(10)
        with selfreport.reporting_path():
            selfreport.add_breadcrumb("in the path")
            logging.getLogger("app").info("in the path")
        selfreport.capture_message("last")
        assert selfreport.flush(10)
    finally:
        logging.getLogger().setLevel(logging.WARNING)
    assert len(memory.events) == 6
    assert all("breadcrumbs" not in event for event in memory.events)
    stats = selfreport.stats()
    assert stats["breadcrumbs_dropped_reentrant"] == 6 * 2 + 2
    assert stats["dropped_reentrant"] == 0  # breadcrumbs are not events


def test_a_log_record_nested_in_another_is_not_a_breadcrumb(transport: MemoryTransport) -> None:
    class Loud:
        def __str__(self) -> str:
            logging.getLogger("app").info("logged while rendering")
            return "loud"

    logging.getLogger("app").info("outer %s", Loud())
    selfreport.capture_message("event")
    (event,) = sent(transport)
    assert [c["message"] for c in crumbs(event)] == ["outer loud"]
    # Once per handler that renders the record (pytest's own handler does too).
    assert selfreport.stats()["breadcrumbs_dropped_reentrant"] >= 1


def test_without_a_client_reentrant_breadcrumbs_are_dropped_silently() -> None:
    with selfreport.reporting_path():
        selfreport.add_breadcrumb("dropped")
    assert crumbs(event_now()) == []


# --- what is sent: scrubbed, valid for Relay and sentry-sdk, shaped as sentry-sdk shapes it -------

SECRET_PASSWORD = "hunter2-planted-password"
SECRET_CARD = "4111 1111 1111 1111"
SECRET_EMAIL = "alice.planted@example.com"
SECRET_TOKEN = "sk_live_plantedsecret0123456789"


def plant_secrets() -> None:
    selfreport.set_tag("password", SECRET_PASSWORD)
    selfreport.set_tag("card", SECRET_CARD)
    selfreport.set_user({"id": "7", "email": SECRET_EMAIL, "ip_address": "203.0.113.9"})
    selfreport.set_context("payment", {"card_number": SECRET_CARD, "note": f"card {SECRET_CARD}"})
    selfreport.set_extra("api_key", SECRET_TOKEN)
    selfreport.add_breadcrumb(
        f"login with password={SECRET_PASSWORD}", data={"token": SECRET_TOKEN}
    )
    logging.getLogger("auth").info("charging card %s", SECRET_CARD)


def test_scrubbing_covers_tags_user_contexts_extra_and_breadcrumbs() -> None:
    memory = MemoryTransport()
    selfreport.init(transport=memory, scrub=True, **FAST_OPTIONS)
    logging.getLogger().setLevel(logging.INFO)
    try:
        plant_secrets()
        selfreport.capture_message("event")
        (event,) = sent(memory)
    finally:
        logging.getLogger().setLevel(logging.WARNING)
    text = repr(event)
    for secret in (SECRET_PASSWORD, SECRET_CARD, SECRET_EMAIL, SECRET_TOKEN, "203.0.113.9"):
        assert secret not in text, secret
    assert event["user"]["id"] == "7"
    assert len(crumbs(event)) == 2  # scrubbed, not removed
    assert set(event["tags"]) == {"password", "card"}


def test_events_with_a_full_scope_are_valid_for_relay_and_sentry_sdk(
    transport: MemoryTransport,
) -> None:
    from tests.capture.test_event import assert_valid_for_sentry

    plant_secrets()
    selfreport.set_tag("number", 1)
    selfreport.add_breadcrumb(category="nav", level="debug", type="navigation")
    selfreport.capture_message("event")
    (event,) = sent(transport)
    normalized = assert_valid_for_sentry(event)
    assert len(normalized["breadcrumbs"]["values"]) == 3
    assert dict(normalized["tags"])["number"] == "1"
    assert normalized["user"]["email"] == SECRET_EMAIL  # scrub is off here: kept as given


class EnvelopeSink:
    """A sentry-sdk transport keeping what it would send."""

    def __init__(self) -> None:
        import sentry_sdk.transport

        sink = self

        class Transport(sentry_sdk.transport.Transport):
            def capture_envelope(self, envelope: Any) -> None:
                sink.events.append(envelope.get_event())

        self.events: list[dict[str, Any]] = []
        self.transport = Transport


def same_calls(api: Any, log_breadcrumb: Any) -> None:
    api.set_tag("release_channel", "beta")
    api.set_tags({"region": "eu", "tier": "gold"})
    api.set_user({"id": "42", "email": "u@example.com", "username": "u"})
    api.set_context("checkout", {"cart": 3})
    api.set_extra("attempt", 2)
    api.add_breadcrumb(message="opened cart", category="ui", level="info", data={"items": 3})
    api.add_breadcrumb(message="paid", category="payment", level="warning", type="http")
    record = logging.LogRecord("shop", logging.INFO, __file__, 1, "%d items", (3,), None)
    log_breadcrumb(record)
    api.capture_message("checkout failed", level="error")


def test_the_scope_is_sent_as_sentry_sdk_sends_it(transport: MemoryTransport) -> None:
    import sentry_sdk
    from sentry_sdk.integrations.logging import BreadcrumbHandler

    sink = EnvelopeSink()
    with sentry_sdk.isolation_scope(), sentry_sdk.new_scope():
        # Earlier tests' sentry-sdk clients may have left breadcrumbs in its scopes (a new
        # isolation scope starts as a copy of the one around it).
        for held in (sentry_sdk.Scope.get_global_scope(), sentry_sdk.get_isolation_scope()):
            held.clear_breadcrumbs()
        sentry_sdk.get_current_scope().clear_breadcrumbs()
        sentry_sdk.init(
            dsn="http://public@127.0.0.1:1/1",
            transport=sink.transport,
            default_integrations=False,
            auto_enabling_integrations=False,
        )
        try:
            same_calls(sentry_sdk, BreadcrumbHandler(logging.INFO).handle)
            sentry_sdk.flush(5)
        finally:
            sentry_sdk.get_client().close(timeout=1)
            sentry_sdk.Scope.get_global_scope().set_client(None)
    same_calls(selfreport, scope.record_log_breadcrumb)
    (ours,) = sent(transport)
    (theirs,) = sink.events

    def without_timestamps(event: dict[str, Any]) -> list[dict[str, Any]]:
        # sentry-sdk sends a log breadcrumb's empty extras as "data": {}; we leave it out.
        return [{k: v for k, v in c.items() if k != "timestamp" and v != {}} for c in crumbs(event)]

    assert without_timestamps(ours) == without_timestamps(theirs)
    assert ours["tags"] == theirs["tags"]
    assert ours["user"] == theirs["user"]
    assert ours["contexts"]["checkout"] == theirs["contexts"]["checkout"]
    assert ours["extra"]["attempt"] == theirs["extra"]["attempt"]
    assert isinstance(theirs["breadcrumbs"]["values"][0]["timestamp"], str)


def test_bounds_hold_one_call_at_a_time() -> None:
    for i in range(scope.MAX_TAGS + 5):
        selfreport.set_tag(f"t{i}", i)
    for i in range(scope.MAX_KEYS + 5):
        selfreport.set_extra(f"e{i}", i)
    event = event_now()
    assert len(event["tags"]) == scope.MAX_TAGS
    assert len(event["extra"]) == scope.MAX_KEYS


def test_log_breadcrumbs_keep_the_ring_bounded_too() -> None:
    scope.configure(10)
    for i in range(100):
        scope.record_log_breadcrumb(
            logging.LogRecord("app", logging.INFO, __file__, 1, "n=%d", (i,), None)
        )
    node = scope.current_state().crumbs
    assert node is not None
    assert node[7] <= 10 * scope._SLACK
    values = crumbs(build_event(_capture_with(scope.current_state(max_breadcrumbs=10))))
    assert [v["message"] for v in values] == [f"n={i}" for i in range(90, 100)]
    scope.configure(0)
    scope.record_log_breadcrumb(logging.LogRecord("app", logging.INFO, __file__, 1, "x", (), None))
    assert scope.current_state().crumbs is node


def _capture_with(state: scope.ScopeState) -> Capture:
    capture = Capture("error")
    capture.scope = state
    return capture


def test_a_thread_whose_run_was_replaced_still_gets_the_scope(
    transport: MemoryTransport,
) -> None:
    selfreport.set_tag("parent", "1")
    seen: list[dict[str, Any]] = []
    thread = threading.Thread()
    thread.run = lambda: seen.append(event_now())  # type: ignore[method-assign]
    thread.start()
    thread.join(10)
    assert seen[0]["tags"] == {"parent": "1"}


def test_a_handler_passes_records_it_has_no_use_for(make_client: ClientFactory) -> None:
    handler = selfreport.LoggingHandler(logging.ERROR, client=make_client())
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "x", (), None)
    assert handler.handle(record) is False  # no breadcrumbs_level: neither event nor crumb
    handler.breadcrumbs_level = logging.WARNING
    assert handler.handle(record) is False  # below breadcrumbs_level
    exit_only = scope.use_state(scope.current_state())
    exit_only.__exit__(None, None, None)  # never entered: nothing to restore
    assert crumbs(event_now()) == []


def test_capture_events_records_breadcrumbs_as_init_does() -> None:
    from selfreport.testing import capture_events

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    try:
        with capture_events() as events:
            logging.getLogger("app").info("step one")
            logging.getLogger("app").error("failed")
            assert events.client is not None
            assert events.client.flush(10)
    finally:
        root.setLevel(logging.WARNING)
    (event,) = events
    assert [c["message"] for c in crumbs(event)] == ["step one"]
