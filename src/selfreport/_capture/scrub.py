"""Removing secrets and personal data from events: sensitive keys, value patterns, custom rules."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union
from urllib.parse import quote, unquote_plus

from selfreport._capture.sensitive import (
    DEFAULT_DENY_SUBSTRINGS,
    DEFAULT_DENY_WORDS,
    FILTERED,
    compact_key,
    matches_deny_lists,
)
from selfreport._core.options import check_number, check_strings, check_text
from selfreport.exceptions import ConfigError

__all__ = [
    "DEFAULT_DENY_SUBSTRINGS",
    "DEFAULT_DENY_WORDS",
    "FILTERED",
    "RULE_NAMES",
    "Scrubber",
]

Event = dict[str, Any]
Replacement = Union[str, Callable[["re.Match[str]"], str]]
Handler = Callable[[Any, "_Walk", int], Any]

TRUNCATED = "[Truncated]"

# Relay's rule for values: a string mentioning one of these is removed as a whole.
_VALUE_KEYWORD = re.compile(
    r"(?i)password|passwd|passphrase|secret|api[-_]?key|auth|credential|mysql_pwd"
    r"|private[-_]?key|token\S*[:=]|^otp$|^two[-_]factor$"
)

# --- value patterns ------------------------------------------------------------------------
# Every quantifier is bounded and every pattern starts at a boundary, so scanning stays linear
# in the length of the text (no catastrophic backtracking on hostile input).

_PEM = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]{1,20} ){0,4}(?:PRIVATE|PUBLIC) KEY(?: BLOCK)?)-----"
    r"(.*?)(?:-----END [A-Z0-9 ]{1,60}-----|\Z)",
    re.S,
)
_URL_AUTH = re.compile(r"(?i)((?:\b[a-z][a-z0-9+.-]{0,30}:)?//)([^\s/?#\"'<>]{1,512})@")
_BEARER = re.compile(r"(?i)\b(bearer[ \t]{1,5})([^\s\"',;]{1,4096})")
_BASIC = re.compile(r"(?i)\b(basic[ \t]{1,5})([A-Za-z0-9+/]{6,4096}={0,2})")
_KNOWN_TOKENS = re.compile(
    r"\beyJ[A-Za-z0-9_-]{5,4096}\.[A-Za-z0-9_-]{5,4096}\.[A-Za-z0-9_-]{0,4096}"  # JWT
    r"|\b(?:gh[pousr]|github_pat)_[A-Za-z0-9_]{20,255}"  # GitHub
    r"|\bglpat-[A-Za-z0-9_-]{20,64}"  # GitLab
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,255}"  # Slack
    r"|\b[rsp]k_(?:live|test)_[A-Za-z0-9]{10,255}"  # Stripe
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|\bsk-[A-Za-z0-9_-]{20,255}"  # OpenAI-style secret keys
    r"|\bsntry[su]_[A-Za-z0-9+/=_-]{20,512}"  # Sentry auth tokens
    r"|\bnpm_[A-Za-z0-9]{36}"  # npm
)
# "key=value", "key: value", "key is value", "key value" (the last only for secret-looking
# values); whether the key is sensitive is decided by the same rules as for dict keys.
_KEY_VALUE = re.compile(
    r"(?<![\w.-])([A-Za-z_][\w.-]{0,63})"
    r"(?:([\"']?[ \t]{0,5}(?:=>|[:=])[ \t]{0,5})|([ \t]{1,5}(?:is|was)[ \t]{1,5})|([ \t]{1,5}))"
)
_UNQUOTED_VALUE = re.compile(r"[^\s\"'&;,<>(){}\[\]]{1,1024}")
# Keys whose "key is value" always introduces a secret ("my password is swordfish").
_STRONG_KEY = re.compile(r"(?i)pass|pwd|secret|token|api[-_]?key|private|credential|pin\b")
_LINE_VALUE = re.compile(r"[^\r\n]{1,4096}")
_SECRET_LOOKING = re.compile(r"[^\s\"',;]{4,256}")
_EMAIL = re.compile(
    r"(?<![\w.!#$%&'*+/=?^`{|}~-])[\w.!#$%&'*+/=?^`{|}~-]{1,64}"
    r"@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}\b"
)
# Groups are separated by exactly one character, so there is one way to split a run.
_DIGIT_RUN = re.compile(r"(?<!\w)\d{1,19}(?:[ -]\d{1,19})*(?!\w)")
_IBAN = re.compile(r"(?i)(?<!\w)[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?!\w)")
_SSN = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(?:25[0-5]|2[0-4]\d|[01]?\d\d?)\b")
_IPV6 = re.compile(
    r"(?i)(?<![\w:.])(?:[0-9a-f]{0,4}:){2,7}(?:[0-9a-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
    r"(?:%[\w.-]{1,32})?(?![\w:])"
)
_USER_PATH = re.compile(
    r"(?i)(?:\b(?:[a-z]:[\\/]{1,2})?(?:users|home|documents and settings"
    r"|[^/\\\r\n]{1,64}[\\/]profiles)[\\/]{1,2}|/(?:home|users)/)"
    # Windows forbids these in user names; spaces are allowed there, so they are kept.
    r"([^/\\\r\n\x00\"'\[\]:;|=,+*?<>]{1,255})"
)
_HAS_DIGIT = re.compile(r"\d")
_MASK = re.compile(r"\[[\w -]{1,32}\]")
_FORM_ENCODED = re.compile(
    r"[^\s=&]{1,256}=[^\s&]{0,4096}(?:&[^\s=&]{1,256}=[^\s&]{0,4096}){0,500}"
)

# Relay's IBAN country list, for matching IBAN-shaped text when checksums are not verified.
_IBAN_COUNTRIES = frozenset(
    re.findall(
        "[A-Z]{2}",
        "AD AE AL AO AT AZ BA BE BF BG BH BI BJ BR BY CF CG CH CI CM CR CV CY CZ DE DJ DK DO DZ EE "
        "EG ES FI FO FR GA GB GE GI GL GQ GR GT GW HN HR HU IE IL IQ IR IS IT JO KM KW KZ LB LC LI "
        "LT LU LV LY MA MC MD ME MG MK ML MR MT MU MZ NE NI NL NO PK PL PS PT QA RO RS RU SA SC SE "
        "SI SK SM SN ST SV TD TG TL TN TR UA VA VG XK",
    )
)

RULE_NAMES = frozenset(
    {
        "keys",  # values under sensitive keys
        "values",  # whole values that mention a password-like keyword (Relay's rule)
        "keyvalue",  # "password=..." inside text
        "pemkey",
        "urlauth",
        "bearer",
        "tokens",  # well-known token formats (JWT, GitHub, AWS, Slack, Stripe, ...)
        "email",
        "creditcard",
        "iban",
        "ssn",
        "ip",
        "userpath",
        "user",  # user.ip_address/geo removed, user.email/username/name masked
        "cookies",  # every cookie value
        "propagate",  # a value filtered somewhere is removed from every other string too
    }
)

# Event fields that hold no user data and whose format the schema fixes.
_SCALAR_FIELDS = frozenset(
    {
        "event_id",
        "timestamp",
        "start_timestamp",
        "received",
        "level",
        "platform",
        "type",
        "version",
    }
)
# Event fields written by developers or the SDK (names, versions): patterns, never dropped.
_TEXT_FIELDS = frozenset({"logger", "release", "dist", "environment", "transaction", "culprit"})
_FRAME_TEXT = frozenset(
    {
        "filename",
        "abs_path",
        "module",
        "function",
        "raw_function",
        "package",
        "symbol",
        "platform",
        "context_line",
    }
)
_FRAME_SCALAR = frozenset(
    {
        "lineno",
        "colno",
        "in_app",
        "instruction_addr",
        "symbol_addr",
        "image_addr",
        "addr_mode",
        "function_id",
        "stack_start",
        "trust",
    }
)
_NOT_SECRETS = frozenset({"none", "null", "true", "false", "undefined", "nan"})
_MIN_PROPAGATED = 5
_MAX_PROPAGATED = 256


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn checksum of payment card numbers."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """Whether ``text`` (no spaces) passes the ISO 13616 mod-97 check of IBANs."""
    text = text.upper()
    if not 15 <= len(text) <= 34 or not text[:2].isalpha() or not text[2:4].isdigit():
        return False
    moved = text[4:] + text[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in moved))
    except ValueError:  # pragma: no cover - the pattern admits only letters and digits
        return False
    return number % 97 == 1


def _big_int(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # more digits than int-to-str conversion allows
        return f"<int of {value.bit_length()} bits>"


def _safe_text(value: object) -> str:
    try:
        return str(value)
    except BaseException as exc:
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"


def _literal(text: str) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        return text

    return replace


class _Drop:
    """Marker: leave the field out of the scrubbed event."""


_DROP = _Drop()


def _drop(value: Any, walk: Any, depth: int) -> Any:
    return _DROP


class _Walk:
    """Per-event state: the containers on the current path, a node budget, filtered values."""

    __slots__ = ("ancestors", "nodes", "secrets")

    def __init__(self) -> None:
        self.ancestors: set[int] = set()
        self.nodes = 0
        self.secrets: set[str] = set()


class Scrubber:
    """Removes secrets and personal data from Sentry events; ``scrubber(event)`` returns a copy.

    Default rules (each can be turned off by name with ``skip``, see ``RULE_NAMES``):

    * values under sensitive keys anywhere in the event (dict keys and ``[key, value]`` pairs;
      ``password``, ``secret``, ``token``, ``api_key``, ``auth``, ``cookie``, ``session``,
      ``csrf``, ``private_key``, ``credentials``, ... matched case-insensitively inside the
      key, like Relay's password rule and sentry-sdk's ``EventScrubber`` lists);
    * in data fields (extra, contexts, tags, request, user, breadcrumb data, frame variables,
      log parameters), whole values that mention a password-like keyword, like Relay;
    * in every string: ``key=value`` / ``key: value`` pairs with a sensitive key, PEM keys,
      passwords in URLs, bearer and basic credentials, well-known token formats, email
      addresses, card numbers (Luhn-checked), IBANs (mod-97 checked), US SSNs, IPv4/IPv6
      addresses and user names in home-directory paths;
    * every cookie value, ``user.ip_address`` and ``user.geo`` (removed), ``user.email``,
      ``user.username`` and ``user.name`` (masked), and ``_meta`` (it can hold originals);
    * a value filtered in one place is removed wherever else it appears (say a password
      variable that is also in the exception message).

    Args:
        replacement: what replaces a filtered value.
        typed_masks: replace pattern matches with a mask naming what was there (``[email]``,
            ``[ip]``, ``[creditcard]``, ...) instead of ``replacement``.
        deny_keys: more key parts to treat as sensitive (matched inside the compact key).
        allow_keys: keys never treated as sensitive (exact, case and separators ignored);
            their values still go through the value patterns.
        default_deny: use the default key lists (False: only ``deny_keys``).
        rules: custom ``(regex, replacement)`` rules applied to every string first; the
            replacement is literal text or a function of the match.
        skip: names of default rules to turn off.
        validate_checksums: require a valid Luhn / mod-97 checksum before removing a card
            number or IBAN (fewer false positives); False removes anything shaped like one.
        strict: remove at least what Relay's ``@common`` rules remove when applied to every
            field: also filter whole free-text fields (messages, exception values, breadcrumb
            messages, ``server_name``) that mention a password-like keyword, and remove card
            numbers and IBANs without checking their checksums. Off by default: such a message
            keeps its text, with the values after ``password=``, ``token:``, ``secret is`` ...
            masked.
        max_depth: containers nested deeper are replaced by ``"[Truncated]"``.
        max_nodes: containers beyond this many per event are replaced by ``"[Truncated]"``.
        max_string: strings are cut to this many characters before scanning.

    Raises:
        ConfigError: for an invalid option (a regex that does not compile, an unknown rule).
    """

    def __init__(
        self,
        *,
        replacement: str = FILTERED,
        typed_masks: bool = True,
        deny_keys: Iterable[str] = (),
        allow_keys: Iterable[str] = (),
        default_deny: bool = True,
        rules: Iterable[tuple[Union[str, re.Pattern[str]], Replacement]] = (),
        skip: Iterable[str] = (),
        validate_checksums: bool = True,
        strict: bool = False,
        max_depth: int = 32,
        max_nodes: int = 100_000,
        max_string: int = 65_536,
    ) -> None:
        check_text("replacement", replacement)
        self.replacement = replacement
        self.typed_masks = bool(typed_masks)
        self.strict = bool(strict)
        self.validate_checksums = bool(validate_checksums) and not self.strict
        check_number("max_depth", max_depth, 1, integer=True)
        check_number("max_nodes", max_nodes, 1, integer=True)
        check_number("max_string", max_string, 16, integer=True)
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.max_string = max_string
        skipped = set(check_strings("skip", skip))
        unknown = skipped - RULE_NAMES
        if unknown:
            raise ConfigError(
                "skip", f"unknown rule(s) {sorted(unknown)}; known: {sorted(RULE_NAMES)}"
            )
        self._on = RULE_NAMES - skipped
        extra_deny = [compact_key(k) for k in check_strings("deny_keys", deny_keys)]
        if any(not k for k in extra_deny):
            raise ConfigError("deny_keys", "has an entry without letters or digits")
        substrings = list(DEFAULT_DENY_SUBSTRINGS) if default_deny else []
        self._deny_substrings = tuple(substrings + extra_deny)
        self._deny_words = frozenset(DEFAULT_DENY_WORDS if default_deny else ())
        self._allow = frozenset(compact_key(k) for k in check_strings("allow_keys", allow_keys))
        self._custom = self._compile_rules(rules)
        self._key_cache: dict[str, bool] = {}
        self._frame_fields = self._frame_handlers()
        self._top_fields = self._top_handlers()

    # --- configuration ---------------------------------------------------------------------

    @staticmethod
    def _compile_rules(
        rules: Iterable[tuple[Union[str, re.Pattern[str]], Replacement]],
    ) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
        compiled: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = []
        try:
            items = list(rules)
        except TypeError:
            raise ConfigError("rules", "must be a list of (regex, replacement) pairs") from None
        for index, rule in enumerate(items):
            if not isinstance(rule, (tuple, list)) or len(rule) != 2:
                raise ConfigError("rules", f"rule {index} is not a (regex, replacement) pair")
            pattern, replacement = rule
            try:
                regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ConfigError(
                    "rules", f"rule {index}: invalid regex {pattern!r}: {exc}"
                ) from None
            if isinstance(replacement, str):
                compiled.append((regex, _literal(replacement)))
            elif callable(replacement):
                compiled.append((regex, replacement))
            else:
                raise ConfigError("rules", f"rule {index}: replacement must be a str or callable")
        return compiled

    # --- keys ------------------------------------------------------------------------------

    def is_sensitive_key(self, key: str) -> bool:
        """Whether values under ``key`` are filtered (deny lists minus the allow list)."""
        cached = self._key_cache.get(key)
        if cached is not None:
            return cached
        sensitive = compact_key(key) not in self._allow and matches_deny_lists(
            key, self._deny_substrings, self._deny_words
        )
        if len(self._key_cache) > 4096:
            self._key_cache.clear()
        self._key_cache[key] = sensitive
        return sensitive

    def _is_allowed_key(self, key: str) -> bool:
        return bool(self._allow) and compact_key(key) in self._allow

    def _mask(self, kind: str) -> str:
        return f"[{kind}]" if self.typed_masks else self.replacement

    # --- strings ---------------------------------------------------------------------------

    def scrub_text(self, text: str) -> str:
        """``text`` with every pattern rule applied (what free-text fields get)."""
        return self._text(text, None)

    def _text(self, text: str, walk: Optional[_Walk]) -> str:
        if len(text) > self.max_string:
            text = text[: self.max_string - 3] + "..."
        on = self._on
        for regex, replace in self._custom:
            text = regex.sub(replace, text)
        if "pemkey" in on and "-----BEGIN" in text:
            text = _PEM.sub(self._pem, text)
        if "urlauth" in on and "@" in text and "//" in text:
            text = _URL_AUTH.sub(lambda m: m.group(1) + self._mask("auth") + "@", text)
        if "bearer" in on:
            text = _BEARER.sub(lambda m: m.group(1) + self._mask("token"), text)
            text = _BASIC.sub(self._basic, text)
        if "tokens" in on:
            text = _KNOWN_TOKENS.sub(lambda m: self._mask("token"), text)
        if "email" in on and "@" in text:
            text = _EMAIL.sub(lambda m: self._mask("email"), text)
        if "ip" in on:  # before card numbers, which would take the digits of "10.0.0.1 4111..."
            if ":" in text:
                text = _IPV6.sub(self._ipv6, text)
            if "." in text:
                text = _IPV4.sub(lambda m: self._mask("ip"), text)
        if _HAS_DIGIT.search(text):
            # Exact shapes first, before card numbers take their digits.
            if "ssn" in on:
                text = _SSN.sub(lambda m: self._mask("us-ssn"), text)
            if "iban" in on:
                text = _IBAN.sub(self._ibans, text)
            if "creditcard" in on:
                text = _DIGIT_RUN.sub(self._cards, text)
        if "userpath" in on and ("/" in text or "\\" in text):
            text = _USER_PATH.sub(self._user_path, text)
        # Last, so that a value some pattern above already masked keeps its typed mask.
        if "keyvalue" in on:
            text = self._key_values(text, walk)
        return text

    def _pem(self, match: re.Match[str]) -> str:
        kind = match.group(1)
        return f"-----BEGIN {kind}-----{self._mask('pemkey')}-----END {kind}-----"

    def _basic(self, match: re.Match[str]) -> str:
        token = match.group(2)
        try:
            decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        except (binascii.Error, ValueError):
            return match.group(0)
        # Only "user:password" is a credential; "Basic authentication" is prose.
        if b":" in decoded:
            return match.group(1) + self._mask("token")
        return match.group(0)

    def _key_values(self, text: str, walk: Optional[_Walk]) -> str:
        out: list[str] = []
        pos = 0
        length = len(text)
        while pos < length:
            match = _KEY_VALUE.search(text, pos)
            if match is None:
                break
            key, assign, verb, space = match.group(1, 2, 3, 4)
            end = match.end()
            span = None
            if self.is_sensitive_key(key):
                span = self._value_span(text, end, key, assign, verb, space)
            if span is None:
                # Not a secret: keep it and look again right after the key and separator, so
                # "a=password=x" still finds the second pair.
                out.append(text[pos:end])
                pos = end
                continue
            start, stop = span
            if _MASK.fullmatch(text, start, stop):
                out.append(text[pos:stop])
                pos = stop
                continue
            if walk is not None:
                self._remember(walk, text[start:stop])
            out.append(text[pos:start])
            out.append(self.replacement)
            pos = stop
        out.append(text[pos:])
        return "".join(out)

    @staticmethod
    def _value_span(
        text: str,
        start: int,
        key: str,
        assign: Optional[str],
        verb: Optional[str],
        space: Optional[str],
    ) -> Optional[tuple[int, int]]:
        if start >= len(text):
            return None
        quote_char = text[start]
        if quote_char in "\"'" and space is None:
            close = text.find(quote_char, start + 1, start + 4098)
            if close < 0:  # no closing quote within reach: the rest of the line, to be safe
                line = _LINE_VALUE.match(text, start + 1)
                return (start + 1, line.end()) if line else None
            return (start + 1, close) if close > start + 1 else None
        if space is not None or (verb is not None and not _STRONG_KEY.search(key)):
            # "password hunter2", "auth is X": only a value that looks like a secret (digits,
            # symbols), so that "password reset" and "authentication is off" stay.
            value = _SECRET_LOOKING.match(text, start)
            if value is None or not any(c.isdigit() or not c.isalpha() for c in value.group()):
                return None
            return value.span()
        if assign is not None and ":" in assign and "=>" not in assign:
            # "Authorization: Digest a=b, c=d": a header's value runs to the end of the line.
            line = _LINE_VALUE.match(text, start)
            return line.span() if line else None
        value = _UNQUOTED_VALUE.match(text, start)
        return value.span() if value else None

    def _cards(self, match: re.Match[str]) -> str:
        run = match.group(0)
        if not self.validate_checksums:  # any 13 digits in a row could be (part of) a card
            count = sum(c.isdigit() for c in run)
            return self._mask("creditcard") if count >= 13 else run
        groups = re.split(r"([ -])", run)
        parts = groups[0::2]
        seps = [*groups[1::2], ""]
        masked = [False] * len(parts)
        i = 0
        while i < len(parts):
            digits = ""
            found = -1
            for j in range(i, len(parts)):
                digits += parts[j]
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and self._card_number(digits):
                    found = j
            if found >= 0:
                for k in range(i, found + 1):
                    masked[k] = True
                i = found + 1
            else:
                i += 1
        if not any(masked):
            return run
        out = []
        k = 0
        while k < len(parts):
            if masked[k]:
                while k + 1 < len(parts) and masked[k + 1]:
                    k += 1
                out.append(self._mask("creditcard") + seps[k])
            else:
                out.append(parts[k] + seps[k])
            k += 1
        return "".join(out)

    @staticmethod
    def _card_number(digits: str) -> bool:
        return digits[0] in "23456" and luhn_valid(digits)

    def _ibans(self, match: re.Match[str]) -> str:
        text = match.group(0)
        groups = text.split(" ")
        # Written as one word, or in groups of four with a shorter last one: never more.
        length = 1
        if len(groups[0]) == 4:
            while length < len(groups) and len(groups[length]) <= 4:
                length += 1
                if len(groups[length - 1]) < 4:
                    break
        for count in range(length, 0, -1):
            candidate = "".join(groups[:count])
            if len(candidate) < 15:
                break
            if self._iban(candidate):
                rest = " ".join(groups[count:])
                return self._mask("iban") + (" " + rest if rest else "")
        return text

    def _iban(self, candidate: str) -> bool:
        if self.validate_checksums:
            return iban_valid(candidate)
        return candidate[:2].upper() in _IBAN_COUNTRIES and candidate[2:4].isdigit()

    def _ipv6(self, match: re.Match[str]) -> str:
        text = match.group(0)
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return text
        return self._mask("ip")

    def _user_path(self, match: re.Match[str]) -> str:
        whole = match.group(0)
        return whole[: match.start(1) - match.start(0)] + self._mask("user")

    # --- values ----------------------------------------------------------------------------

    def _remember(self, walk: _Walk, value: object) -> None:
        if "propagate" not in self._on or not isinstance(value, str):
            return
        text = value.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]  # frame variables are reprs
        if (
            len(text) >= _MIN_PROPAGATED
            and text.lower() not in _NOT_SECRETS
            and len(walk.secrets) < _MAX_PROPAGATED
            and not (text.startswith("[") and text.endswith("]"))
        ):
            walk.secrets.add(text)

    def _redacted(self, value: Any, walk: _Walk) -> Any:
        """What a value under a sensitive key becomes."""
        if value is None or value == "" or isinstance(value, bool):
            return value
        if isinstance(value, str):
            self._remember(walk, value)
        elif isinstance(value, (int, float)):
            self._remember(walk, str(value))
        return self.replacement

    def _data_string(self, text: str, walk: _Walk, allowed: bool = False) -> str:
        if not allowed and "values" in self._on and _VALUE_KEYWORD.search(text):
            self._remember(walk, text)
            return self.replacement
        return self._text(text, walk)

    def _data(self, value: Any, walk: _Walk, depth: int, allowed: bool = False) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return self._data_string(value, walk, allowed)
        if isinstance(value, int):
            return self._number(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else repr(value)
        if isinstance(value, (bytes, bytearray)):
            return self._data_string(bytes(value).decode("utf-8", "replace"), walk, allowed)
        if isinstance(value, Mapping):
            return self._container(value, walk, depth, self._data_mapping)
        if isinstance(value, (list, tuple, set, frozenset)):
            return self._container(value, walk, depth, self._data_sequence)
        return self._data_string(_safe_text(value), walk, allowed)

    def _number(self, value: int) -> Any:
        if not -(2**63) <= value < 2**64:
            return _big_int(value)  # JSON numbers this big are not portable
        if (
            "creditcard" in self._on
            and 10**12 <= abs(value) < 10**19
            and (not self.validate_checksums or self._card_number(str(abs(value))))
        ):
            return self._mask("creditcard")
        return value

    def _container(self, value: Any, walk: _Walk, depth: int, body: Handler) -> Any:
        if depth >= self.max_depth or walk.nodes >= self.max_nodes:
            return TRUNCATED
        marker = id(value)
        if marker in walk.ancestors:
            return TRUNCATED  # a cycle
        walk.nodes += 1
        walk.ancestors.add(marker)
        try:
            return body(value, walk, depth + 1)
        finally:
            walk.ancestors.discard(marker)

    def _key(self, key: object, walk: _Walk) -> str:
        name = key if isinstance(key, str) else _safe_text(key)
        return self._text(name, walk) if name else name

    def _data_mapping(self, value: Mapping[Any, Any], walk: _Walk, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in list(value.items()):
            name = key if isinstance(key, str) else _safe_text(key)
            if "keys" in self._on and self.is_sensitive_key(name):
                result = self._redacted(item, walk)
            else:
                result = self._data(item, walk, depth, self._is_allowed_key(name))
            self._put(out, self._key(name, walk), result)
        return out

    @staticmethod
    def _put(out: dict[str, Any], key: str, value: Any) -> None:
        # Two keys can scrub to the same text ("[email]"); keep both values.
        if key in out:
            index = 2
            while f"{key}#{index}" in out:
                index += 1
            key = f"{key}#{index}"
        out[key] = value

    def _data_sequence(self, value: Iterable[Any], walk: _Walk, depth: int) -> list[Any]:
        out: list[Any] = []
        for item in list(value):
            if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
                # A [key, value] pair, as in headers, tags, cookies and query strings.
                name = item[0]
                if "keys" in self._on and self.is_sensitive_key(name):
                    second = self._redacted(item[1], walk)
                else:
                    second = self._data(item[1], walk, depth, self._is_allowed_key(name))
                out.append([self._key(name, walk), second])
            else:
                out.append(self._data(item, walk, depth))
        return out

    def _text_value(self, value: Any, walk: _Walk, depth: int) -> Any:
        """A field developers write (names, paths, source lines): patterns only."""
        if isinstance(value, str):
            return self._text(value, walk)
        return self._data(value, walk, depth)

    def _free_text(self, value: Any, walk: _Walk, depth: int) -> Any:
        """A message: patterns and masked ``key=value`` pairs; dropped as a whole if strict."""
        if isinstance(value, str) and self.strict:
            return self._data_string(value, walk)
        return self._text_value(value, walk, depth)

    def _scalar(self, value: Any, walk: _Walk, depth: int) -> Any:
        """A field the schema fixes (ids, timestamps, levels): kept unless it is odd."""
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value if -(2**63) <= value < 2**64 else _big_int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else repr(value)
        if isinstance(value, str) and len(value) <= 256:
            return value
        return self._data(value, walk, depth)

    def _fields(
        self,
        value: Any,
        walk: _Walk,
        depth: int,
        handlers: Mapping[str, Handler],
    ) -> Any:
        """A schema object: known fields by their handler, the rest as data."""
        if not isinstance(value, Mapping):
            return self._data(value, walk, depth)

        def body(mapping: Mapping[Any, Any], walk: _Walk, depth: int) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, item in list(mapping.items()):
                name = key if isinstance(key, str) else _safe_text(key)
                handler = handlers.get(name)
                if handler is not None:
                    result = handler(item, walk, depth)
                    if result is not _DROP:
                        out[name] = result
                elif "keys" in self._on and self.is_sensitive_key(name):
                    out[self._key(name, walk)] = self._redacted(item, walk)
                else:
                    self._put(out, self._key(name, walk), self._data(item, walk, depth))
            return out

        return self._container(value, walk, depth, body)

    def _values_list(self, value: Any, walk: _Walk, depth: int, each: Handler) -> Any:
        """``{"values": [...]}`` or a bare list, each item through ``each``."""

        def items(sequence: Iterable[Any], walk: _Walk, depth: int) -> list[Any]:
            return [each(item, walk, depth) for item in list(sequence)]

        if isinstance(value, (list, tuple)):
            return self._container(value, walk, depth, items)
        return self._fields(
            value,
            walk,
            depth,
            {"values": lambda v, w, d: self._list_of(v, w, d, each)},
        )

    def _list_of(self, value: Any, walk: _Walk, depth: int, each: Handler) -> Any:
        if not isinstance(value, (list, tuple)):
            return self._data(value, walk, depth)

        def items(sequence: Iterable[Any], walk: _Walk, depth: int) -> list[Any]:
            return [each(item, walk, depth) for item in list(sequence)]

        return self._container(value, walk, depth, items)

    # --- schema parts ----------------------------------------------------------------------

    def _logentry(self, value: Any, walk: _Walk, depth: int) -> Any:
        if isinstance(value, str):
            return self._free_text(value, walk, depth)
        return self._fields(
            value,
            walk,
            depth,
            {
                "message": self._free_text,
                "formatted": self._free_text,
                "params": self._data,
            },
        )

    def _exception(self, value: Any, walk: _Walk, depth: int) -> Any:
        return self._values_list(value, walk, depth, self._exception_value)

    def _exception_value(self, value: Any, walk: _Walk, depth: int) -> Any:
        return self._fields(
            value,
            walk,
            depth,
            {
                "type": self._text_value,
                "value": self._free_text,
                "module": self._text_value,
                "thread_id": self._scalar,
                "mechanism": self._mechanism,
                "stacktrace": self._stacktrace,
                "raw_stacktrace": self._stacktrace,
            },
        )

    def _mechanism(self, value: Any, walk: _Walk, depth: int) -> Any:
        scalar = self._scalar
        return self._fields(
            value,
            walk,
            depth,
            {
                "type": scalar,
                "handled": scalar,
                "synthetic": scalar,
                "exception_id": scalar,
                "parent_id": scalar,
                "is_exception_group": scalar,
                "source": self._text_value,
                "description": self._free_text,
                "help_link": self._text_value,
            },
        )

    def _stacktrace(self, value: Any, walk: _Walk, depth: int) -> Any:
        return self._fields(
            value,
            walk,
            depth,
            {
                "frames": lambda v, w, d: self._list_of(v, w, d, self._frame),
                "frames_omitted": self._scalar,
                "snapshot": self._scalar,
                "lang": self._scalar,
            },
        )

    def _frame_handlers(self) -> dict[str, Handler]:
        handlers: dict[str, Handler] = dict.fromkeys(_FRAME_TEXT, self._text_value)
        handlers.update(dict.fromkeys(_FRAME_SCALAR, self._scalar))
        handlers["pre_context"] = self._text_list
        handlers["post_context"] = self._text_list
        handlers["vars"] = self._data
        return handlers

    def _frame(self, value: Any, walk: _Walk, depth: int) -> Any:
        return self._fields(value, walk, depth, self._frame_fields)

    def _text_list(self, value: Any, walk: _Walk, depth: int) -> Any:
        return self._list_of(value, walk, depth, self._text_value)

    def _threads(self, value: Any, walk: _Walk, depth: int) -> Any:
        return self._values_list(
            value,
            walk,
            depth,
            lambda v, w, d: self._fields(
                v,
                w,
                d,
                {
                    "id": self._scalar,
                    "name": self._text_value,
                    "crashed": self._scalar,
                    "current": self._scalar,
                    "main": self._scalar,
                    "state": self._scalar,
                    "stacktrace": self._stacktrace,
                    "raw_stacktrace": self._stacktrace,
                },
            ),
        )

    def _breadcrumbs(self, value: Any, walk: _Walk, depth: int) -> Any:
        return self._values_list(
            value,
            walk,
            depth,
            lambda v, w, d: self._fields(
                v,
                w,
                d,
                {
                    "type": self._scalar,
                    "level": self._scalar,
                    "timestamp": self._scalar,
                    "category": self._text_value,
                    "message": self._free_text,
                    "event_id": self._scalar,
                    "data": self._data,
                },
            ),
        )

    def _request(self, value: Any, walk: _Walk, depth: int) -> Any:
        return self._fields(
            value,
            walk,
            depth,
            {
                "url": self._url,
                "method": self._scalar,
                "query_string": self._query,
                "fragment": self._query,
                "data": self._body,
                "cookies": self._cookies,
                "headers": self._data,
                "env": self._data,
                "inferred_content_type": self._scalar,
                "api_target": self._scalar,
                "body_size": self._scalar,
                "protocol": self._scalar,
            },
        )

    def _url(self, value: Any, walk: _Walk, depth: int) -> Any:
        if not isinstance(value, str):
            return self._data(value, walk, depth)
        base, hash_mark, fragment = value.partition("#")
        base, question, query = base.partition("?")
        out = self._text(base, walk)
        if question:
            out += "?" + self._query_string(query, walk)
        if hash_mark:
            out += "#" + self._query_string(fragment, walk)
        return out

    def _query(self, value: Any, walk: _Walk, depth: int) -> Any:
        if isinstance(value, str):
            return self._query_string(value, walk)
        return self._data(value, walk, depth)

    def _query_string(self, text: str, walk: _Walk) -> str:
        if len(text) > self.max_string:
            text = text[: self.max_string]
        parts = re.split(r"([&;])", text)
        out = []
        for index, part in enumerate(parts):
            if index % 2:  # a separator
                out.append(part)
                continue
            key, equals, raw = part.partition("=")
            name = unquote_plus(key)
            if not equals:
                scrubbed = self._data_string(name, walk)
                out.append(part if scrubbed == name else quote(scrubbed, safe="[]"))
            elif "keys" in self._on and self.is_sensitive_key(name):
                self._remember(walk, unquote_plus(raw))
                out.append(f"{self._text(key, walk)}={self.replacement if raw else ''}")
            else:
                decoded = unquote_plus(raw)
                scrubbed = self._data_string(decoded, walk, self._is_allowed_key(name))
                new_key = self._text(key, walk)
                new_value = raw if scrubbed == decoded else quote(scrubbed, safe="[]")
                out.append(f"{new_key}={new_value}")
        return "".join(out)

    def _body(self, value: Any, walk: _Walk, depth: int) -> Any:
        if not isinstance(value, str):
            return self._data(value, walk, depth)
        stripped = value.strip()
        if stripped[:1] in ("{", "[") and len(value) <= self.max_string:
            try:
                parsed = json.loads(value)
            except ValueError:
                pass
            else:
                scrubbed = self._data(parsed, walk, depth)
                return json.dumps(scrubbed, ensure_ascii=False)
        if stripped and _FORM_ENCODED.fullmatch(stripped):
            return self._query_string(stripped, walk)
        return self._data_string(value, walk)

    def _cookies(self, value: Any, walk: _Walk, depth: int) -> Any:
        if "cookies" not in self._on:
            return self._data(value, walk, depth)
        if isinstance(value, str):
            parts = []
            for part in value.split(";"):
                name, equals, raw = part.partition("=")
                if equals and raw.strip() and not self._is_allowed_key(name.strip()):
                    self._remember(walk, raw.strip())
                    parts.append(f"{self._text(name, walk)}={self.replacement}")
                elif not equals and part.strip():  # not a cookie: garbage, or a bare value
                    self._remember(walk, part.strip())
                    parts.append(part[: len(part) - len(part.lstrip())] + self.replacement)
                else:
                    parts.append(self._text(part, walk))
            return ";".join(parts)
        if isinstance(value, Mapping):

            def mapping(cookies: Mapping[Any, Any], walk: _Walk, depth: int) -> dict[str, Any]:
                out: dict[str, Any] = {}
                for key, item in list(cookies.items()):
                    name = key if isinstance(key, str) else _safe_text(key)
                    if self._is_allowed_key(name):
                        result = self._data(item, walk, depth, True)
                    else:
                        result = self._redacted(item, walk)
                    self._put(out, self._key(name, walk), result)
                return out

            return self._container(value, walk, depth, mapping)
        if isinstance(value, (list, tuple)):

            def pairs(cookies: Iterable[Any], walk: _Walk, depth: int) -> list[Any]:
                out: list[Any] = []
                for item in list(cookies):
                    if isinstance(item, (list, tuple)) and len(item) == 2:
                        name = item[0] if isinstance(item[0], str) else _safe_text(item[0])
                        if self._is_allowed_key(name):
                            second = self._data(item[1], walk, depth, True)
                        else:
                            second = self._redacted(item[1], walk)
                        out.append([self._key(name, walk), second])
                    else:
                        out.append(self._data(item, walk, depth))
                return out

            return self._container(value, walk, depth, pairs)
        return self._data(value, walk, depth)

    def _user(self, value: Any, walk: _Walk, depth: int) -> Any:
        if "user" not in self._on:
            keep_ip = "ip" not in self._on and "keys" not in self._on
            return self._fields(
                value,
                walk,
                depth,
                # an address, or nothing: "[Filtered]" would not be a valid ip_address
                {"data": self._data, "ip_address": self._scalar if keep_ip else _drop},
            )

        def email(item: Any, walk: _Walk, depth: int) -> Any:
            if isinstance(item, str) and item:
                self._remember(walk, item)
                return self._mask("email")
            return self._data(item, walk, depth)

        def name(item: Any, walk: _Walk, depth: int) -> Any:
            if isinstance(item, str) and item:
                self._remember(walk, item)
                return self.replacement
            return self._data(item, walk, depth)

        return self._fields(
            value,
            walk,
            depth,
            {
                "ip_address": _drop,
                "geo": _drop,
                "email": email,
                "username": name,
                "name": name,
                "data": self._data,
            },
        )

    def _contexts(self, value: Any, walk: _Walk, depth: int) -> Any:
        if not isinstance(value, Mapping):
            return self._data(value, walk, depth)

        def body(contexts: Mapping[Any, Any], walk: _Walk, depth: int) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, item in list(contexts.items()):
                name = key if isinstance(key, str) else _safe_text(key)
                if "keys" in self._on and self.is_sensitive_key(name):
                    continue  # a context must be an object: leave it out rather than filter
                scrubbed = self._fields(item, walk, depth, {"type": self._scalar})
                self._put(out, self._key(name, walk), scrubbed)
            return out

        return self._container(value, walk, depth, body)

    def _plain(self, value: Any, walk: _Walk, depth: int) -> Any:
        """SDK metadata: copied as JSON, not scrubbed."""
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value if -(2**63) <= value < 2**64 else _big_int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else repr(value)
        if isinstance(value, Mapping):
            return self._container(
                value,
                walk,
                depth,
                lambda m, w, d: {
                    (k if isinstance(k, str) else _safe_text(k)): self._plain(v, w, d)
                    for k, v in list(m.items())
                },
            )
        if isinstance(value, (list, tuple)):
            return self._container(
                value, walk, depth, lambda s, w, d: [self._plain(v, w, d) for v in list(s)]
            )
        return _safe_text(value)

    def _top_handlers(self) -> dict[str, Handler]:
        handlers: dict[str, Handler] = dict.fromkeys(_SCALAR_FIELDS, self._scalar)
        handlers.update(dict.fromkeys(_TEXT_FIELDS, self._text_value))
        handlers.update(
            {
                "_meta": lambda v, w, d: _DROP,  # Relay keeps original values in _meta
                "sdk": self._plain,
                "server_name": self._free_text,  # Relay treats it as possibly personal
                "fingerprint": self._text_list,
                "modules": self._plain,
                "message": self._logentry,
                "logentry": self._logentry,
                "exception": self._exception,
                "threads": self._threads,
                "stacktrace": self._stacktrace,
                "breadcrumbs": self._breadcrumbs,
                "request": self._request,
                "user": self._user,
                "contexts": self._contexts,
                "tags": self._data,
                "extra": self._data,
            }
        )
        return handlers

    # --- entry point -----------------------------------------------------------------------

    def __call__(self, event: Mapping[str, Any]) -> Event:
        """A scrubbed copy of ``event`` (the input is not modified).

        Odd content (non-string keys, cycles, deep nesting, objects JSON cannot carry) is
        handled, never raised on; the result is always JSON-serializable. Raises TypeError
        when ``event`` is not a mapping.
        """
        if not isinstance(event, Mapping):
            raise TypeError(f"expected an event dict, got {type(event).__name__}")
        walk = _Walk()
        scrubbed = self._fields(event, walk, 0, self._top_fields)
        if not isinstance(scrubbed, dict):  # pragma: no cover - a mapping always gives a dict
            raise TypeError("scrubbing did not produce an event dict")
        if walk.secrets and "propagate" in self._on:
            secrets = sorted(walk.secrets, key=len, reverse=True)
            pattern = re.compile("|".join(re.escape(s) for s in secrets))
            for key, value in scrubbed.items():
                if key not in _SCALAR_FIELDS and key != "sdk":
                    scrubbed[key] = self._propagate(value, pattern)
        return scrubbed

    def _propagate(self, value: Any, pattern: re.Pattern[str]) -> Any:
        # The scrubbed tree is plain JSON (fresh dicts, lists, scalars) and acyclic.
        if isinstance(value, str):
            return pattern.sub(self.replacement, value) if value else value
        if isinstance(value, dict):
            return {key: self._propagate(item, pattern) for key, item in value.items()}
        if isinstance(value, list):
            return [self._propagate(item, pattern) for item in value]
        return value
