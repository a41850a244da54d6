"""`selfreport serve`'s options reach server.serve() as its keyword arguments."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from selfreport.cli import main
from selfreport.collector import server
from selfreport.collector.limits import HttpLimits


def test_every_serve_option_is_a_keyword_of_server_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    signature = inspect.signature(server.serve)
    seen: dict[str, Any] = {}

    def serve(**options: Any) -> int:
        seen.update(options)
        return 0

    monkeypatch.setattr(server, "serve", serve)
    argv = ["serve", "--data", "d", "--spool", "s", "--allowed-host", "a", "--allowed-host", "b"]
    assert main([*argv, "--max-connections", "7", "--body-timeout", "2.5"]) == 0
    signature.bind(**seen)  # a TypeError if an option has no keyword argument of that name
    assert (seen["data_dir"], seen["spool_dir"], seen["allowed_hosts"]) == ("d", "s", ["a", "b"])
    assert seen["limits"] == HttpLimits(max_connections=7, body_timeout=2.5)
