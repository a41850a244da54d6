"""Logging in, API tokens, CSRF, Origin and Host checks, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Callable, Optional

import httpx
import pytest

from selfreport.collector import auth
from selfreport.collector.accounts import hash_password, hash_secret
from selfreport.collector.auth import (
    AuthPolicy,
    LoginThrottle,
    _split_host,
    allowed_hosts,
    check_public_url,
    is_loopback,
)
from selfreport.collector.limits import LogThrottle
from selfreport.collector.server import CollectorServer
from selfreport.collector.storage import Storage

PASSWORD = "correct horse battery"
MakeServer = Callable[..., CollectorServer]


def with_user(server: CollectorServer, name: str = "alice", password: str = PASSWORD) -> None:
    server.storage.add_user(name, hash_password(password))


def with_throttle(
    server: CollectorServer, throttle: LoginThrottle, log_interval: float = 1.0
) -> AuthPolicy:
    """The server's login policy, with this throttle and failed-login lines this often."""
    policy = server.collector.auth
    assert policy is not None
    policy.throttle = throttle
    policy.failures_log = LogThrottle(interval=log_interval)
    return policy


def client(server: CollectorServer, **options: Any) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30, **options)


def csrf_of(page: str, form: str = "") -> str:
    """The CSRF token in the page's first form (or the one posting to ``form``)."""
    found = re.search(
        f'{form}[^<]*>\\s*<input type="hidden" name="csrf" value="([0-9a-f]{{64}})"', page
    )
    assert found is not None, page
    return found.group(1)


def log_in(
    http: httpx.Client, name: str = "alice", password: str = PASSWORD, next_: str = "/"
) -> httpx.Response:
    form = http.get("/login")
    assert form.status_code == 200
    return http.post(
        "/login",
        data={
            "csrf": csrf_of(form.text, 'action="/login"'),
            "name": name,
            "password": password,
            "next": next_,
        },
    )


def sessions(storage: Storage) -> int:
    with storage._reader() as conn:
        return int(conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])


def ingest(server: CollectorServer, headers: Optional[dict[str, str]] = None) -> httpx.Response:
    project = server.default_project
    auth = {"X-Sentry-Auth": f"Sentry sentry_key={project.public_key}"}
    return httpx.post(
        f"http://127.0.0.1:{server.port}/api/{project.id}/store/",
        content=json.dumps({"message": "hello"}).encode(),
        headers={**auth, **(headers or {})},
        timeout=30,
    )


READ_PATHS = ["/", "/projects", "/status", "/issues/1", "/api/0/issues/", "/api/0/projects/"]


def test_a_loopback_collector_is_open_until_a_user_exists(make_server: MakeServer) -> None:
    server = make_server()
    with client(server) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert "no user exists yet" in page.text  # the banner says it is open
        assert "Log out" not in page.text
        assert http.get("/api/0/issues/").status_code == 200
        assert http.get("/metrics").status_code == 200
        with_user(server)
        # From the next request on, without a restart: every read needs a login.
        for path in READ_PATHS:
            reply = http.get(path)
            if path.startswith("/api/"):
                assert reply.status_code == 401, path
                assert reply.headers["www-authenticate"] == 'Bearer realm="selfreport"'
                assert "Bearer" in reply.json()["detail"]
            else:
                assert reply.status_code == 303, path
                assert reply.headers["location"].startswith("/login?next=")
        assert http.get("/?q=x").headers["location"] == "/login?next=%2F%3Fq%3Dx"
        assert http.get("/", headers={"Accept": "application/json"}).status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200
    assert ingest(server).status_code == 200  # project keys, no login


