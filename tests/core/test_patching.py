"""Reversible wrapt patches, including when someone else patches on top of ours."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import wrapt

from selfreport._core.patching import Patches


class Target:
    def greet(self, name: str) -> str:
        return f"hello {name}"

    def other(self) -> int:
        return 1


ORIGINAL_GREET = Target.__dict__["greet"]
ORIGINAL_OTHER = Target.__dict__["other"]


@pytest.fixture(autouse=True)
def _restore_target() -> Any:
    yield
    Target.greet = ORIGINAL_GREET  # type: ignore[method-assign]
    Target.other = ORIGINAL_OTHER  # type: ignore[method-assign]


def counting_wrapper(calls: list[str], tag: str) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        calls.append(tag)
        return wrapped(*args, **kwargs)

    return wrapper


def test_install_wraps_and_uninstall_restores_the_original() -> None:
    calls: list[str] = []
    patches = Patches(
        (Target, "greet", counting_wrapper(calls, "greet")),
        (Target, "other", counting_wrapper(calls, "other")),
    )
    assert not patches.installed
    patches.install()
    assert patches.installed
    assert Target().greet("ana") == "hello ana"
    assert Target().other() == 1
    assert calls == ["greet", "other"]
    patches.uninstall()
    assert not patches.installed
    assert Target.__dict__["greet"] is ORIGINAL_GREET
    assert Target.__dict__["other"] is ORIGINAL_OTHER
    Target().greet("bo")
    assert calls == ["greet", "other"]


def test_install_and_uninstall_are_idempotent() -> None:
    calls: list[str] = []
    patches = Patches((Target, "greet", counting_wrapper(calls, "ours")))
    patches.install()
    patches.install()
    Target().greet("x")
    assert calls == ["ours"]  # wrapped once, not twice
    patches.uninstall()
    patches.uninstall()
    assert Target.__dict__["greet"] is ORIGINAL_GREET


def test_a_patch_on_top_of_ours_survives_our_uninstall() -> None:
    calls: list[str] = []
    patches = Patches((Target, "greet", counting_wrapper(calls, "ours")))
    patches.install()
    theirs = wrapt.FunctionWrapper(Target.__dict__["greet"], counting_wrapper(calls, "theirs"))
    Target.greet = theirs  # type: ignore[method-assign]
    patches.uninstall()
    assert Target.__dict__["greet"] is theirs  # never cut the other library off
    Target().greet("x")
    assert calls == ["theirs", "ours"]  # ours stays in their chain


def test_reinstall_after_a_stuck_uninstall_does_not_wrap_twice() -> None:
    calls: list[str] = []
    patches = Patches((Target, "greet", counting_wrapper(calls, "ours")))
    patches.install()
    ours = Target.__dict__["greet"]
    theirs = wrapt.FunctionWrapper(ours, counting_wrapper(calls, "theirs"))
    Target.greet = theirs  # type: ignore[method-assign]
    patches.uninstall()
    patches.install()
    assert Target.__dict__["greet"] is theirs
    Target().greet("x")
    assert calls == ["theirs", "ours"]  # still one "ours"

    # They remove their patch, restoring ours: now we can remove ours cleanly.
    Target.greet = ours  # type: ignore[method-assign]
    patches.uninstall()
    assert Target.__dict__["greet"] is ORIGINAL_GREET


def test_reinstall_after_the_other_patch_removed_both() -> None:
    calls: list[str] = []
    patches = Patches((Target, "greet", counting_wrapper(calls, "ours")))
    patches.install()
    Target.greet = wrapt.FunctionWrapper(  # type: ignore[method-assign]
        Target.__dict__["greet"], counting_wrapper(calls, "theirs")
    )
    patches.uninstall()
    Target.greet = ORIGINAL_GREET  # type: ignore[method-assign]  # they restored the original
    patches.install()  # we are out of every chain, so we wrap again
    Target().greet("x")
    assert calls == ["ours"]
    patches.uninstall()
    assert Target.__dict__["greet"] is ORIGINAL_GREET


def test_install_reapplies_a_patch_someone_removed_behind_our_back() -> None:
    calls: list[str] = []
    patches = Patches((Target, "greet", counting_wrapper(calls, "ours")))
    patches.install()
    Target.greet = ORIGINAL_GREET  # type: ignore[method-assign]  # e.g. another library's undo
    assert Target().greet("a") == "hello a"
    assert calls == []
    patches.install()
    assert Target().greet("b") == "hello b"
    assert calls == ["ours"]


def test_install_keeps_our_patch_under_a_functools_wraps_patch() -> None:
    import functools

    calls: list[str] = []
    patches = Patches((Target, "greet", counting_wrapper(calls, "ours")))
    patches.install()
    ours = Target.__dict__["greet"]

    @functools.wraps(ours)
    def theirs(self: Target, name: str) -> str:
        calls.append("theirs")
        return ours(self, name)  # type: ignore[no-any-return]

    Target.greet = theirs  # type: ignore[method-assign]
    patches.install()  # ours is still reachable under theirs: not wrapped a second time
    assert Target().greet("c") == "hello c"
    assert calls == ["theirs", "ours"]


def test_replace_installs_a_plain_function() -> None:
    from selfreport._core.patching import Replace

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        def greet(self: Target, name: str) -> str:
            return "replaced " + original(self, name)

        return greet

    patches = Patches((Target, "greet", Replace(factory)))
    patches.install()
    assert not isinstance(Target.__dict__["greet"], wrapt.FunctionWrapper)
    assert Target().greet("d") == "replaced hello d"
    patches.uninstall()
    assert Target.__dict__["greet"] is ORIGINAL_GREET


def test_reinstall_under_a_plain_patch_on_top_does_not_wrap_twice() -> None:
    # The rule the exception hooks need too: a patch on top that does not say what it wraps is
    # taken to chain to ours, so a re-install reuses ours instead of wrapping theirs again.
    calls: list[str] = []
    patches = Patches((Target, "greet", counting_wrapper(calls, "ours")))
    patches.install()
    ours = Target.__dict__["greet"]

    def theirs(self: Target, name: str) -> str:
        calls.append("theirs")
        return ours(self, name)  # type: ignore[no-any-return]

    Target.greet = theirs  # type: ignore[method-assign]
    patches.uninstall()
    patches.install()
    assert Target.__dict__["greet"] is theirs
    assert patches.replaced(Target, "greet") is ORIGINAL_GREET
    assert Target().greet("d") == "hello d"
    assert calls == ["theirs", "ours"]  # one "ours"
    patches.uninstall()
    Target.greet = ORIGINAL_GREET  # type: ignore[method-assign]
    assert patches.replaced(Target, "greet") is ORIGINAL_GREET  # stuck in their chain
    patches.install()
    patches.uninstall()
    assert patches.replaced(Target, "greet") is None
