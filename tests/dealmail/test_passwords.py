"""Tests for dealmail.passwords and ``dealmail set-password``: scrypt hashes (RFC 7914) that
verify only the right password, and a config edit that keeps the admin's comments and layout.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dealmail.cli import main
from dealmail.config import load_config
from dealmail.passwords import hash_password, set_password_in_file, verify_password

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"


pytestmark = pytest.mark.usefixtures("restore_logging")



def comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]


def test_hash_then_verify_round_trip() -> None:
    stored = hash_password("correct horse battery staple")
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert salt and digest
    assert verify_password("correct horse battery staple", stored)


def test_wrong_password_is_refused() -> None:
    stored = hash_password("correct horse battery staple")
    assert not verify_password("correct horse battery stapl", stored)
    assert not verify_password("", stored)
    assert not verify_password("CORRECT HORSE BATTERY STAPLE", stored)


def test_each_hash_has_its_own_salt() -> None:
    a, b = hash_password("same password"), hash_password("same password")
    assert a != b
    assert verify_password("same password", a) and verify_password("same password", b)


def test_non_ascii_password() -> None:
    stored = hash_password("パスワード-ünïcode")
    assert verify_password("パスワード-ünïcode", stored)
    assert not verify_password("パスワード-unicode", stored)


@pytest.mark.parametrize("stored", [None, ""])
def test_unknown_user_or_empty_hash_never_verifies(stored: str | None) -> None:
    # Even the password that would match the fixed dummy hash's inputs is refused.
    assert not verify_password("", stored)
    assert not verify_password("anything at all", stored)


@pytest.mark.parametrize(
    "stored",
    ["plain-text", "md5$abc", "scrypt$x$8$1$AAAA$AAAA", "scrypt$16384$8$1$!!$??",
     "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"],
)
def test_malformed_or_foreign_hash_is_refused_without_crashing(stored: str) -> None:
    assert verify_password("plain-text", stored) is False


def test_set_password_in_file_keeps_comments_and_replaces_only_that_line(
    config_copy: Path,
) -> None:
    before = config_copy.read_text(encoding="utf-8")
    stored = hash_password("alice-relay-password")
    set_password_in_file(config_copy, "alice@example.com", stored)
    after = config_copy.read_text(encoding="utf-8")
    assert comments(after) == comments(before)
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True)
               if a != b]
    assert changed == [('password_hash = ""', f'password_hash = "{stored}"')]
    alice = load_config(config_copy).companies[0].user("alice@example.com")
    assert alice is not None and verify_password("alice-relay-password", alice.password_hash)


def test_set_password_in_file_adds_the_line_when_missing(config_copy: Path) -> None:
    stored = hash_password("bob-relay-password")
    set_password_in_file(config_copy, "BOB@example.com", stored)
    lines = config_copy.read_text(encoding="utf-8").splitlines()
    i = lines.index('address = "bob@example.com"')
    assert lines[i + 1] == f'password_hash = "{stored}"'
    config = load_config(config_copy)
    bob = config.companies[0].user("bob@example.com")
    alice = config.companies[0].user("alice@example.com")
    assert bob is not None and verify_password("bob-relay-password", bob.password_hash)
    assert alice is not None and alice.password_hash == ""


def test_set_password_in_file_unknown_address(config_copy: Path) -> None:
    before = config_copy.read_bytes()
    with pytest.raises(KeyError):
        set_password_in_file(config_copy, "nobody@example.com", hash_password("x" * 12))
    assert config_copy.read_bytes() == before


def test_cli_set_password_reads_stdin_and_the_file_then_validates(config_copy: Path) -> None:
    before = config_copy.read_text(encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DEALMAIL_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dealmail.cli", "set-password", "bob@example.com",
         "--config", str(config_copy)],
        input="a long relay password\n", capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"password set for bob@example.com in {config_copy}"
    after = config_copy.read_text(encoding="utf-8")
    assert comments(after) == comments(before)
    assert "a long relay password" not in after
    bob = load_config(config_copy).companies[0].user("bob@example.com")
    assert bob is not None and bob.password_hash.startswith("scrypt$16384$8$1$")
    assert verify_password("a long relay password", bob.password_hash)
    assert not verify_password("a long relay passwor", bob.password_hash)
    # The edited file validates as a whole.
    check = subprocess.run(
        [sys.executable, "-m", "dealmail.cli", "check-config", "--config", str(config_copy)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "user bob@example.com (user; default private; auto deal linking on; ja; " \
        "Asia/Tokyo; relay password set)" in check.stdout


def test_cli_set_password_by_alternate_address_sets_the_users_hash(
    config_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("alice's new password\r\n"))
    assert main(["set-password", "Alice.Personal@mail.test", "--config", str(config_copy)]) == 0
    assert "password set for alice@example.com" in capsys.readouterr().out
    alice = load_config(config_copy).companies[0].user("alice@example.com")
    assert alice is not None and verify_password("alice's new password", alice.password_hash)


def test_cli_set_password_unknown_user(
    config_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    before = config_copy.read_bytes()
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long relay password\n"))
    assert main(["set-password", "carol@example.com", "--config", str(config_copy)]) == 67
    assert "unknown user 'carol@example.com'" in capsys.readouterr().err
    assert config_copy.read_bytes() == before


def test_cli_set_password_too_short(
    config_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    before = config_copy.read_bytes()
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["set-password", "bob@example.com", "--config", str(config_copy)]) == 2
    assert "at least 10 characters" in capsys.readouterr().err
    assert config_copy.read_bytes() == before


def test_set_password_in_file_when_the_hash_line_comes_before_the_address(
    tmp_path: Path,
) -> None:
    """Keys of a TOML table come in any order: the existing line is replaced, never doubled
    (a second ``password_hash`` key would make the whole file invalid TOML)."""
    path = tmp_path / "dealmail.toml"
    path.write_text(
        '[[companies]]\nslug = "example"\nname = "Example"\ninternal_domains = ["example.com"]\n'
        '\n[[companies.users]]\n# set with dealmail set-password\npassword_hash = ""\n'
        'address = "alice@example.com"\n'
        '\n[[companies.users]]\npassword_hash = ""\naddress = "bob@example.com"\n',
        encoding="utf-8")
    stored = hash_password("bob-relay-password")
    set_password_in_file(path, "bob@example.com", stored)
    text = path.read_text(encoding="utf-8")
    assert text.count("password_hash") == 2
    assert "# set with dealmail set-password" in text
    config = load_config(path)
    bob = config.companies[0].user("bob@example.com")
    alice = config.companies[0].user("alice@example.com")
    assert bob is not None and verify_password("bob-relay-password", bob.password_hash)
    assert alice is not None and alice.password_hash == ""
