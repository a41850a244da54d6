"""Password hashes, tokens, and the user and token commands, on a real database."""

from __future__ import annotations

import getpass
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from selfreport.collector import accounts
from selfreport.collector.accounts import (
    DUMMY_HASH,
    hash_password,
    hash_secret,
    needs_rehash,
    new_token,
    read_password,
    token_command,
    user_command,
    valid_name,
    verify_password,
)
from selfreport.collector.server import open_storage


def test_password_hashes_are_salted_scrypt_with_their_parameters() -> None:
    first, second = hash_password("a long password"), hash_password("a long password")
    assert first != second  # a fresh salt each time
    kind, n, r, p, salt, key = first.split("$")
    assert (kind, int(n), int(r), int(p)) == ("scrypt", 2**14, 8, 1)
    assert len(bytes.fromhex(salt)) == 16
    assert len(bytes.fromhex(key)) == 32
    assert verify_password("a long password", first)
    assert verify_password("a long password", second)
    assert not verify_password("a long passworD", first)
    assert not verify_password("x" * 2000, first)  # too long to be worth hashing
    assert not verify_password("a long password", DUMMY_HASH)
    for broken in ("", "md5$1$2", "scrypt$x$8$1$00$00", "scrypt$16384$8$1$zz$00"):
        assert not verify_password("a long password", broken)
        assert needs_rehash(broken)
    assert not needs_rehash(first)
    assert needs_rehash(first.replace("$16384$", "$1024$", 1))


def test_tokens_and_names() -> None:
    token = new_token()
    assert token.startswith("srt_")
    assert len(token) > 40
    assert new_token() != token
    assert hash_secret(token) == hash_secret(token)
    assert len(hash_secret(token)) == 64
    for good in ("alice", "ci.deploy", "a@b.example", "x" * 64, "A1+b-c_d"):
        assert valid_name(good), good
    for bad in ("", "-x", "x" * 65, "a b", "a\nb", "ä", "a/b"):
        assert not valid_name(bad), bad


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_passwords_are_asked_twice_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["first password", "first password", "one password", "another one"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt: next(answers))
    assert read_password(Tty()) == "first password"
    with pytest.raises(ValueError, match="differ"):
        read_password(Tty())
    assert read_password(io.StringIO("from a pipe\nignored\n")) == "from a pipe"
    with pytest.raises(ValueError, match="at least 8"):
        read_password(io.StringIO("short\n"))
    with pytest.raises(ValueError, match="at most 1024"):
        read_password(io.StringIO("x" * 1025))


def run(command: Any, *args: Any, **kwargs: Any) -> tuple[int, str]:
    out = io.StringIO()
    code = command(*args, out=out, **kwargs)
    return code, out.getvalue()


def test_the_user_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    password = io.StringIO("a good password\n")
    assert run(user_command, "add", data, "alice", stdin=password) == (0, "Added user 'alice'\n")
    assert run(user_command, "add", data, "alice", stdin=io.StringIO("another pw\n"))[0] == 2
    assert "already exists" in capsys.readouterr().err
    assert run(user_command, "add", data, "bob", stdin=io.StringIO("short\n"))[0] == 2
    assert capsys.readouterr().err == "selfreport: a password needs at least 8 characters\n"
    assert run(user_command, "add", data, "bob", stdin=io.StringIO(""))[0] == 2
    assert run(user_command, "add", data, "b b", stdin=io.StringIO("a good password\n"))[0] == 2
    assert "bad user name" in capsys.readouterr().err
    assert run(user_command, "list", data) == (0, "alice\n")
    code, text = run(user_command, "passwd", data, "alice", stdin=io.StringIO("a new password\n"))
    assert code == 0
    assert "Changed the password" in text
    assert run(user_command, "passwd", data, "carol", stdin=io.StringIO("x" * 10))[0] == 2
    storage = open_storage(data)
    try:
        stored = storage.password_hash("alice")
        assert stored is not None
        assert verify_password("a new password", stored)
        assert "a new password" not in (data / "selfreport.db").read_bytes().decode("latin-1")
    finally:
        storage.close()
    assert run(user_command, "remove", data, "alice")[0] == 0
    assert run(user_command, "remove", data, "alice")[0] == 2
    assert "no user named 'alice'" in capsys.readouterr().err
    assert run(user_command, "list", data) == (0, "")


