"""The scrubber's light front: the one list of secret names (shared with the integrations'
filters), the FILTERED marker and the ``scrub`` option, without loading its patterns."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any, Callable, Optional, Union

from selfreport.exceptions import ConfigError

__all__ = [
    "DEFAULT_DENY_SUBSTRINGS",
    "DEFAULT_DENY_WORDS",
    "FILTERED",
    "Scrub",
    "compact_key",
    "is_sensitive_name",
    "matches_deny_lists",
    "resolve_scrub",
]

Scrub = Callable[[dict[str, Any]], dict[str, Any]]

# Kept apart from scrub.py, whose compiled patterns are loaded only when scrubbing is asked for:
# clients without scrubbing and the web-framework middleware do not load them.

FILTERED = "[Filtered]"

# A key is sensitive when its compact form (lower case, only letters and digits) contains one of
# these: the union of sentry-sdk's EventScrubber DEFAULT_DENYLIST + DEFAULT_PII_DENYLIST and
# Relay's password-key rule, plus common names for card data and signed-URL signatures.
DEFAULT_DENY_SUBSTRINGS = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "token",
    "apikey",
    "auth",
    "credential",
    "privatekey",
    "session",
    "sessid",
    "cookie",
    "csrf",
    "xsrf",
    "bearer",
    "signature",
    "accesskey",
    "twofactor",
    "forwardedfor",
    "realip",
    "ipaddress",
    "remoteaddr",
    "clientip",
    "creditcard",
    "cardnumber",
    "ccnumber",
    "iban",
    "socialsecurity",
    "sentrykey",  # the DSN key in a Sentry auth header or query string
)
# ... or when one of its words (split at separators and camelCase) is one of these: too short
# to match inside other words safely ("ssn" is in "classname", "otp" in "footprint").
DEFAULT_DENY_WORDS = (
    "sid",
    "otp",
    "totp",
    "mfa",
    "ssn",
    "pin",
    "cvv",
    "cvc",
    "pw",
    "pass",
    "jwt",
    "dsn",
    "symfony",
    "forwarded",
)

_KEY_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def compact_key(key: str) -> str:
    """``key`` in lower case with only its letters and digits: how the lists are matched."""
    return "".join(c for c in key.lower() if c.isalnum())


def matches_deny_lists(key: str, substrings: Iterable[str], words: Collection[str]) -> bool:
    """Whether ``key``'s compact form contains one of ``substrings`` or one of its words (split
    at separators and camelCase) is in ``words``."""
    compact = compact_key(key)
    return any(part in compact for part in substrings) or any(
        word.lower() in words for word in _KEY_WORDS.findall(key)
    )


_DEFAULT_WORDS = frozenset(DEFAULT_DENY_WORDS)


def is_sensitive_name(name: str) -> bool:
    """Whether a key, header or parameter called ``name`` may carry a secret or personal data
    (the default lists: what ``Scrubber()`` filters and what the integrations filter)."""
    return matches_deny_lists(name, DEFAULT_DENY_SUBSTRINGS, _DEFAULT_WORDS)


def resolve_scrub(scrub: Union[bool, Scrub, None], option: str = "scrub") -> Optional[Scrub]:
    """``True`` -> the default :class:`~selfreport.Scrubber`; a callable as is; off otherwise."""
    if scrub is None or scrub is False:
        return None
    if scrub is True:
        from selfreport._capture.scrub import Scrubber  # compiled patterns: only when asked for

        return Scrubber()
    if callable(scrub):
        return scrub
    raise ConfigError(option, "must be True, False, None or a callable taking the event")
