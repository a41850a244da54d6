"""The one error hierarchy of selfreport: everything it raises derives from SelfreportError."""

from __future__ import annotations

__all__ = ["ConfigError", "SelfreportError"]


class SelfreportError(Exception):
    """Base class of every error selfreport raises on purpose."""


class ConfigError(SelfreportError, ValueError):
    """A DSN or option is malformed; the message names the offending part.

    ``option`` is the name of the offending option (``"dsn"``, ``"sample_rate"``, ...).
    """

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"{option}: {message}")
