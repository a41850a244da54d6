"""The collector's fixtures (a real server on 127.0.0.1), shared with tests/collector."""

from __future__ import annotations

from tests.collector.conftest import envelope_fixture, make_event_fixture, make_server

__all__ = ["envelope_fixture", "make_event_fixture", "make_server"]