def test_logging_in_and_out(make_server: MakeServer) -> None:
    server = make_server()
    with_user(server)
    with client(server) as http:
        form = http.get("/login?next=/projects")
        assert form.status_code == 200
        assert form.headers["cache-control"] == "no-store"
        login_cookie = form.headers["set-cookie"]
        assert "selfreport_login=" in login_cookie
        assert "httponly" in login_cookie.lower()
        assert 'name="next" value="/projects"' in form.text
        answer = http.post(
            "/login",
            data={
                "csrf": csrf_of(form.text),
                "name": "alice",
                "password": PASSWORD,
                "next": "/projects",
            },
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "/projects"
        cookie = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith("selfreport_session=")
        )
        attributes = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=lax", "path=/"} <= attributes
        assert "secure" not in attributes  # the public URL is http
        assert sessions(server.storage) == 1
        # The session id is not what the database keeps.
        session_id = http.cookies["selfreport_session"]
        with server.storage._reader() as conn:
            assert conn.execute("SELECT id_hash FROM sessions").fetchone()[0] == hash_secret(
                session_id
            )
        # Logging in again makes a new session and ends the one the browser had.
        assert log_in(http).status_code == 303
        assert sessions(server.storage) == 1
        assert http.cookies["selfreport_session"] != session_id
        with client(server) as replay:
            replay.cookies.set("selfreport_session", session_id)
            assert replay.get("/").status_code == 303
        session_id = http.cookies["selfreport_session"]
        page = http.get("/projects")
        assert page.status_code == 200
        assert "alice" in page.text
        assert "Log out" in page.text
        assert "no user exists yet" not in page.text
        assert http.get("/api/0/issues/").status_code == 200
        assert http.get("/metrics").status_code == 200
        # Logging out needs the page's CSRF token.
        assert http.post("/logout").status_code == 403
        assert http.post("/logout", data={"csrf": "0" * 64}).status_code == 403
        assert sessions(server.storage) == 1
        out = http.post("/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303
        assert out.headers["location"] == "/login"
        assert "max-age=0" in out.headers["set-cookie"].lower()
        assert sessions(server.storage) == 0
        http.cookies.set("selfreport_session", session_id)  # replaying the old cookie
        assert http.get("/").status_code == 303
        assert http.post("/logout").status_code == 303  # no session: nothing to end


def test_a_login_needs_the_forms_csrf_token_and_a_form(make_server: MakeServer) -> None:
    server = make_server()
    with_user(server)
    with client(server) as http:
        no_form = http.post("/login", data={"name": "alice", "password": PASSWORD})
        assert no_form.status_code == 403
        assert "The form expired" in no_form.text
        # A token made for another form's cookie does not fit this one.
        other = csrf_of(httpx.get(f"http://127.0.0.1:{server.port}/login").text)
        http.get("/login")
        wrong = http.post("/login", data={"csrf": other, "name": "alice", "password": PASSWORD})
        assert wrong.status_code == 403
        assert http.post("/login", content=b"{}").status_code == 400
        huge = http.post(
            "/login",
            content=b"a=" + b"x" * 20_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert huge.status_code == 400
        bad = http.post(
            "/login",
            content=b"\xff\xfe",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert bad.status_code == 400
    assert sessions(server.storage) == 0


def test_a_foreign_origin_cannot_change_state(make_server: MakeServer) -> None:
    server = make_server()
    with_user(server)
    with client(server) as http:
        assert log_in(http).status_code == 303
        page = http.get("/")
        token = csrf_of(page.text)
        for origin in ("http://127.0.0.1:9", "http://evil.example", "null"):
            refused = http.post("/logout", data={"csrf": token}, headers={"Origin": origin})
            assert refused.status_code == 403, origin
            assert refused.json()["detail"] == "cross-origin request refused"
        assert sessions(server.storage) == 1
        same = f"http://127.0.0.1:{server.port}"
        assert http.post("/logout", data={"csrf": token}, headers={"Origin": same}).is_redirect
    assert sessions(server.storage) == 0


def test_only_local_paths_are_followed_after_login(make_server: MakeServer) -> None:
    server = make_server()
    with_user(server)
    for wanted, landing in [
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("/issues/3?event=x", "/issues/3?event=x"),
    ]:
        with client(server) as http:
            assert log_in(http, next_=wanted).headers["location"] == landing
    with client(server) as http:
        assert log_in(http, password="x" * 5000).status_code == 401  # not even hashed


def test_wrong_passwords_are_logged_without_the_password_and_throttled(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server()
    with_user(server)
    # Every line (a flood's are rate-limited).
    with_throttle(server, LoginThrottle(per_user=3, per_address=4), log_interval=0)
    caplog.set_level(logging.INFO, logger="selfreport.collector")
    with client(server) as http:
        for attempt in range(3):
            wrong = log_in(http, password=f"guess-number-{attempt}")
            assert wrong.status_code == 401
            assert "Wrong name or password" in wrong.text
        # Past the limit, even the right password is refused (without hashing anything).
        throttled = log_in(http)
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) > 500
        # An unknown user is refused the same way, and counts against the address.
        assert log_in(http, name="mallory").status_code == 401
        assert log_in(http, name="bob").status_code == 429  # the address is at its limit
    assert sessions(server.storage) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("failed login for 'alice' from 127.0.0.1") == 3
    assert any("throttled" in m for m in messages)
    assert not any("guess-number" in m or PASSWORD in m for m in messages)


def test_api_tokens(make_server: MakeServer, api_token: Callable[..., dict[str, str]]) -> None:
    server = make_server()
    bearer = api_token(server, "ci")
    with client(server) as http:
        # Before any user exists too, a wrong token is an error, not an anonymous read.
        assert http.get("/api/0/issues/", headers={"Authorization": "Bearer nope"}).status_code
        assert (
            http.get("/api/0/issues/", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        with_user(server)
        assert http.get("/api/0/issues/", headers=bearer).status_code == 200
        assert http.get("/api/0/projects/", headers=bearer).status_code == 200
        assert http.get("/metrics", headers=bearer).status_code == 200
        assert http.get("/", headers=bearer).status_code == 200
        assert http.get("/api/0/issues/", headers={"Authorization": "Bearer"}).status_code == 401
        assert server.storage.revoke_token("ci")
        assert http.get("/api/0/issues/", headers=bearer).status_code == 401


def test_the_host_header_is_checked_except_for_ingestion_and_health(
    make_server: MakeServer,
) -> None:
    server = make_server(allowed_hosts=["errors.example.com"])
    with client(server) as http:
        for host in (
            "localhost",
            "LOCALHOST:8000",
            "127.0.0.1:1",
            "[::1]:80",
            "errors.example.com",
        ):
            assert http.get("/", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.2", "", "errors.example.co"):
            for path in ("/", "/api/0/issues/", "/login", "/metrics"):
                refused = http.get(path, headers={"Host": host})
                assert refused.status_code == 400, (host, path)
                assert "--allowed-host" in refused.text
        assert http.get("/health", headers={"Host": "evil.example"}).status_code == 200
    # Sentry SDKs may reach the collector by any name: ingestion is not Host-checked.
    assert ingest(server, {"Host": "collector.internal:9000"}).status_code == 200


def test_dsns_come_from_the_public_url_never_from_the_request(make_server: MakeServer) -> None:
    server = make_server(public_url="https://errors.example.com/", allowed_hosts=["*"])
    assert server.public_url == "https://errors.example.com"
    assert server.dsn().startswith("https://")
    assert server.dsn().endswith(f"@errors.example.com/{server.default_project.id}")
    with client(server) as http:
        page = http.get("/projects", headers={"Host": "rebound.example"})
        assert page.status_code == 200
        assert "rebound.example" not in page.text
        assert server.dsn() in page.text
        api = http.get("/api/0/projects/", headers={"Host": "rebound.example"}).json()
        assert next(p["dsn"] for p in api["projects"]) == server.dsn()
        # The public URL is https: cookies are Secure (so this plain-http client keeps none).
        assert "; secure" in http.get("/login").headers["set-cookie"].lower()


def test_cookies_are_secure_behind_https_and_the_origin_may_be_the_public_url(
    storage: Storage,
) -> None:
    policy = AuthPolicy(storage, public_url="https://errors.example.com", hosts=["*"])
    assert policy.secure_cookies
    assert policy.same_origin("https://errors.example.com", "127.0.0.1:8000")
    assert policy.same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert policy.same_origin(None, "127.0.0.1:8000")
    assert not policy.same_origin("https://127.0.0.1:8001", "127.0.0.1:8000")
    assert not policy.same_origin("ftp://127.0.0.1:8000", "127.0.0.1:8000")
    with pytest.raises(ValueError, match="login mode"):
        AuthPolicy(storage, mode="sometimes")


def test_metrics_can_be_public(make_server: MakeServer) -> None:
    server = make_server(metrics_public=True)
    with_user(server)
    with client(server) as http:
        assert http.get("/metrics").status_code == 200
        assert http.get("/api/0/status/").status_code == 401


def test_non_loopback_addresses_need_a_user(make_server: MakeServer, tmp_path: Any) -> None:
    from selfreport.exceptions import ConfigError

    with pytest.raises(ConfigError, match="no user exists"):
        CollectorServer(tmp_path / "refused", host="0.0.0.0", self_report=False)
    with pytest.raises(ConfigError, match="no user exists"):  # the forwarder is closed too
        CollectorServer(
            tmp_path / "refused",
            host="0.0.0.0",
            self_report=False,
            upstream="http://key@127.0.0.1:9/1",
        )
    with pytest.raises(ConfigError, match="login: must be one of"):
        CollectorServer(tmp_path / "refused", self_report=False, login="maybe")
    with pytest.raises(ConfigError, match="public_url: must be http"):
        CollectorServer(tmp_path / "refused", self_report=False, public_url="errors.example")
    with pytest.raises(ConfigError, match="cannot have a query"):
        CollectorServer(tmp_path / "refused", self_report=False, public_url="http://a/?x=1")
    storage = Storage(tmp_path / "users" / "selfreport.db")
    storage.add_user("alice", hash_password(PASSWORD))
    storage.close()
    server = CollectorServer(tmp_path / "users", host="0.0.0.0", self_report=False).start()
    try:
        assert server.login == "required"
        with client(server) as http:
            assert http.get("/").status_code == 303
    finally:
        server.stop()
    # --insecure-no-auth: open on any address, even with users, and says so on every page.
    off = make_server(host="0.0.0.0", login="off")
    with_user(off)
    with client(off) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert "--insecure-no-auth" in page.text
        login_page = http.get("/login")
        assert "No user exists yet" not in login_page.text


def test_login_mode_required_on_loopback(make_server: MakeServer) -> None:
    server = make_server(login="required")
    with client(server) as http:
        assert http.get("/").status_code == 303
        assert "No user exists yet" not in http.get("/login").text


def test_a_login_upgrades_a_hash_made_with_weaker_parameters(make_server: MakeServer) -> None:
    server = make_server()
    weak = hash_password(PASSWORD).split("$")
    import hashlib

    salt = bytes.fromhex(weak[4])
    key = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=2**10, r=8, p=1, dklen=32)
    server.storage.add_user("alice", f"scrypt${2**10}$8$1${salt.hex()}${key.hex()}")
    with client(server) as http:
        assert log_in(http).status_code == 303
    upgraded = server.storage.password_hash("alice")
    assert upgraded is not None
    assert upgraded.startswith("scrypt$16384$8$1$")
    assert sessions(server.storage) == 1  # the upgrade kept the session it was made for


def test_removing_a_user_or_changing_a_password_ends_their_sessions(
    make_server: MakeServer,
) -> None:
    server = make_server()
    with_user(server)
    with_user(server, "bob")
    with client(server) as alice, client(server) as bob:
        assert log_in(alice).status_code == 303
        assert log_in(bob, "bob").status_code == 303
        assert server.storage.set_password("alice", hash_password("another password"))
        assert alice.get("/").status_code == 303
        assert bob.get("/").status_code == 200
        assert server.storage.remove_user("bob")
        assert bob.get("/").status_code == 303
    assert sessions(server.storage) == 0
    assert not server.storage.remove_user("bob")
    assert not server.storage.set_password("bob", "x")


def test_sessions_expire(tmp_path: Any) -> None:
    now = [1000.0]
    storage = Storage(tmp_path / "s.db", clock=lambda: now[0])
    try:
        storage.add_user("alice", "scrypt$x")
        storage.create_session("a", "alice", expires=1010.0)
        assert storage.session_user("a") == "alice"
        now[0] = 1010.0
        assert storage.session_user("a") is None
        storage.create_session("b", "alice", expires=2000.0)  # deletes the expired one
        with storage._reader() as conn:
            assert [r[0] for r in conn.execute("SELECT id_hash FROM sessions")] == ["b"]
        assert storage.end_session("b")
        assert not storage.end_session("b")
        with pytest.raises(ValueError, match="already exists"):
            storage.add_user("alice", "scrypt$y")
        storage.add_token("t", "h")
        with pytest.raises(ValueError, match="already exists"):
            storage.add_token("t", "h2")
        assert [t.name for t in storage.tokens()] == ["t"]
        assert storage.token_name("h") == "t"
        # The CSRF secret is made once and kept.
        assert storage.auth_secret() == storage.auth_secret()
        assert len(storage.auth_secret()) == 32
    finally:
        storage.close()


def test_the_throttle_forgets_after_its_window_and_stays_bounded() -> None:
    now = [0.0]
    throttle = LoginThrottle(
        per_address=100, per_user=2, window=60, max_keys=4, clock=lambda: now[0]
    )
    assert throttle.reserve("1.2.3.4", "alice") == 0  # let through, counted already
    assert throttle.reserve("1.2.3.4", "alice") == 0
    assert throttle.reserve("5.6.7.8", "alice") == 60  # refused, and not counted
    now[0] = 30.0
    assert throttle.reserve("5.6.7.8", "alice") == 30
    now[0] = 60.0
    assert throttle.reserve("5.6.7.8", "alice") == 0  # the two old failures left the window
    throttle.release("5.6.7.8", "alice")  # never tried: taken back
    assert throttle.reserve("1.2.3.4", "alice") == 0
    throttle.succeeded("1.2.3.4", "alice")  # forgets the user's failures
    assert not throttle._failures["a:1.2.3.4"]  # the old two left the window, this one back
    assert "u:alice" not in throttle._failures
    for index in range(10):
        throttle.reserve(f"10.0.0.{index}", f"user{index}")
    assert len(throttle._failures) == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost.:8000", ("localhost", "8000")),
        ("[::1]", ("::1", None)),
        ("[::1]:8000", ("::1", "8000")),
        ("::1", ("::1", None)),
        ("example.com:", ("example.com", None)),
    ],
)
def test_host_values_are_split_into_name_and_port(
    value: str, expected: tuple[str, Optional[str]]
) -> None:
    assert _split_host(value) == expected


@pytest.mark.parametrize(
    "value", ["localhost:8000@evil.example", "localhost:80x", "[::1]:8000@evil", "[::1]evil", "a:١"]
)
def test_a_host_whose_port_is_not_digits_is_refused(value: str, storage: Storage) -> None:
    with pytest.raises(ValueError):
        _split_host(value)
    assert not AuthPolicy(storage).host_allowed(value)
    with pytest.raises(ValueError, match="bad allowed host"):
        AuthPolicy(storage, hosts=[value])


def test_a_default_port_in_the_public_url_is_the_origin_browsers_send(
    make_server: MakeServer, storage: Storage
) -> None:
    assert check_public_url("https://c.example.com:443/x/") == "https://c.example.com/x"
    assert check_public_url("http://C.example.com:80") == "http://c.example.com"
    assert check_public_url("http://c.example.com:443") == "http://c.example.com:443"
    for bad in (
        "https://c.example.com:44x",
        "https://c.example.com:99999",
        "https://u:p@c.example",
    ):
        with pytest.raises(ValueError):
            check_public_url(bad)
    policy = AuthPolicy(storage, public_url="https://c.example.com:443", hosts=["*"])
    assert policy.same_origin("https://c.example.com", "127.0.0.1:8000")
    assert policy.same_origin("https://c.example.com:443", "127.0.0.1:8000")
    assert not policy.same_origin("http://c.example.com", "127.0.0.1:8000")
    assert policy.same_origin("http://127.0.0.1", "127.0.0.1:80")
    assert not policy.same_origin("null", "127.0.0.1:8000")
    # Behind a proxy: the browser speaks to https://c.example.com, the proxy to us.
    server = make_server(public_url="http://c.example.com:80", allowed_hosts=["c.example.com"])
    with_user(server)
    with client(server, headers={"Host": "c.example.com"}) as http:
        form = http.get("/login")
        logged_in = http.post(
            "/login",
            headers={"Origin": "http://c.example.com"},
            data={
                "csrf": csrf_of(form.text, 'action="/login"'),
                "name": "alice",
                "password": PASSWORD,
            },
        )
        assert logged_in.status_code == 303, logged_in.text
        page = http.get("/projects")
        logged_out = http.post(
            "/logout",
            headers={"Origin": "http://c.example.com"},
            data={"csrf": csrf_of(page.text)},
        )
        assert logged_out.status_code == 303, logged_out.text
    assert sessions(server.storage) == 0


def test_a_flood_of_failed_logins_writes_a_bounded_number_of_lines(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server()
    with_user(server)
    # One line for the whole flood.
    policy = with_throttle(
        server, LoginThrottle(per_user=1000, per_address=1000), log_interval=3600
    )
    caplog.set_level(logging.INFO, logger="selfreport.collector")
    with client(server) as http:
        form = http.get("/login")
        data = {"csrf": csrf_of(form.text, 'action="/login"'), "name": "alice", "password": "nope"}
        for index in range(30):
            assert http.post("/login", data={**data, "name": f"user{index}"}).status_code == 401
    lines = [r.getMessage() for r in caplog.records if "failed login" in r.getMessage()]
    assert lines == ["failed login for 'user0' from 127.0.0.1"]
    assert policy.password_checks == 30


def slow_user(server: CollectorServer) -> None:
    """alice, with a costly hash (128 MiB, ~0.5 s): logins let through hash for a while."""
    slow = hash_password(PASSWORD).split("$")
    slow[1] = str(2**17)
    server.storage.add_user("alice", "$".join(slow))


def concurrent_logins(
    server: CollectorServer, attempts: int, done: Optional[list[str]] = None
) -> list[httpx.Response]:
    """``attempts`` wrong-password posts at once, all with one login form; with ``done``, a
    page is also asked for once the first answer is back, and the order noted in ``done``."""
    order = [] if done is None else done

    async def flood() -> list[httpx.Response]:
        base = f"http://127.0.0.1:{server.port}"
        limits = httpx.Limits(max_connections=attempts + 5)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
            form = await http.get("/login")
            data = {
                "csrf": csrf_of(form.text, 'action="/login"'),
                "name": "alice",
                "password": "wrong password",
            }

            async def attempt() -> httpx.Response:
                response = await http.post("/login", data=data)
                order.append("login")
                return response

            async def page() -> None:
                while not order:  # the flood is on (the first refusals are back)
                    await asyncio.sleep(0.01)
                assert (await http.get("/login")).status_code == 200
                order.append("page")

            logins = asyncio.gather(*[attempt() for _ in range(attempts)])
            if done is not None:
                await asyncio.gather(logins, page())
            return await logins

    return asyncio.run(flood())


def test_concurrent_wrong_passwords_hash_at_most_the_throttles_number(
    make_server: MakeServer,
) -> None:
    """A flood reusing one login form: the throttle counts each attempt before hashing, and
    waiting for a hashing slot takes no worker thread, so pages are served meanwhile."""
    server = make_server()
    slow_user(server)
    policy = with_throttle(server, LoginThrottle(per_user=6, per_address=1000))
    done: list[str] = []
    statuses = [response.status_code for response in concurrent_logins(server, 60, done)]
    assert sorted(statuses) == [401] * 6 + [429] * 54
    assert policy.password_checks == 6
    assert done.index("page") < len(done) - 1  # served while logins were still hashing


def test_logins_beyond_the_hashing_queue_get_503_and_their_attempt_back(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "HASHING_SLOTS", 1)
    monkeypatch.setattr(auth, "HASHING_QUEUE", 1)
    server = make_server()
    slow_user(server)
    policy = with_throttle(server, LoginThrottle(per_user=1000, per_address=1000))
    responses = concurrent_logins(server, 12)
    busy = [r for r in responses if r.status_code == 503]
    assert busy, [r.status_code for r in responses]
    assert all(r.headers["retry-after"] == "2" for r in busy)
    assert "Too many logins at once" in busy[0].text
    hashed = [r for r in responses if r.status_code == 401]
    assert len(hashed) + len(busy) == 12
    assert policy.password_checks == len(hashed)
    # Only the attempts that were hashed count against the name.
    assert len(policy.throttle._failures["u:alice"]) == len(hashed)


def test_allowed_hosts_by_default_and_with_ports(storage: Storage) -> None:
    assert allowed_hosts("127.0.0.1", "http://127.0.0.1:8000") == ["localhost", "127.0.0.1", "::1"]
    wildcard = allowed_hosts("0.0.0.0", "https://Errors.Example.com", ["extra.example"])
    assert wildcard[3:] == [
        __import__("socket").gethostname().lower(),
        "errors.example.com",
        "extra.example",
    ]
    policy = AuthPolicy(storage, hosts=["only.example:8443", "any.example"])
    assert policy.host_allowed("only.example:8443")
    assert not policy.host_allowed("only.example:8444")
    assert not policy.host_allowed("only.example")
    assert policy.host_allowed("any.example:1")
    assert is_loopback("127.0.0.5")
    assert is_loopback("[::1]")
    assert is_loopback("LOCALHOST")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("example.com")
    assert check_public_url(" https://a.example/sub/ ") == "https://a.example/sub"


def test_serve_says_at_start_who_may_read(tmp_path: Any) -> None:
    from selfreport.collector.server import _login_notice

    server = CollectorServer(tmp_path / "a", self_report=False)
    try:
        assert _login_notice(server).startswith("no user yet: the pages and the API are OPEN")
        with_user(server)
        assert _login_notice(server).startswith("the pages and the API need a login")
    finally:
        server.stop()
    server = CollectorServer(tmp_path / "b", self_report=False, login="off")
    try:
        assert _login_notice(server).startswith("login is OFF (--insecure-no-auth)")
    finally:
        server.stop()
