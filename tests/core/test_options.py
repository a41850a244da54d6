"""The option checkers: each raises ConfigError naming the option (and the field, if any)."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest

from selfreport._core.options import (
    check_bool,
    check_callable,
    check_choice,
    check_number,
    check_positive,
    check_strings,
    check_text,
)
from selfreport.exceptions import ConfigError

BAD: list[tuple[Callable[[], Any], str]] = [
    (lambda: check_number("n", "1", 0), "n: expected a number, got str"),
    (lambda: check_number("n", True, 0), "n: expected a number, got bool"),
    (lambda: check_number("n", 1.5, 0, integer=True), "n: expected a whole number, got 1.5"),
    (lambda: check_number("n", 2, 0, 1), "n: must be between 0 and 1, got 2"),
    (lambda: check_number("n", math.nan, 0), "n: must be >= 0, got nan"),
    (lambda: check_number("s", 0, 1, 9, what="port"), "s: port must be between 1 and 9, got 0"),
    (lambda: check_positive("p", 0), "p: must be a number > 0, got 0"),
    (lambda: check_positive("p", math.nan), "p: must be a number > 0, got nan"),
    (lambda: check_positive("p", "1"), "p: must be a number > 0, got '1'"),
    (lambda: check_bool("b", 1), "b: must be True or False, got 1"),
    (lambda: check_choice("c", "x", ("a", "b")), "c: must be one of ('a', 'b'), got 'x'"),
    (lambda: check_callable("f", 3), "f: must be callable or None"),
    (lambda: check_callable("f", None, optional=False), "f: must be callable"),
    (lambda: check_text("t", 3), "t: expected a string, got int"),
    (lambda: check_text("t", 3, optional=True), "t: expected a string or None, got int"),
    (lambda: check_text("t", "", nonempty=True), "t: must be a non-empty string"),
    (lambda: check_text("t", None, nonempty=True), "t: must be a non-empty string"),
    (lambda: check_strings("l", "ab"), "l: must be a list of strings, not a single string"),
    (lambda: check_strings("l", 5), "l: must be a list of strings"),
    (lambda: check_strings("l", ["a", 1]), "l: must contain strings, got int"),
]


@pytest.mark.parametrize(("check", "message"), BAD)
def test_bad_values_raise_config_error_naming_the_option(
    check: Callable[[], Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check()
    assert str(info.value) == message
    assert info.value.option == message.split(":")[0]


def test_good_values_pass() -> None:
    check_number("n", 0, 0, 1)
    check_number("n", 7, 1, integer=True)
    check_positive("p", math.inf)
    check_bool("b", False)
    check_choice("c", "a", ("a", "b"))
    check_callable("f", None)
    check_callable("f", len, optional=False)
    check_text("t", None, optional=True)
    check_text("t", "x", nonempty=True)
    assert check_strings("l", ("a", "b")) == ["a", "b"]
    assert check_strings("l", iter(["c"])) == ["c"]
