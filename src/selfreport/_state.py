"""The process-wide client: init(), close(), the root-logger handler, hooks, atexit and fork."""

from __future__ import annotations

import atexit
import difflib
import inspect
import logging
import threading
from typing import Any, Callable, Optional, Union

from ._capture import scope
from ._capture.hooks import Hooks
from ._client import Client
from ._core.fork import on_fork_child
from ._core.options import check_level
from .exceptions import ConfigError

__all__ = ["close", "current_client", "init", "root_handler", "set_client"]

_client: Optional[Client] = None
_handler: Optional[logging.Handler] = None
_lock = threading.RLock()


def current_client(client: Optional[Client] = None) -> Optional[Client]:
    """``client`` when one is given, else the global one made by :func:`selfreport.init`
    (None before it): how every handler, sink and hook finds the client it reports to."""
    return client if client is not None else _client


def set_client(client: Optional[Client]) -> Optional[Client]:
    """Make ``client`` the global one without touching hooks or handlers; returns the old one."""
    global _client
    with _lock:
        previous, _client = _client, client
    return previous


def _hook_capture(exc: BaseException, mechanism: str, context_meaningful: bool) -> None:
    client = current_client()
    if client is not None:
        client.capture_hooked(exc, mechanism, context_meaningful)


def root_handler() -> Optional[logging.Handler]:
    """The handler ``init()`` put on the root logger, if any (a framework may take it off)."""
    return _handler


def _count_reentrant_breadcrumb() -> None:
    client = current_client()
    if client is not None:
        client.drop_reentrant_breadcrumb()


def _hook_reentrant(what: str) -> None:
    client = current_client()
    if client is not None:
        client.drop_reentrant(what)


_hooks = Hooks(_hook_capture, _hook_reentrant)


def _check_level(level: Union[int, str, None]) -> Optional[int]:
    return check_level("logging_level", level)


def _check_option_names(options: dict[str, Any]) -> None:
    known = [name for name in inspect.signature(Client).parameters if name != "dsn"]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(name, f"is not an option of selfreport.init{hint}")


def _null_handler(level: int, breadcrumbs_level: Optional[int] = None) -> logging.Handler:
    return logging.NullHandler(level)


def init(
    dsn: Optional[str] = None,
    *,
    logging_level: Union[int, str, None] = logging.ERROR,
    install_hooks: bool = True,
    make_handler: Callable[..., logging.Handler] = _null_handler,
    **options: Any,
) -> Client:
    """Create the global client; a second call closes the previous one first.

    ``make_handler(level, breadcrumbs_level=...)`` makes the root-logger handler
    (selfreport.init passes its LoggingHandler, which looks the client up here: the
    dependency goes one way)."""
    global _handler
    # Every ConfigError comes before anything is replaced.
    level = _check_level(logging_level)
    _check_option_names(options)
    client = Client(dsn, **options)
    with _lock:
        previous = set_client(client)
        if previous is not None:
            previous.close(timeout=previous.shutdown_timeout)
        root = logging.getLogger()
        if _handler is not None:
            root.removeHandler(_handler)
            _handler = None
        if level is not None:
            _handler = make_handler(level, breadcrumbs_level=client.breadcrumbs_level)
            root.addHandler(_handler)
        scope.configure(client.max_breadcrumbs, _count_reentrant_breadcrumb)
        if install_hooks:
            _hooks.install()
            scope.install_propagation()  # after the hooks' patches, removed before them
        else:
            scope.uninstall_propagation()
            _hooks.uninstall()
    return client


def close(timeout: Optional[float] = None) -> None:
    """Flush (bounded by ``timeout``) and close the global client; remove handler and hooks."""
    global _handler
    with _lock:
        client = set_client(None)
        if _handler is not None:
            logging.getLogger().removeHandler(_handler)
            _handler = None
        scope.uninstall_propagation()
        _hooks.uninstall()
    if client is not None:
        client.close(timeout)


def _at_exit() -> None:
    client = current_client()
    if client is not None:
        client.close()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()


atexit.register(_at_exit)
on_fork_child(_after_fork_in_child)
