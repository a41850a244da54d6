"""Fixtures for whole-process scenarios: a real collector endpoint and a clean global client."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

import selfreport
from selfreport.testing import FakeCollector


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean_selfreport() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    selfreport.close(timeout=2.0)
    root.setLevel(level)
    root.handlers[:] = handlers
