"""Flask: an extension giving each request its scope, request data, user and route, and
reporting its crash once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from selfreport._core.processors import add_event_processor
from selfreport.integrations import (
    RequestView,
    describe_request,
    report_view_exception,
    requires,
    reset_request,
    set_request,
    user_info,
)
from selfreport.integrations.wsgi import SelfreportWSGIMiddleware, environ_headers, request_info

with requires(__name__, "Flask 3", "flask"):
    import flask
    from flask.signals import got_request_exception

try:  # optional: the user comes from flask_login when the application uses it
    import flask_login
except ImportError:  # pragma: no cover - flask_login is in the dev extra
    flask_login = None

if TYPE_CHECKING:
    from selfreport._client import Client

__all__ = ["FlaskRequest", "Selfreport"]

_TOKEN = "_selfreport_request_token"


class FlaskRequest(RequestView):
    """A Flask request (and its ``g``, where flask_login keeps the user) described for events."""

    __slots__ = ("g", "request", "send_default_pii")

    def __init__(self, request: Any, g: Any, send_default_pii: bool) -> None:
        self.request = request
        self.g = g
        self.send_default_pii = send_default_pii

    def info(self) -> dict[str, Any]:
        request = self.request
        info = request_info(request.environ, environ_headers(request.environ))
        rule = request.url_rule
        if rule is not None:  # the rule, not the path: one transaction for /items/1 and /2
            info["route"] = rule.rule
        if request.endpoint:
            info["endpoint"] = request.endpoint
        return info

    def user(self, load: bool) -> Optional[dict[str, Any]]:
        if flask_login is None:  # pragma: no cover - flask_login is in the dev extra
            return None
        try:
            if load:  # on the request's thread, in its context: flask_login loads it
                user = flask_login.current_user._get_current_object()
            else:  # only what flask_login already loaded into this request's ``g``
                user = getattr(self.g, "_login_user", None)
            if user is None or not user.is_authenticated:
                return None
            return user_info(
                user.get_id(),
                getattr(user, "username", None),
                getattr(user, "email", None),
                self.send_default_pii,
            )
        except Exception:  # no LoginManager on this app, or a broken user loader
            return None


class Selfreport:
    """The Flask extension::

        app = Flask(__name__)
        Selfreport(app)            # or: ext = Selfreport(); ext.init_app(app)

    - Every request runs in a :func:`selfreport.new_scope` (the app is wrapped in
      :class:`~selfreport.integrations.wsgi.SelfreportWSGIMiddleware`), and every event it
      reports (its crash, an error it logs) carries its method, URL and headers (credentials
      filtered), the URL rule as the transaction, the endpoint, and flask_login's
      ``current_user`` when flask_login is installed (id and username; the email too with
      ``send_default_pii=True``).
    - An unhandled exception is reported once, from Flask's ``got_request_exception`` signal;
      the ``app.logger`` record of the same exception (or, when Flask propagates exceptions in
      testing or debug mode, the WSGI middleware's report) is dropped as a duplicate, counted in
      ``stats()["dropped_duplicate"]``. Exceptions an error handler turns into a response are
      not reported, nor are HTTP errors (404, 405...).
    - A request carrying this process's own reports (:func:`selfreport.is_own_report`) runs
      inside :func:`selfreport.reporting_path`.

    ``client``: the selfreport client to report to; default: the global one.
    """

    def __init__(
        self,
        app: Optional[flask.Flask] = None,
        client: Optional[Client] = None,
        *,
        send_default_pii: bool = False,
    ) -> None:
        self.client = client
        self.send_default_pii = send_default_pii
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Set the extension up on ``app``; a second call for the same app does nothing."""
        if "selfreport" in app.extensions:
            return
        app.extensions["selfreport"] = self
        app.wsgi_app = SelfreportWSGIMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, client=self.client
        )
        # First of the app's hooks: what the others log (or a response they end the request
        # with early) happens with the request known.
        app.before_request_funcs.setdefault(None, []).insert(0, self._enter)
        app.teardown_request(self._leave)
        got_request_exception.connect(self._report, app, weak=False)
        add_event_processor(describe_request)

    def _view(self) -> FlaskRequest:
        return FlaskRequest(
            flask.request._get_current_object(),  # type: ignore[attr-defined]
            flask.g._get_current_object(),
            self.send_default_pii,
        )

    def _enter(self) -> None:
        setattr(flask.g, _TOKEN, set_request(self._view()))

    def _leave(self, error: Optional[BaseException]) -> None:
        token = flask.g.pop(_TOKEN, None)
        if token is not None:
            reset_request(token)

    def _report(self, sender: Any, exception: BaseException, **extra: Any) -> None:
        report_view_exception(exception, self._view(), mechanism="flask", client=self.client)
