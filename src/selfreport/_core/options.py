"""Validating options: small checkers that raise ConfigError naming the option."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable
from typing import NoReturn, Optional, Union

from selfreport.exceptions import ConfigError

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_level",
    "check_number",
    "check_positive",
    "check_strings",
    "check_text",
]

# Every checker takes the option's name and, for options made of fields (statsd's host, port...),
# ``what``: the field, named at the start of the message ("statsd: port must be ...").


def _fail(name: str, what: str, problem: str) -> NoReturn:
    raise ConfigError(name, f"{what} {problem}" if what else problem)


def check_number(
    name: str,
    value: object,
    low: float,
    high: float = math.inf,
    integer: bool = False,
    *,
    what: str = "",
) -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, what, f"expected a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        _fail(name, what, f"expected a whole number, got {value!r}")
    if not (low <= value <= high) or value != value:
        bounds = f"between {low} and {high}" if high < math.inf else f">= {low}"
        _fail(name, what, f"must be {bounds}, got {value!r}")


def check_positive(name: str, value: object, *, what: str = "") -> None:
    """A number above zero (infinity included: "no limit")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        _fail(name, what, f"must be a number > 0, got {value!r}")


def check_bool(name: str, value: object, *, what: str = "") -> None:
    if not isinstance(value, bool):
        _fail(name, what, f"must be True or False, got {value!r}")


def check_choice(name: str, value: object, choices: Collection[str], *, what: str = "") -> None:
    if value not in choices:
        _fail(name, what, f"must be one of {tuple(choices)}, got {value!r}")


def check_callable(name: str, value: object, *, optional: bool = True, what: str = "") -> None:
    if not callable(value) and not (optional and value is None):
        _fail(name, what, "must be callable or None" if optional else "must be callable")


def check_text(
    name: str, value: object, *, optional: bool = False, nonempty: bool = False, what: str = ""
) -> None:
    """A string (or None when ``optional``); with ``nonempty``, not an empty one."""
    if value is None and optional:
        return
    if nonempty and (not isinstance(value, str) or not value):
        _fail(name, what, "must be a non-empty string")
    if not isinstance(value, str):
        expected = "a string or None" if optional else "a string"
        _fail(name, what, f"expected {expected}, got {type(value).__name__}")


def check_strings(name: str, values: object, *, what: str = "") -> list[str]:
    """A list of strings (any iterable of them but a single string); returns it as a list."""
    if isinstance(values, str):
        _fail(name, what, "must be a list of strings, not a single string")
    if not isinstance(values, Iterable):
        _fail(name, what, "must be a list of strings")
    items = list(values)
    for item in items:
        if not isinstance(item, str):
            _fail(name, what, f"must contain strings, got {type(item).__name__}")
    return items


def check_level(name: str, level: Union[int, str, None]) -> Optional[int]:
    """A logging level (``logging.INFO`` or ``"INFO"``) as a number, or None; else
    :class:`ConfigError` naming ``name``."""
    if level is None:
        return None
    if isinstance(level, str):
        value = logging.getLevelName(level.strip().upper())
        if isinstance(value, int):
            return value
    elif isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        return level
    raise ConfigError(name, f"expected a level such as logging.ERROR or 'ERROR', got {level!r}")
