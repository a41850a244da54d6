"""The Django middleware with Django's test clients and under a real threaded WSGI server."""

from __future__ import annotations

import logging
import socketserver
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

django = pytest.importorskip("django", reason="the Django integration needs Django (extra: django)")

from asgiref.sync import iscoroutinefunction, markcoroutinefunction  # noqa: E402
from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="selfreport-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
        MIDDLEWARE=[
            "selfreport.integrations.django.SelfreportMiddleware",
            f"{__name__}.HeaderUser",
        ],
        DATABASES={},
        # Tests keep logging as pytest set it: django.request propagates to the root handler.
        LOGGING_CONFIG=None,
        USE_TZ=True,
    )
    django.setup()

from django.contrib.auth.models import AnonymousUser, User  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.core.signals import got_request_exception  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.test import AsyncClient, Client, RequestFactory, override_settings  # noqa: E402
from django.urls import path, re_path  # noqa: E402
from django.utils.functional import SimpleLazyObject  # noqa: E402
from tests.integrations.together import (  # noqa: E402
    assert_each_event_is_its_own,
    assert_one_crash_report,
    crash_together,
)

import selfreport  # noqa: E402
from selfreport._delivery.transport import ORIGIN_HEADER, origin_value  # noqa: E402
from selfreport.integrations.django import DjangoRequest, SelfreportMiddleware  # noqa: E402
from selfreport.testing import CapturedEvents, capture_events  # noqa: E402

SECRETS = {"HTTP_AUTHORIZATION": "Bearer s3cret", "HTTP_COOKIE": "sessionid=s3cret"}
seen: list[str] = []
barrier = threading.Barrier(2, timeout=20)


