"""``selfreport alerts check`` and ``selfreport alerts test``: a configuration checked, tried."""

from __future__ import annotations

import sys
from typing import Optional, TextIO

from selfreport._core.guard import reporting_path
from selfreport.collector.alerting.config import (
    CONFIG_ENV,
    ConfigError,
    config_path,
    describe,
    load_config,
)
from selfreport.collector.alerting.model import NotifyError
from selfreport.collector.alerting.notifiers import build_notifier, make_test_notification

__all__ = ["alerts_command"]


def alerts_command(
    action: str,
    path: Optional[str],
    name: str = "",
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> int:
    """``check`` (validate, print a summary) or ``test`` (one test notification through
    ``name``). Exit codes: 0 fine, 1 the notifier could not deliver, 2 bad usage or config."""
    out, err = out or sys.stdout, err or sys.stderr
    path = config_path(path)
    if path is None:
        print(f"selfreport: no configuration: pass --config PATH or set {CONFIG_ENV}", file=err)
        return 2
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"selfreport: {exc}", file=err)
        return 2
    if action == "check":
        print("\n".join(describe(config)), file=out)
        return 0
    notifier_config = config.notifier(name)
    if notifier_config is None:
        known = ", ".join(repr(n.name) for n in config.notifiers) or "none"
        print(f"selfreport: {path}: no notifier called {name!r} (known: {known})", file=err)
        return 2
    notifier = build_notifier(notifier_config)
    try:
        with reporting_path():  # as the outbox sends: nothing here is reported as an event
            notifier.send(make_test_notification(name), notifier_config.timeout)
    except NotifyError as exc:
        print(f"selfreport: {name!r} ({notifier.kind}) could not deliver: {exc}", file=err)
        return 1
    print(f"selfreport: sent a test notification through {name!r} ({notifier.kind})", file=out)
    return 0
