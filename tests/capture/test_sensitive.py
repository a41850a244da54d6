"""The one list of secret-bearing names: the scrubber and the integrations' filters agree on it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfreport._capture import scrub
from selfreport._capture.scrub import Scrubber
from selfreport._capture.sensitive import (
    DEFAULT_DENY_SUBSTRINGS,
    DEFAULT_DENY_WORDS,
    FILTERED,
    is_sensitive_name,
)
from selfreport.integrations import filter_headers, filter_url, is_sensitive

NAMES = sorted(DEFAULT_DENY_SUBSTRINGS + DEFAULT_DENY_WORDS)


def test_one_filtered_marker_and_one_list() -> None:
    import selfreport.integrations as integrations

    assert integrations.FILTERED is scrub.FILTERED is FILTERED
    assert scrub.DEFAULT_DENY_SUBSTRINGS is DEFAULT_DENY_SUBSTRINGS
    assert scrub.DEFAULT_DENY_WORDS is DEFAULT_DENY_WORDS


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", ["{}", "X-{}", "{}_id", "My{}"])
def test_every_listed_name_is_filtered_by_both(name: str, shape: str) -> None:
    key = shape.format(name.capitalize() if shape == "My{}" else name)
    assert is_sensitive(key)
    assert filter_headers([(key, "v4lue"), ("Accept", "*/*")]) == {key: FILTERED, "Accept": "*/*"}
    assert filter_url(f"https://h/p?{key}=v4lue&q=1") == f"https://h/p?{key}={FILTERED}&q=1"
    scrubbed = Scrubber(typed_masks=False)({"extra": {key: "v4lue"}})
    assert scrubbed["extra"][key] == FILTERED


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789"))
def test_the_scrubber_and_the_integrations_decide_alike(name: str) -> None:
    assert is_sensitive(name) == is_sensitive_name(name) == Scrubber().is_sensitive_key(name)


@pytest.mark.parametrize("name", ["Accept", "Content-Type", "User-Agent", "Host", "page", "q"])
def test_ordinary_names_pass(name: str) -> None:
    assert not is_sensitive(name)
    assert filter_headers([(name, "v")]) == {name: "v"}