def test_a_race_for_the_same_user_name_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    original = accounts.read_password

    def slow_typist(stdin: Any = None, **options: Any) -> str:
        # Someone else adds the same name while this password is being typed.
        monkeypatch.setattr(accounts, "read_password", original)
        assert (
            run(user_command, "add", data, "alice", stdin=io.StringIO("theirs is long\n"))[0] == 0
        )
        return original(stdin, **options)

    monkeypatch.setattr(accounts, "read_password", slow_typist)
    assert run(user_command, "add", data, "alice", stdin=io.StringIO("mine is long\n"))[0] == 2
    assert "already exists" in capsys.readouterr().err


def test_the_token_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    code, text = run(token_command, "create", data, "ci")
    assert code == 0
    token = text.strip()
    assert token.startswith("srt_")
    assert "not shown again" in capsys.readouterr().err
    assert run(token_command, "create", data, "ci")[0] == 2
    assert "already exists" in capsys.readouterr().err
    assert run(token_command, "create", data, "c i")[0] == 2
    assert run(token_command, "list", data) == (0, "ci\n")
    storage = open_storage(data)
    try:
        assert storage.token_name(hash_secret(token)) == "ci"
        assert token not in (data / "selfreport.db").read_bytes().decode("latin-1")
    finally:
        storage.close()
    assert run(token_command, "revoke", data, "ci") == (0, "Revoked token 'ci'\n")
    assert run(token_command, "revoke", data, "ci")[0] == 2
    assert run(token_command, "list", data) == (0, "")


def test_the_command_line_dispatches_user_and_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfreport.cli import main

    data = str(tmp_path / "data")
    monkeypatch.setattr("sys.stdin", io.StringIO("a good password\n"))
    assert main(["user", "add", "alice", "--data", data]) == 0
    assert main(["user", "list", "--data", data]) == 0
    assert main(["token", "create", "ci", "--data", data]) == 0
    assert main(["token", "list", "--data", data]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["Added user 'alice'", "alice"]
    assert out[2].startswith("srt_")
    assert out[3] == "ci"


@pytest.mark.parametrize(
    "command", [["user", "list"], ["token", "revoke", "ci"], ["user", "remove", "bob"]]
)
def test_a_corrupt_data_directory_is_one_line_and_exit_code_2(
    tmp_path: Path, command: list[str]
) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "selfreport", *command, "--data", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert run().returncode in (0, 2)  # creates the database (or: no such token or user)
    database = tmp_path / "selfreport.db"
    with database.open("r+b") as file:  # the header survives; the tables' pages do not
        file.seek(4096)
        file.write(b"\xde\xad" * 20_000)
    damaged = run()
    database.write_bytes(b"not a database at all" * 500)
    garbage = run()
    for result in (damaged, garbage):
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("selfreport: "), result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "malformed" in damaged.stderr
    assert "not a database" in garbage.stderr


def test_a_damaged_database_is_one_line_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert user_command("list", tmp_path) == 0
    database = tmp_path / "selfreport.db"
    with database.open("r+b") as file:
        file.seek(4096)
        file.write(b"\xde\xad" * 20_000)
    capsys.readouterr()
    assert token_command("list", tmp_path) == 2
    assert capsys.readouterr().err.startswith("selfreport: ")
    database.write_bytes(b"not a database at all" * 500)
    assert user_command("list", tmp_path) == 2
    assert capsys.readouterr().err.startswith(f"selfreport: {database}: cannot open")
