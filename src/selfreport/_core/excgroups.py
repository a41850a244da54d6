"""Exception groups (PEP 654) on every Python: the builtin, or the ``exceptiongroup`` backport."""

from __future__ import annotations

import builtins
import sys
from typing import Optional

__all__ = ["BUILTIN_GROUP", "first_leaf", "group_members"]

# On 3.11+ every group is an instance of the builtin (the backport re-exports it there): an
# exception that is not one is no group, one isinstance on the hot path, no call. None before 3.11.
BUILTIN_GROUP: Optional[type] = getattr(builtins, "BaseExceptionGroup", None)


def _backport_group(exc: BaseException) -> bool:
    # On 3.9 and 3.10 groups come from the backport (anyio and trio raise them); it is looked
    # up, never imported: if the application has not loaded it, none of its groups exist.
    backport_type = getattr(sys.modules["exceptiongroup"], "BaseExceptionGroup", None)
    return isinstance(backport_type, type) and isinstance(exc, backport_type)


def group_members(exc: BaseException) -> Optional[tuple[BaseException, ...]]:
    """The members of ``exc`` if it is an exception group, else None (called on every
    capture: an exception that is not a group costs one isinstance and one dict lookup)."""
    if not (
        (BUILTIN_GROUP is not None and isinstance(exc, BUILTIN_GROUP))
        or ("exceptiongroup" in sys.modules and _backport_group(exc))
    ):
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
