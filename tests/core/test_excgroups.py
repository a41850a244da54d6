"""Exception groups found on every Python: the builtin, and the backport when it is loaded."""

from __future__ import annotations

import sys
import types

import pytest

from selfreport._core.excgroups import group_members


class BackportGroup(BaseException):
    """The shape of ``exceptiongroup.BaseExceptionGroup`` (what anyio raises on 3.9 and 3.10)."""

    def __init__(self, message: str, exceptions: list[BaseException]) -> None:
        super().__init__(message, exceptions)
        self.message = message
        self.exceptions = tuple(exceptions)


def test_backport_groups_are_seen_once_the_backport_is_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    members = [ValueError("a"), KeyError("b")]
    group = BackportGroup("g", members)
    monkeypatch.delitem(sys.modules, "exceptiongroup", raising=False)
    assert group_members(group) is None  # not loaded: no such groups exist
    backport = types.ModuleType("exceptiongroup")
    backport.BaseExceptionGroup = BackportGroup  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exceptiongroup", backport)
    assert group_members(group) == tuple(members)


def test_plain_exceptions_have_no_members() -> None:
    assert group_members(ValueError("plain")) is None


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is a builtin from 3.11")
def test_builtin_groups_have_their_members() -> None:
    members = [ValueError("a"), OSError("b")]
    group = ExceptionGroup("g", members)  # type: ignore[name-defined]  # noqa: F821
    assert group_members(group) == tuple(members)