class HeaderUser:
    """What AuthenticationMiddleware does (a lazy ``request.user``), the user named by a header;
    sync and async, so that Django's async handler runs the whole chain (ours too) async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        name = request.headers.get("X-Test-User")
        request.user = SimpleLazyObject(lambda: _user(name))  # type: ignore[assignment]
        return self.get_response(request)


def _user(name: Optional[str]) -> Any:
    if not name:
        return AnonymousUser()
    if name == "broken":
        return object()  # no is_authenticated: a broken user model
    return User(id=len(name), username=name, email=f"{name}@example.com")


def crash(request: HttpRequest, pk: int) -> HttpResponse:
    selfreport.set_tag("item", pk)
    raise LookupError(f"no item {pk}")


def logs(request: HttpRequest) -> HttpResponse:
    if request.GET.get("touch"):
        assert request.user.is_authenticated
    logging.getLogger("tests.django.view").error("logged inside a view")
    return HttpResponse("ok")


def together(request: HttpRequest) -> HttpResponse:
    who = request.GET["who"]
    selfreport.set_tag("who", who)
    barrier.wait()  # both requests are inside their views, with their tags set, at once
    raise RuntimeError(f"crash of {who}")


def own(request: HttpRequest) -> HttpResponse:
    seen.append(f"reporting={selfreport.is_reporting()}")
    raise RuntimeError("failed while ingesting our own report")


async def async_crash(request: HttpRequest) -> HttpResponse:
    seen.append(f"reporting={selfreport.is_reporting()}")
    raise KeyError("async view")


urlpatterns = [
    path("items/<int:pk>/crash", crash, name="item-crash"),
    path("logs", logs),
    path("together", together),
    path("own", own),
    path("async", async_crash),
    re_path(r"^legacy/(?P<pk>[0-9]+)$", crash),
]


@pytest.fixture
def events() -> Iterator[CapturedEvents]:
    seen.clear()
    with capture_events() as captured:
        yield captured


@pytest.fixture
def own_events() -> Iterator[CapturedEvents]:
    """Events of a client with a DSN: requests carrying its origin mark are its own reports."""
    seen.clear()
    with capture_events(dsn="http://public@127.0.0.1:9/42") as captured:
        yield captured


def own_header(events: CapturedEvents) -> dict[str, str]:
    assert events.client.dsn is not None
    return {"HTTP_" + ORIGIN_HEADER.upper().replace("-", "_"): origin_value(events.client.dsn)}


def client() -> Client:
    return Client(raise_request_exception=False)


def test_a_crash_is_reported_once_with_request_route_and_user(events: CapturedEvents) -> None:
    response = client().get(
        "/items/7/crash?password=hunter2&page=2", HTTP_X_TEST_USER="ada", **SECRETS
    )
    assert response.status_code == 500
    assert_one_crash_report(
        events,
        framework="django",
        url="http://testserver",
        route="/items/<int:pk>/crash",
        endpoint="item-crash",
    )


def test_a_regex_route_and_an_unnamed_view(events: CapturedEvents) -> None:
    client().get("/legacy/12")
    events.flush()
    (event,) = events
    assert event["transaction"] == "/legacy/(?P<pk>[0-9]+)$"
    assert event["tags"]["endpoint"] == f"{__name__}.crash"
    assert "user" not in event  # anonymous


def test_the_email_only_with_send_default_pii(events: CapturedEvents) -> None:
    with override_settings(SELFREPORT_SEND_DEFAULT_PII=True):
        client().get("/items/1/crash", HTTP_X_TEST_USER="grace")
    events.flush()
    assert events[0]["user"] == {"id": "5", "username": "grace", "email": "grace@example.com"}


def test_a_broken_user_model_leaves_the_user_out(events: CapturedEvents) -> None:
    client().get("/items/1/crash", HTTP_X_TEST_USER="broken")
    events.flush()
    assert len(events) == 1
    assert "user" not in events[0]


def test_a_logged_error_carries_its_request_and_the_user_only_once_loaded(
    events: CapturedEvents,
) -> None:
    assert client().get("/logs?token=abc", HTTP_X_TEST_USER="ada").status_code == 200
    assert client().get("/logs?touch=1", HTTP_X_TEST_USER="linus").status_code == 200
    events.flush()
    first, second = events
    assert first["logentry"]["message"] == "logged inside a view"
    assert first["request"]["url"] == "http://testserver/logs?token=[Filtered]"
    assert first["transaction"] == "/logs"
    assert "user" not in first  # the view never loaded it: no query on our account
    assert second["user"] == {"id": "5", "username": "linus"}
    assert events.client.stats()["dropped_duplicate"] == 0


def test_an_explicit_set_user_wins(events: CapturedEvents) -> None:
    request = RequestFactory().get("/logs")
    request.user = User(id=1, username="from-django")
    with selfreport.new_scope():
        selfreport.set_user({"id": "chosen"})
        middleware = SelfreportMiddleware(lambda r: logs(r))
        middleware(request)
    events.flush()
    assert events[0]["user"] == {"id": "chosen"}


def test_own_reports_run_in_the_reporting_path(own_events: CapturedEvents) -> None:
    assert client().get("/own", **own_header(own_events)).status_code == 500
    own_events.flush()
    assert seen == ["reporting=True"]
    assert len(own_events) == 0
    stats = own_events.client.stats()
    # The signal's report and django.request's record: both born in the path, both counted.
    assert stats["dropped_reentrant"] == 2
    assert stats["captured"] == 0


def test_the_signal_without_a_request_or_an_exception(events: CapturedEvents) -> None:
    SelfreportMiddleware(lambda r: HttpResponse())  # connects the receiver
    got_request_exception.send(sender=None)  # no exception being handled: nothing
    try:
        raise ValueError("outside any request")
    except ValueError:
        got_request_exception.send(sender=None)
    events.flush()
    (event,) = events
    assert "request" not in event
    assert event["exception"]["values"][-1]["mechanism"]["type"] == "django"


def test_a_request_without_auth_has_no_user() -> None:
    view = DjangoRequest(RequestFactory().get("/x"))
    assert view.user(load=True) is None
    assert view.info()["url"] == "http://testserver/x"


@pytest.mark.asyncio
async def test_async_requests_are_reported_once_with_request_and_user(
    events: CapturedEvents,
) -> None:
    response = await AsyncClient(raise_request_exception=False).get(
        "/async?api_key=k", headers={"X-Test-User": "ada"}
    )
    assert response.status_code == 500
    events.flush()
    assert seen == ["reporting=False"]
    (event,) = events
    assert event["transaction"] == "/async"
    assert event["request"]["url"] == "http://testserver/async?api_key=[Filtered]"
    assert event["user"] == {"id": "3", "username": "ada"}
    stats = events.client.stats()
    assert (stats["captured"], stats["dropped_duplicate"]) == (1, 1)


@pytest.mark.asyncio
async def test_async_own_reports_run_in_the_reporting_path(own_events: CapturedEvents) -> None:
    assert own_events.client.dsn is not None
    mark = {ORIGIN_HEADER: origin_value(own_events.client.dsn)}
    response = await AsyncClient(raise_request_exception=False).get("/async", headers=mark)
    assert response.status_code == 500
    own_events.flush()
    assert seen == ["reporting=True"]
    assert len(own_events) == 0
    assert own_events.client.stats()["dropped_reentrant"] == 2


# --- a real server on a real socket ---------------------------------------------------------


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def test_concurrent_requests_on_a_real_server_never_see_each_other(
    events: CapturedEvents,
) -> None:
    server = make_server(
        "127.0.0.1", 0, WSGIHandler(), server_class=ThreadingServer, handler_class=QuietHandler
    )
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


def test_importing_without_django_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "django.core.signals", None)
    monkeypatch.delitem(sys.modules, "selfreport.integrations.django")
    with pytest.raises(ImportError, match=r"selfreport\[django\]"):
        __import__("selfreport.integrations.django")


SETTINGS_AS_A_PROJECT_HAS_THEM = """
import json
import django
from django.conf import settings
from django.http import HttpResponse
from django.test import Client
from django.urls import path
import selfreport
from selfreport.testing import capture_events

def crash(request):
    raise LookupError("boom")

urlpatterns = [path("crash", crash)]

with capture_events() as events:  # selfreport set up first, in settings.py, as projects do
    settings.configure(
        DEBUG=False,
        SECRET_KEY="x",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["selfreport.integrations.django.SelfreportMiddleware"],
        **LOGGING,
    )
    django.setup()  # Django's own logging configuration runs here
    status = Client(raise_request_exception=False).get("/crash").status_code
    events.flush()
    stats = events.client.stats()
    print(json.dumps([status, len(events), stats["captured"], stats["dropped_duplicate"]]))
"""

DOCUMENTED_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {
        "console": {"class": "logging.StreamHandler"},
        "selfreport": {"class": "selfreport.LoggingHandler", "level": "ERROR"},
    },
    "root": {"handlers": ["console", "selfreport"], "level": "INFO"},
}


@pytest.mark.parametrize(
    "logging_settings",
    [{}, {"LOGGING": DOCUMENTED_LOGGING}],
    ids=["django-default-logging", "documented-LOGGING"],
)
def test_once_under_djangos_own_logging_configuration(logging_settings: dict[str, Any]) -> None:
    import json
    import subprocess

    script = f"LOGGING = {logging_settings!r}\n" + SETTINGS_AS_A_PROJECT_HAS_THEM
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    # 500; one event; the django.request record of the same crash seen and dropped as a duplicate
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [500, 1, 1, 1]
