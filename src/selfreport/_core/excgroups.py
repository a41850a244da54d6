"""Exception groups (PEP 654) on every Python: the builtin, or the ``exceptiongroup`` backport."""

from __future__ import annotations

import builtins
import sys
from typing import Optional

__all__ = ["first_leaf", "group_members"]

_BUILTIN: Optional[type] = getattr(builtins, "BaseExceptionGroup", None)


def _group_types() -> tuple[type, ...]:
    types = [_BUILTIN] if _BUILTIN is not None else []
    # On 3.9 and 3.10 groups come from the backport (anyio and trio raise them); it is looked
    # up, never imported: if the application has not loaded it, none of its groups exist.
    backport = sys.modules.get("exceptiongroup")
    backport_type = getattr(backport, "BaseExceptionGroup", None)
    if isinstance(backport_type, type) and backport_type is not _BUILTIN:
        types.append(backport_type)
    return tuple(types)


def group_members(exc: BaseException) -> Optional[tuple[BaseException, ...]]:
    """The members of ``exc`` if it is an exception group, else None."""
    types = _group_types()
    if not types or not isinstance(exc, types):
        return None
    members = getattr(exc, "exceptions", ())
    if not isinstance(members, tuple):
        return None
    return tuple(member for member in members if isinstance(member, BaseException))


def first_leaf(exc: BaseException) -> BaseException:
    """``exc``, or for a group its first member that is not a group (what Python prints first,
    and what names the issue): the error a group of one failure is about."""
    for _ in range(32):  # nesting a stranger's code may make deep
        members = group_members(exc)
        if not members:
            return exc
        exc = members[0]
    return exc
