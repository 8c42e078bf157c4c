"""Relay passwords: scrypt hashes in the config, constant-time checks, and ``set-password``.

The config holds ``password_hash = "scrypt$N$r$p$salt$hash"`` (hashlib.scrypt, RFC 7914) and
never a plain password. ``set_password_in_file`` edits only that one line of the user's block,
so the admin's comments and layout stay as written.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from pathlib import Path

# RFC 7914 §2 parameters; N=2**14, r=8 costs ~16 MiB and ~50 ms here: fine for a login.
_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


# A fixed hash checked when the user is unknown, so both failures cost the same time.
_DUMMY = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; an unknown user or empty hash costs as much as a wrong password."""
    target = stored or _DUMMY
    try:
        scheme, n, r, p, salt_b64, hash_b64 = target.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(hash_b64)
        digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=int(n), r=int(r),
                                p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected) and stored is not None and bool(stored)


def set_password_in_file(path: Path, address: str, password_hash: str) -> None:
    """Write ``password_hash`` into the ``[[companies.users]]`` block whose address is
    ``address``: replace its ``password_hash`` line, or add one after ``address``."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    addr_re = re.compile(r'^\s*address\s*=\s*"([^"]*)"')
    start = None
    for i, line in enumerate(lines):
        m = addr_re.match(line)
        if m and m.group(1).strip().lower() == address.lower():
            start = i
            break
    if start is None:
        raise KeyError(address)
    # The user's table runs from its header to the next header; its keys come in any order,
    # so an existing password_hash line may sit above the address line too.
    begin = 0
    for j in range(start - 1, -1, -1):
        if lines[j].lstrip().startswith("["):
            begin = j + 1
            break
    end = len(lines)
    for j in range(start + 1, len(lines)):
        if lines[j].lstrip().startswith("["):
            end = j
            break
    new_line = f'password_hash = "{password_hash}"\n'
    for j in range(begin, end):
        if re.match(r"^\s*password_hash\s*=", lines[j]):
            lines[j] = new_line
            break
    else:
        lines.insert(start + 1, new_line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)
