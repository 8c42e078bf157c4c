"""Checking a file's rows: a row's cells by field, the problems found (``FILE:LINE: column:
message``), and the cell rules every kind shares (names, addresses, column widths)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from dealmail.addresses import AddressError, normalize_address

from .reading import Table

_PROGRESS_EVERY = 1000
_MAX_PROBLEMS = 1000  # beyond this the list stops growing; the file is refused anyway

# Column widths of crmstore.models, checked here because SQLite would store an overlong value
# silently while PostgreSQL refuses it: the same file must behave the same on both.
LEN_ORG_NAME = 300
LEN_ADDRESS = 320

_EMAIL_SPLIT_RE = re.compile(r"[,;]")


def clean(value: str) -> str:
    """Names are compared and stored NFC-normalised with surrounding and repeated spaces
    removed, so that a spreadsheet's stray spaces do not create a second person."""
    value = " ".join(value.split())
    return value if value.isascii() else unicodedata.normalize("NFC", value)


def name_key(name: str) -> str:
    return clean(name).casefold()


class Rows:
    """Problems of one file, with access to a row's cells by field."""

    def __init__(self, table: Table, cols: dict[str, list[int]],
                 freemail: frozenset[str] = frozenset(),
                 internal: frozenset[str] = frozenset()) -> None:
        self.table = table
        self.cols = cols
        self.freemail = freemail
        self.internal = internal
        self.problems: list[str] = []

    def column_name(self, field_name: str) -> str:
        idx = self.cols.get(field_name)
        return self.table.header[idx[0]] if idx else field_name

    def add(self, line: int, column: str, message: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{self.table.path}:{line}: {column}: {message}")

    def first(self, cells: list[str], field_name: str) -> tuple[str, str]:
        """The first non-empty cell of a field and its column name; ("", name) if none."""
        for i in self.cols.get(field_name, ()):
            if i < len(cells) and cells[i].strip():
                return cells[i].strip(), self.table.header[i]
        return "", self.column_name(field_name)

    def all(self, cells: list[str], field_name: str) -> list[tuple[str, str]]:
        out = []
        for i in self.cols.get(field_name, ()):
            if i < len(cells) and cells[i].strip():
                out.append((cells[i].strip(), self.table.header[i]))
        return out

    def check_width(self, line: int, cells: list[str]) -> bool:
        extra = [c for c in cells[len(self.table.header):] if c.strip()]
        if extra:
            self.add(line, "(row)", f"{len(cells)} cells but the header has "
                     f"{len(self.table.header)} columns")
            return False
        return True


def too_long(rows: Rows, line: int, column: str, value: str, limit: int) -> bool:
    if len(value) > limit:
        rows.add(line, column, f"longer than {limit} characters")
        return True
    return False


def tick(progress: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if progress is not None and done % _PROGRESS_EVERY == 0:
        progress(done, total)


def required(rows: Rows, field_name: str, label: str) -> bool:
    if field_name not in rows.cols:
        rows.add(1, "(header)", f"no {label} column (columns: {', '.join(rows.table.header)})")
        return False
    return True


def addresses_of(rows: Rows, line: int, cells: list[str], field_name: str) -> list[str] | None:
    found: list[str] = []
    ok = True
    for value, column in rows.all(cells, field_name):
        for part in _EMAIL_SPLIT_RE.split(value):
            part = part.strip()
            if not part:
                continue
            try:
                addr = normalize_address(part)
            except AddressError as exc:
                rows.add(line, column, f"invalid address {part!r}: {exc}")
                ok = False
                continue
            if len(addr) > LEN_ADDRESS:
                rows.add(line, column, f"address longer than {LEN_ADDRESS} characters")
                ok = False
                continue
            found.append(addr)
    return list(dict.fromkeys(found)) if ok else None
