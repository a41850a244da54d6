"""Validating options: numbers in range, and the ``scrub`` option, with ConfigError naming them."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Union

from selfreport.exceptions import ConfigError

__all__ = ["Scrub", "check_level", "check_number", "resolve_scrub"]

Scrub = Callable[[dict[str, Any]], dict[str, Any]]


def check_number(
    name: str, value: object, low: float, high: float = math.inf, integer: bool = False
) -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"expected a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise ConfigError(name, f"expected a whole number, got {value!r}")
    if not (low <= value <= high) or value != value:
        raise ConfigError(name, f"must be between {low} and {high}, got {value!r}")


def resolve_scrub(scrub: Union[bool, Scrub, None], option: str = "scrub") -> Optional[Scrub]:
    """``True`` -> the default :class:`~selfreport.Scrubber`; a callable as is; off otherwise."""
    if scrub is None or scrub is False:
        return None
    if scrub is True:
        from selfreport._capture.scrub import (
            Scrubber,  # compiled patterns: loaded only when asked for
        )

        return Scrubber()
    if callable(scrub):
        return scrub
    raise ConfigError(option, "must be True, False, None or a callable taking the event")


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
