"""Users and API tokens: scrypt password hashes, hashed tokens, ``selfreport user|token ...``."""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, NamedTuple, Optional, TextIO, Union

from .store import StorageError, Store

__all__ = [
    "hash_password",
    "hash_secret",
    "needs_rehash",
    "new_token",
    "token_command",
    "user_command",
    "verify_password",
]

# scrypt as OWASP recommends at least: 16 MiB and ~50 ms per hash on a laptop core. The
# parameters are stored with each hash, so raising them later upgrades hashes at next login.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAX_MEMORY = 2**26  # scrypt needs 128 * r * n bytes: room for n up to 2**15 at r = 8

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # a bound on what a login form makes scrypt chew on
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
TOKEN_PREFIX = "srt_"


def valid_name(name: str) -> bool:
    """User and token names: 1 to 64 of letters, digits and ``. _ @ + -``."""
    return _NAME.fullmatch(name) is not None


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=max(_MAX_MEMORY, 256 * r * n),
        dklen=_KEY_BYTES,
    )


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` (hex), with a fresh random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${key.hex()}"


def _parse(encoded: str) -> Optional[tuple[int, int, int, bytes, bytes]]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        return n, r, p, bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
    except ValueError:
        return None


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the stored hash (compared in constant time)."""
    parsed = _parse(encoded)
    if parsed is None or len(password) > MAX_PASSWORD:
        return False
    n, r, p, salt, key = parsed
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), key)


def needs_rehash(encoded: str) -> bool:
    """True when the hash was made with weaker parameters than today's."""
    parsed = _parse(encoded)
    return parsed is None or parsed[:3] < (SCRYPT_N, SCRYPT_R, SCRYPT_P)


# Checked against when the user does not exist, so that a wrong name costs as much time as a
# wrong password (no finding out who has an account by timing the answer).
DUMMY_HASH = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${'00' * _SALT_BYTES}${'00' * _KEY_BYTES}"


def hash_secret(secret: str) -> str:
    """How tokens and session ids are stored: sha256 (they are long random strings)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh API token: a recognisable prefix and 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# --- the command line -----------------------------------------------------------------------


def read_password(stdin: Optional[TextIO] = None, *, confirm: bool = True) -> str:
    """The password: asked twice on a terminal, else one line read from stdin.

    Raises ValueError with a message for the user when it is unusable.
    """
    stdin = stdin or sys.stdin
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Password (again): ") != password:
            raise ValueError("the two passwords differ")
    else:
        password = stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"a password has at most {MAX_PASSWORD} characters")
    return password


def _storage(data_dir: Union[str, os.PathLike[str], None]) -> Store:
    from .server import default_data_dir, open_storage  # lazily: server needs the web stack

    return open_storage(Path(data_dir) if data_dir is not None else default_data_dir())


def _fail(message: str) -> int:
    print(f"selfreport: {message}", file=sys.stderr)
    return 2


class _Kind(NamedTuple):
    """Users or tokens, for what their commands share."""

    name: str
    listing: Callable[[Store], Iterable[str]]
    remove: Callable[[Store, str], bool]
    removed: str  # the message, with {name!r}


_USERS = _Kind(
    "user",
    lambda storage: (user.name for user in storage.users()),
    lambda storage, name: storage.remove_user(name),
    "Removed user {name!r} (and ended their sessions)",
)
_TOKENS = _Kind(
    "token",
    lambda storage: (token.name for token in storage.tokens()),
    lambda storage, name: storage.revoke_token(name),
    "Revoked token {name!r}",
)


def _run(
    kind: _Kind,
    action: str,
    data_dir: Union[str, os.PathLike[str], None],
    name: str,
    out: TextIO,
    change: Callable[[Store], int],
) -> int:
    """What ``user`` and ``token`` share: the name check, the database opened and closed,
    ``list``, removing by name and one-line errors; ``change`` does the rest."""
    if action != "list" and not valid_name(name):
        return _fail(f"bad {kind.name} name {name!r}: 1 to 64 letters, digits and . _ @ + -")
    try:
        storage = _storage(data_dir)
        try:
            if action == "list":
                for row in kind.listing(storage):
                    print(row, file=out)
                return 0
            if action in ("remove", "revoke"):
                if not kind.remove(storage, name):
                    return _fail(f"no {kind.name} named {name!r}")
                print(kind.removed.format(name=name), file=out)
                return 0
            return change(storage)
        finally:
            storage.close()
    except (StorageError, OSError) as exc:  # the storage says which file, and what is wrong
        return _fail(str(exc))


def user_command(
    action: str,
    data_dir: Union[str, os.PathLike[str], None],
    name: str = "",
    out: Optional[TextIO] = None,
    stdin: Optional[TextIO] = None,
) -> int:
    """``selfreport user add|passwd|remove NAME`` and ``selfreport user list``."""
    out = out or sys.stdout

    def change(storage: Store) -> int:
        if action == "add" and storage.password_hash(name) is not None:
            return _fail(f"a user named {name!r} already exists")
        if action == "passwd" and storage.password_hash(name) is None:
            return _fail(f"no user named {name!r}")
        try:
            password = read_password(stdin)
        except (ValueError, EOFError) as exc:
            return _fail(str(exc) or "no password given")
        if action == "add":
            try:
                storage.add_user(name, hash_password(password))
            except ValueError as exc:
                return _fail(str(exc))
            print(f"Added user {name!r}", file=out)
        else:
            storage.set_password(name, hash_password(password))
            print(f"Changed the password of {name!r} (and ended their sessions)", file=out)
        return 0

    return _run(_USERS, action, data_dir, name, out, change)


def token_command(
    action: str,
    data_dir: Union[str, os.PathLike[str], None],
    name: str = "",
    out: Optional[TextIO] = None,
) -> int:
    """``selfreport token create|revoke NAME`` and ``selfreport token list``."""
    out = out or sys.stdout

    def create(storage: Store) -> int:
        secret = new_token()
        try:
            storage.add_token(name, hash_secret(secret))
        except ValueError as exc:
            return _fail(str(exc))
        # The only time it is shown: only its hash is kept.
        print(secret, file=out)
        print(
            f"(API token {name!r}: send it as 'Authorization: Bearer ...'; it is not shown again)",
            file=sys.stderr,
        )
        return 0

    return _run(_TOKENS, action, data_dir, name, out, create)
