"""The command line's own parsing: sizes for ``--max-storage``, numbers for the limits."""

from __future__ import annotations

import argparse

import pytest

from selfreport.cli import main, parse_size


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


@pytest.mark.parametrize(
    "text", ["9" * 400, "99999999999999999999999TiB", "8388608TiB", "9223372036854775808"]
)
def test_a_size_too_large_is_refused_not_overflowed(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is too large a size"):
        parse_size(text)


def test_the_largest_size_and_long_fractions_are_exact() -> None:
    assert parse_size("9223372036854775807") == 2**63 - 1
    assert parse_size("1." + "5" * 5000 + "KiB") == 1024 + 568


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-storage", "9" * 400],
        ["--header-timeout", "inf"],
        ["--body-timeout", "1e400"],
        ["--max-connections", "9" * 5000],
    ],
)
def test_absurd_numbers_are_one_line_and_exit_2(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from selfreport.collector import server

    # Numbers that parse start nothing: what serve would get is recorded, not served.
    monkeypatch.setattr(server, "serve", lambda **options: pytest.fail(f"accepted {argv}"))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"selfreport serve: error: argument {argv[0]}")
    assert len(err.splitlines()[-1]) < 200
