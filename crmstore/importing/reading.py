"""Reading a CSV file into a header and rows: decoding, the delimiter, the physical line each
row starts on, and which column holds which field (names canonicalised: case, spaces,
Pipedrive's ``Entity - Field`` prefixes, the headers of Japanese spreadsheet templates)."""

from __future__ import annotations

import codecs
import csv
import io
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .encoding import detect_encoding
from .report import CsvImportError

_EMAIL_COLUMN_RE = re.compile(r"^(?:e-?mails?|e-?mail addresse?s?)(?:\s*\d+|\s*-\s*.+|\s*\(.+\))?$")
_ENTITY_PREFIXES = {"organization": "organization", "organisation": "organization",
                    "person": "person", "deal": "deal"}


@dataclass
class Table:
    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]  # (physical line of the row's first line, cells)


def _decode(path: Path, data: bytes, encoding: str | None) -> str:
    enc = encoding or detect_encoding(data)
    try:
        codecs.lookup(enc)
    except LookupError as exc:
        raise CsvImportError([f"{path}:1: (file): unknown encoding {enc!r}"]) from exc
    if enc.replace("_", "-").lower() in ("utf-8", "utf8"):
        enc = "utf-8-sig"  # a forced utf-8 must still drop a BOM, or it sticks to column 1
    try:
        return data.decode(enc)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CsvImportError([
            f"{path}:{line}: (file): not valid {enc} (byte 0x{data[exc.start]:02x}); "
            "use --encoding to name the file's encoding"
        ]) from exc


def _delimiter(text: str) -> str:
    first = text.split("\n", 1)[0]
    if "," in first:
        return ","
    if ";" in first:
        return ";"
    if "\t" in first:
        return "\t"
    return ","


def read_table(path: Path, data: bytes, encoding: str | None) -> Table:
    text = _decode(path, data, encoding)
    if "\x00" in text:
        # PostgreSQL text cannot hold NUL; refuse it on every backend alike.
        line = text[: text.index("\x00")].count("\n") + 1
        raise CsvImportError([f"{path}:{line}: (file): NUL character in the file"])
    # newline="" keeps line ends inside quoted cells as they are (csv module docs); the
    # reader's line_num then counts physical lines, so a row starts one after the previous
    # row's last line.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text), strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    last = 0
    try:
        for cells in reader:
            start, last = last + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue  # blank line (spreadsheets append some)
            if header is None:
                header = [c.strip() for c in cells]
                continue
            rows.append((start, cells))
    except csv.Error as exc:
        # Name the line where the broken record starts (an unclosed quote swallows the rest
        # of the file, so the line where the reader gave up is not where the mistake is).
        raise CsvImportError([
            f"{path}:{last + 1}: (file): malformed CSV in the record starting on this line "
            f"(read up to line {reader.line_num}): {exc}"
        ]) from exc
    if header is None:
        raise CsvImportError([f"{path}:1: (header): the file is empty"])
    return Table(path, header, rows)






def _canon(header: str) -> tuple[str, str]:
    """``"Person - Email - Work"`` -> ``("person", "email - work")``; ``"Title"`` ->
    ``("", "title")``; ``"メールアドレス2"`` -> ``("", "email 2")``."""
    h = unicodedata.normalize("NFKC", header.replace("\ufeff", ""))
    h = " ".join(h.replace("_", " ").lower().split())
    parts = [p.strip() for p in h.split(" - ")]
    if len(parts) > 1 and parts[0] in _ENTITY_PREFIXES:
        return _ENTITY_PREFIXES[parts[0]], " - ".join(parts[1:])
    base, number = _TRAILING_NUMBER_RE.match(h).groups()  # type: ignore[union-attr]
    if base in _JA_HEADERS:
        return "", _JA_HEADERS[base] + (f" {number}" if number else "")
    return "", h


# Headers of Japanese spreadsheet templates (matched after NFKC, so full-width digits work).
_JA_HEADERS = {
    "名前": "name", "氏名": "name", "会社名": "organization", "会社": "organization",
    "組織": "organization", "組織名": "organization", "取引先": "organization",
    "メール": "email", "メールアドレス": "email", "eメール": "email", "ドメイン": "domains",
    "ウェブサイト": "website", "url": "url", "案件名": "title", "商談名": "title",
    "ステータス": "status", "状態": "status", "金額": "value", "通貨": "currency",
    "担当者": "owner", "ステージ": "stage", "フェーズ": "stage", "顧客": "person",
    "担当窓口": "person",
}
_TRAILING_NUMBER_RE = re.compile(r"^(.*?)\s*(\d*)$")

_ORG_NAMES = {"name", "organization", "organisation", "organization name", "company",
              "company name"}


def columns_for(kind: str, header: list[str]) -> dict[str, list[int]]:
    """Field name -> column indexes, in file order."""
    cols: dict[str, list[int]] = {}

    def add(name: str, index: int) -> None:
        cols.setdefault(name, []).append(index)

    for i, raw in enumerate(header):
        entity, f = _canon(raw)
        if kind == "organizations":
            if entity not in ("", "organization"):
                continue
            if f in _ORG_NAMES:
                add("name", i)
            elif f in ("domains", "domain", "email domains", "email domain", "mail domains"):
                add("domains", i)
            elif f in ("website", "web site", "url", "web"):
                add("website", i)
        elif kind == "persons":
            if entity in ("", "person"):
                if f in ("name", "person", "full name", "person name", "contact name"):
                    add("name", i)
                elif _EMAIL_COLUMN_RE.match(f):
                    add("email", i)
                elif f in _ORG_NAMES - {"name"}:
                    add("organization", i)
            elif entity == "organization" and f == "name":
                add("organization", i)
        else:
            if entity in ("", "deal"):
                if f in ("title", "deal title", "deal name", "deal") or (
                        entity == "deal" and f == "name"):
                    add("title", i)
                elif f == "status":
                    add("status", i)
                elif f in ("value", "amount"):
                    add("value", i)
                elif f == "currency" or f == "value currency":
                    add("currency", i)
                elif f in ("owner", "deal owner", "owner email", "owner address"):
                    add("owner", i)
                elif f in ("stage", "pipeline stage"):
                    add("stage", i)
                elif f in ("id", "deal id", "external id"):
                    add("id", i)
                elif f in ("person", "contact person", "contact", "person name"):
                    add("person", i)
                elif _EMAIL_COLUMN_RE.match(f) or f in ("person email", "contact email"):
                    add("person_email", i)
                elif f in _ORG_NAMES - {"name"}:
                    add("organization", i)
            elif entity == "person":
                if f == "name":
                    add("person", i)
                elif _EMAIL_COLUMN_RE.match(f):
                    add("person_email", i)
            elif entity == "organization" and f == "name":
                add("organization", i)
    return cols
