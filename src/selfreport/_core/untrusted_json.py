"""Parsing JSON a stranger sent: bounded nesting depth, lone surrogates replaced with U+FFFD."""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Union

__all__ = ["MAX_DEPTH", "JSONDepthError", "check_depth", "loads", "parse", "repair_surrogates"]

# serde_json's limit, so what Relay accepts the collector accepts; SDKs stop at about 10.
MAX_DEPTH = 128

# Everything but brackets and quotes is dropped before the depth is measured (in C, not per byte).
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_STRING = re.compile(rb'"[^"]*"')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
# Every byte but brackets and what escaped surrogates are made of, dropped by parse's check.
_NOT_CHECKED = bytes(b for b in range(256) if b not in b"[{\\udD")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# An escaped backslash, a valid surrogate pair, or a lone surrogate: scanning left to right,
# escaped backslashes are consumed first so that `\\ud800` (a backslash, then text) is kept.
_ESCAPES = re.compile(
    r"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)


class JSONDepthError(ValueError):
    """The JSON is nested deeper than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"JSON nested deeper than {limit} levels")
        self.limit = limit


def check_depth(data: Union[bytes, str], limit: int = MAX_DEPTH) -> None:
    """Raise :class:`JSONDepthError` when the JSON text ``data`` nests deeper than ``limit``.

    No Python code per byte (counts, replaces, translate): documents with fewer brackets than
    the limit cost two ``count`` calls; others a few copies of their brackets, one per level.
    """
    if isinstance(data, str):
        if data.count("[") + data.count("{") <= limit:
            return
        raw = data.encode("utf-8", "surrogatepass")
    elif data.count(b"[") + data.count(b"{") <= limit:
        return
    else:
        raw = data
    # Escaped backslashes and quotes first, so what remains of each string is "...".
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = raw.translate(_BRACKETS, _NOT_STRUCTURE)  # only [, ] and quotes are left
    if b'"' in skeleton:
        skeleton = skeleton.replace(b'""', b"")  # strings without brackets: nearly all
        if b'"' in skeleton:
            skeleton = _STRING.sub(b"", skeleton)
    # Each pass removes the innermost level (one scan: only the leaves there before it).
    too_deep = b"[" * (limit + 1)
    for _ in range(limit):
        if not skeleton:
            return
        if too_deep in skeleton:
            break
        shorter = skeleton.replace(b"[]", b"")
        if len(shorter) == len(skeleton):
            return  # unbalanced: not JSON, which the parser will say better
        skeleton = shorter
    if skeleton:
        raise JSONDepthError(limit)


def _repair(match: re.Match[str]) -> str:
    text = match.group()
    return text if len(text) != 6 else "\\ufffd"


def repair_surrogates(text: str) -> str:
    """``text`` (JSON) with every escaped lone surrogate (``"\\ud800"``) made ``"\\ufffd"``.

    Browsers produce them when they cut a string in the middle of an emoji; they cannot be
    encoded as UTF-8, so Relay replaces them, and so does this.
    """
    # Most texts have no backslash at all (a memchr); the others, rarely a surrogate escape.
    if "\\" not in text or _SURROGATE_ESCAPE.search(text) is None:
        return text
    return _ESCAPES.sub(_repair, text)


_DECODERS: dict[Optional[Callable[[str], Any]], json.JSONDecoder] = {}
_PLAIN = json.JSONDecoder()


def _decoder(parse_constant: Optional[Callable[[str], Any]]) -> json.JSONDecoder:
    """A decoder per ``parse_constant``, made once: ``json.loads`` makes one per call."""
    decoder = _DECODERS.get(parse_constant)
    if decoder is None:
        if len(_DECODERS) >= 16:  # callers pass module-level functions; never grows unbounded
            _DECODERS.clear()
        decoder = _DECODERS[parse_constant] = json.JSONDecoder(parse_constant=parse_constant)
    return decoder


def parse(
    data: Union[bytes, str],
    *,
    max_depth: int = MAX_DEPTH,
    parse_constant: Optional[Callable[[str], Any]] = None,
    repair: bool = True,
) -> tuple[str, Any]:
    """The text of ``data`` with its lone surrogates replaced (unless not ``repair``), and its
    value: :func:`loads`, for a caller that keeps the text too."""
    if isinstance(data, bytes):
        raw, text = data, data.decode("utf-8")
    else:
        raw, text = data.encode("utf-8", "surrogatepass"), data
    deep = False
    if len(raw) <= 2 * max_depth + 1:  # too short to nest deeper (a level takes two bytes)
        if repair and "\\" in text:  # (the common case without a call)
            text = repair_surrogates(text)
    else:
        # One pass in C keeps what both checks need: the brackets (a bound on the depth) and
        # what an escaped surrogate starts with (a backslash, "u", then "d" or "D", adjacent).
        kept = raw.translate(None, _NOT_CHECKED)
        deep = kept.count(b"[") + kept.count(b"{") > max_depth
        # (find, not "in": bytes.__contains__ first tries the needle as an int, and formats
        # the TypeError it then clears, at each call.)
        if repair and (kept.find(b"\\ud") >= 0 or kept.find(b"\\uD") >= 0):
            text = repair_surrogates(text)
    try:
        if text.startswith("\ufeff"):  # json.loads refuses it, saying why
            json.loads(text)
        decoder = _PLAIN if parse_constant is None else _decoder(parse_constant)
        value = decoder.decode(text)
    except RecursionError:  # nested hundreds deep: refused by the parser, quickly
        raise JSONDepthError(max_depth) from None
    # After parsing: what is nested too deep for the parser never costs a depth check.
    if deep:
        check_depth(raw, max_depth)
    return text, value


def loads(
    data: Union[bytes, str],
    *,
    max_depth: int = MAX_DEPTH,
    parse_constant: Optional[Callable[[str], Any]] = None,
    repair: bool = True,
) -> Any:
    """``json.loads`` for untrusted input: depth limited, lone surrogates replaced
    (``repair=False``: left as they are).

    Raises ``ValueError`` (:class:`JSONDepthError`, ``json.JSONDecodeError``) or
    ``UnicodeDecodeError`` (itself a ``ValueError``).
    """
    return parse(data, max_depth=max_depth, parse_constant=parse_constant, repair=repair)[1]
