"""The command line's own parsing: sizes for ``--max-storage``."""

from __future__ import annotations

import argparse

import pytest

from selfreport.cli import parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000000", 1_000_000),
        ("3b", 3),
        ("7KB", 7000),
        ("500MB", 500 * 10**6),
        ("10GB", 10 * 10**9),
        ("1.5G", 15 * 10**8),
        ("2GiB", 2 * 2**30),
        ("12 kib", 12 * 1024),
        ("1T", 10**12),
        (" 64Mi ", 64 * 2**20),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "ib", "5 XB", "-1MB", "1e9", "2 GB B"])
def test_what_is_not_a_size_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size like 500MB"):
        parse_size(text)
