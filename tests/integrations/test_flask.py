"""The Flask extension with Flask's test client and under werkzeug's real threaded server."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any, Optional

import pytest

flask = pytest.importorskip("flask", reason="the Flask integration needs Flask (extra: flask)")
flask_login = pytest.importorskip("flask_login", reason="flask-login is in the dev extra")

from tests.integrations.together import (  # noqa: E402
    assert_each_event_is_its_own,
    assert_one_crash_report,
    crash_together,
)
from werkzeug.serving import make_server  # noqa: E402

import selfreport  # noqa: E402
from selfreport._delivery.transport import ORIGIN_HEADER, origin_value  # noqa: E402
from selfreport.integrations import RequestView  # noqa: E402
from selfreport.integrations.flask import FlaskRequest, Selfreport  # noqa: E402
from selfreport.testing import CapturedEvents, capture_events  # noqa: E402

SECRETS = {"Authorization": "Bearer s3cret"}


class User(flask_login.UserMixin):  # type: ignore[misc]
    def __init__(self, name: str) -> None:
        self.id = len(name)
        self.username = name
        self.email = f"{name}@example.com"


def make_app(*, testing: bool = False, login: bool = True, **options: Any) -> Any:
    app = flask.Flask(__name__)
    app.testing = testing
    seen: list[str] = []
    app.config["SEEN"] = seen
    barrier = threading.Barrier(2, timeout=20)
    if login:
        manager = flask_login.LoginManager(app)

        @manager.request_loader  # type: ignore[misc]
        def load(request: Any) -> Optional[User]:
            name = request.headers.get("X-Test-User")
            return User(name) if name else None

    @app.route("/items/<int:item_id>/crash")
    def crash(item_id: int) -> str:
        selfreport.set_tag("item", item_id)
        raise LookupError(f"no item {item_id}")

    @app.route("/logs")
    def logs() -> str:
        if flask.request.args.get("touch"):
            assert flask_login.current_user.is_authenticated
        logging.getLogger("tests.flask.view").error("logged inside a view")
        return "ok"

    @app.route("/together")
    def together() -> str:
        who = flask.request.args["who"]
        selfreport.set_tag("who", who)
        assert flask_login.current_user.username == who
        barrier.wait()  # both requests are inside their views, with their tags set, at once
        raise RuntimeError(f"crash of {who}")

    @app.route("/own")
    def own() -> str:
        seen.append(f"reporting={selfreport.is_reporting()}")
        raise RuntimeError("failed while ingesting our own report")

    @app.route("/handled")
    def handled() -> str:
        raise KeyError("an error handler answers this one")

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        logging.getLogger("tests.flask.view").error("nothing at %s", flask.request.path)
        return "not found", 404

    @app.errorhandler(KeyError)
    def on_key_error(error: KeyError) -> tuple[str, int]:
        return "handled", 409

    Selfreport(app, **options)
    return app


@pytest.fixture
def events() -> Iterator[CapturedEvents]:
    with capture_events() as captured:
        yield captured


def test_a_crash_is_reported_once_with_request_route_and_user(events: CapturedEvents) -> None:
    client = make_app().test_client()
    client.set_cookie("session", "s3cret")  # werkzeug's client sends cookies from its jar
    response = client.get(
        "/items/7/crash?password=hunter2&page=2", headers={"X-Test-User": "ada", **SECRETS}
    )
    assert response.status_code == 500
    assert_one_crash_report(
        events,
        framework="flask",
        url="http://localhost",
        route="/items/<int:item_id>/crash",
        endpoint="crash",
    )


def test_in_testing_mode_the_propagated_exception_is_not_reported_again(
    events: CapturedEvents,
) -> None:
    app = make_app(testing=True, send_default_pii=True)
    with pytest.raises(LookupError):
        app.test_client().get("/items/1/crash", headers={"X-Test-User": "grace"})
    events.flush()
    (event,) = events
    assert event["user"] == {"id": "5", "username": "grace", "email": "grace@example.com"}
    # The WSGI middleware saw it propagate: the same exception object, dropped and counted.
    assert events.client.stats()["dropped_duplicate"] == 1


def test_handled_errors_and_http_errors_are_not_reported_as_crashes(events: CapturedEvents) -> None:
    client = make_app().test_client()
    assert client.get("/handled").status_code == 409
    assert client.get("/no/such/page").status_code == 404
    events.flush()
    # Only what the 404 handler logged: with its request, and no route (none matched).
    (event,) = events
    assert event["logentry"]["formatted"] == "nothing at /no/such/page"
    assert event["request"]["url"] == "http://localhost/no/such/page"
    assert "transaction" not in event
    assert "endpoint" not in event.get("tags", {})


def test_a_logged_error_carries_its_request_and_the_user_only_once_loaded(
    events: CapturedEvents,
) -> None:
    client = make_app().test_client()
    assert client.get("/logs?token=abc", headers={"X-Test-User": "ada"}).status_code == 200
    assert client.get("/logs?touch=1", headers={"X-Test-User": "linus"}).status_code == 200
    events.flush()
    first, second = events
    assert first["logentry"]["message"] == "logged inside a view"
    assert first["request"]["url"] == "http://localhost/logs?token=[Filtered]"
    assert first["transaction"] == "/logs"
    assert first["tags"]["endpoint"] == "logs"
    assert "user" not in first  # the view never loaded it: no user loader call of ours
    assert second["user"] == {"id": "5", "username": "linus"}


def test_without_a_login_manager_there_is_no_user(events: CapturedEvents) -> None:
    client = make_app(login=False).test_client()
    assert client.get("/items/2/crash", headers={"X-Test-User": "ada"}).status_code == 500
    events.flush()
    (event,) = events
    assert "user" not in event
    assert event["transaction"] == "/items/<int:item_id>/crash"


def test_own_reports_run_in_the_reporting_path() -> None:
    with capture_events(dsn="http://public@127.0.0.1:9/42") as events:
        app = make_app()
        assert events.client.dsn is not None
        mark = {ORIGIN_HEADER: origin_value(events.client.dsn)}
        assert app.test_client().get("/own", headers=mark).status_code == 500
        events.flush()
        assert app.config["SEEN"] == ["reporting=True"]
        assert len(events) == 0
        stats = events.client.stats()
        # The signal's report and app.logger's record: both born in the path, both counted.
        assert (stats["dropped_reentrant"], stats["captured"]) == (2, 0)


def test_init_app_later_and_once(events: CapturedEvents) -> None:
    app = flask.Flask(__name__)

    @app.route("/boom")
    def boom() -> str:
        raise ValueError("boom")

    extension = Selfreport(client=events.client)
    extension.init_app(app)
    extension.init_app(app)  # a second call: no second wrapper, no second receiver
    Selfreport(app)
    assert app.extensions["selfreport"] is extension
    assert app.test_client().get("/boom").status_code == 500
    events.flush()
    assert len(events) == 1
    assert events.client.stats()["dropped_duplicate"] == 1


def test_hooks_registered_before_the_extension_see_the_request(events: CapturedEvents) -> None:
    app = flask.Flask(__name__)

    @app.before_request
    def refuse() -> tuple[str, int]:
        logging.getLogger("tests.flask.hook").error("refused early")
        return "refused", 403

    @app.route("/page")
    def page() -> str:
        return "never reached"

    Selfreport(app)
    assert app.test_client().get("/page?secret=x").status_code == 403
    events.flush()
    (event,) = events
    assert event["request"]["url"] == "http://localhost/page?secret=[Filtered]"
    assert event["transaction"] == "/page"


def test_a_broken_user_loader_leaves_the_user_out() -> None:
    class Broken(RequestView):
        def info(self) -> dict[str, Any]:
            raise RuntimeError("cannot describe")

        def user(self, load: bool) -> Optional[dict[str, Any]]:
            return None

    from selfreport.integrations import report_view_exception

    with capture_events() as events:
        report_view_exception(ValueError("x"), Broken(), mechanism="flask")
        events.flush()
    (event,) = events
    assert "request" not in event
    app = make_app()
    with app.test_request_context("/logs", headers={"X-Test-User": "ada"}):
        flask_login.current_user._get_current_object()
        flask.g._login_user = object()  # a user object without is_authenticated
        view = FlaskRequest(flask.request._get_current_object(), flask.g, False)
        assert view.user(load=False) is None


# --- a real server on a real socket ---------------------------------------------------------


def test_concurrent_requests_on_a_real_server_never_see_each_other(
    events: CapturedEvents,
) -> None:
    server = make_server("127.0.0.1", 0, make_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        statuses = crash_together(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert statuses == {"alice": 500, "bob": 500}
    assert_each_event_is_its_own(events)


def test_importing_without_flask_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flask.signals", None)
    monkeypatch.delitem(sys.modules, "selfreport.integrations.flask")
    with pytest.raises(ImportError, match=r"selfreport\[flask\]"):
        __import__("selfreport.integrations.flask")
