"""CSV import of organizations, persons and deals into one company's CRM store.

The admin runs ``dealmail import organizations|persons|deals FILE.csv --company SLUG``. A file
is imported whole or not at all: every row is checked first, every bad row is reported as
``FILE:LINE: column: message`` (LINE is the physical line of the file, the header is line 1, a
quoted cell spanning lines counts all its lines), and only a file without a single bad row is
written, in one transaction. Importing the same file twice changes nothing the second time.

Formats
=======

Two formats are accepted, and may be mixed: the *minimal* one (the columns below) and
*Pipedrive exports*, whose columns carry the entity as a prefix (``Organization - Name``,
``Person - Email - Work``, ``Deal - Title``). Column names are matched case-insensitively;
columns that are not recognised (phones, labels, custom fields) are ignored. The delimiter is a
comma, or a semicolon or tab when the header line has one of those and no comma (spreadsheet
exports in some locales).

Minimal format::

    organizations.csv   Name,Domains
    persons.csv         Name,Email,Organization
    deals.csv           Title,Status,Person,Organization,Value,Currency,Owner,Stage[,ID]

organizations
    ``Name`` (required; also ``Organization``). ``Domains`` / ``Domain``: one or more mail
    domains separated by commas, semicolons or spaces. ``Website`` / ``URL``: its host is taken
    as a domain (a leading ``www.`` is dropped). A domain belongs to one organization only.
    An existing organization (same name, compared case-insensitively) gets the new domains.

persons
    ``Name``; ``Email``: one column holding several addresses separated by commas or
    semicolons, and/or several columns (``Email``, ``Email 2``, ``Email - Work``,
    ``Person - Email - Home``…). ``Organization`` (also ``Company``, ``Organization - Name``):
    created when no organization has that name (the report counts it). A person is matched by
    *any* of its addresses, so a row with a known address and a new one adds the new address.
    A row without any address is matched by its name (and organization) instead. Addresses are
    normalised with :func:`dealmail.addresses.normalize_address`.

deals
    ``Title`` (required). ``Status``: open, won or lost (any case; empty means open;
    Pipedrive's "deleted" is refused). ``Person``: a person's name or one of its addresses
    (also ``Contact person``, ``Person - Name``, ``Person - Email``); the person must exist.
    ``Organization``: created when missing; empty means the person's organization.
    ``Value``: a non-negative amount, ``12000``, ``12000.50`` or ``12,000.50``.
    ``Currency``: a 3-letter code.
    ``Owner``: the address (or the unique name) of a dealmail user of the company. ``Stage``.
    ``ID`` (``Deal - ID``): an external id; when present it identifies the deal, otherwise the
    deal is identified by (title, person, organization).

An import adds and changes, it never erases: an empty cell or a missing column leaves the stored
value as it is. Given the config's freemail and internal domains, an organization cannot own
such a domain and a person cannot have an address in the company's own domains.

Encoding: UTF-8 with or without a byte-order mark, else Shift_JIS/CP932 (Japanese spreadsheet
exports), else Windows-1252 (see :func:`detect_encoding`); ``--encoding`` forces one.

Speed: existing rows are loaded into dictionaries once, new rows get ids reserved in one query
and are written with multi-row INSERTs, so 100,000 persons import in seconds.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import peewee
from peewee import IntegrityError, Model

from dealmail.addresses import AddressError, normalize_address, normalize_domain

from . import models as m
from .db import Store

__all__ = [
    "KINDS",
    "CsvImportError",
    "ImportReport",
    "detect_encoding",
    "import_csv",
]

KINDS = ("organizations", "persons", "deals")

_PROGRESS_EVERY = 1000
_MAX_PROBLEMS = 1000  # beyond this the list stops growing; the file is refused anyway

# Column widths of crmstore.models, checked here because SQLite would store an overlong value
# silently while PostgreSQL refuses it: the same file must behave the same on both.
_LEN_ORG_NAME = 300
_LEN_PERSON_NAME = 300
_LEN_ADDRESS = 320
_LEN_TITLE = 300
_LEN_STAGE = 100
_LEN_EXTERNAL_ID = 64

_STATUSES = {"open": "open", "won": "won", "lost": "lost"}
_VALUE_RE = re.compile(r"^(?:\d+|\d{1,3}(?:,\d{3})+)(?:\.\d{1,2})?$")
_CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")
_LIST_SPLIT_RE = re.compile(r"[,;\s]+")
_EMAIL_SPLIT_RE = re.compile(r"[,;]")
_EMAIL_COLUMN_RE = re.compile(r"^(?:e-?mails?|e-?mail addresse?s?)(?:\s*\d+|\s*-\s*.+|\s*\(.+\))?$")
_NON_ASCII_RUN_RE = re.compile(r"[^\x00-\x7f]+")
_ENTITY_PREFIXES = {"organization": "organization", "organisation": "organization",
                    "person": "person", "deal": "deal"}


@dataclass
class ImportReport:
    """What an import did: ``rows`` data rows read; ``created``/``updated``/``unchanged``
    count the rows' own kind; ``organizations_created`` counts organizations created because
    a person or deal named one that did not exist."""

    kind: str
    rows: int
    created: int
    updated: int
    unchanged: int
    organizations_created: int = 0

    def summary(self) -> str:
        text = (f"{self.kind}: {self.rows} rows, {self.created} created, {self.updated} updated, "
                f"{self.unchanged} unchanged")
        if self.organizations_created:
            text += f"; {self.organizations_created} organizations created"
        return text


class CsvImportError(Exception):
    """The file was refused and nothing was written; ``problems`` are
    ``FILE:LINE: column: message``, one per bad cell or row, in file order."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# --------------------------------------------------------------------------- encoding


# What CP932 text of a Japanese spreadsheet decodes to: kana, kanji, full-width forms, and the
# JIS X 0208 symbols (※, ①, ■, ★, ×, °...), which CP932 maps to these code points.
_JAPANESE_RANGES = (
    (0x3000, 0x30FF),  # CJK punctuation, hiragana, katakana
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # kanji
    (0xFF01, 0xFF9F), (0xFFE0, 0xFFE5),  # full-width forms, half-width katakana
    (0x2010, 0x203B), (0x2100, 0x22FF), (0x2460, 0x24FF), (0x2500, 0x26FF),  # symbols
    (0x3200, 0x33FF),  # enclosed and squared CJK (㈱, ㎡)
)
_JAPANESE_LATIN1 = frozenset("§¨°±´¶×÷")


def _is_japanese(ch: str) -> bool:
    o = ord(ch)
    return ch in _JAPANESE_LATIN1 or any(lo <= o <= hi for lo, hi in _JAPANESE_RANGES)


def _plausible_cp932(text: str) -> bool:
    """Whether text decoded as CP932 reads as Japanese rather than as Windows-1252 bytes that
    happen to form valid CP932 (``São Paulo`` -> ``S縊 Paulo``, ``Øresund`` -> ``ﾘresund``).

    Windows-1252 accents come one at a time inside Latin words, so misread they give runs
    of one character glued to an ASCII letter; Japanese comes in runs of several characters
    (names, 株式会社). CP932 is chosen when all non-ASCII runs are Japanese characters, none
    is private-use (CP932 lead bytes 0xF0-0xF9), and at most a quarter are such one-character
    runs (``A社`` exists in Japanese, but not as the whole file)."""
    runs = suspicious = 0
    n = len(text)
    for match in _NON_ASCII_RUN_RE.finditer(text):  # skips the ASCII bulk at C speed
        run = match.group()
        runs += 1
        if not all(_is_japanese(ch) for ch in run):
            return False
        if len(run) == 1:
            before = text[match.start() - 1] if match.start() > 0 else ""
            after = text[match.end()] if match.end() < n else ""
            if (before.isascii() and before.isalpha()) or (after.isascii() and after.isalpha()):
                suspicious += 1
    return runs > 0 and suspicious * 4 <= runs


def detect_encoding(data: bytes) -> str:
    """The encoding of a CSV export: ``utf-8-sig`` (BOM, as Excel writes "CSV UTF-8"),
    ``utf-16`` (BOM, Excel's "Unicode text"), ``utf-8`` when the bytes are valid UTF-8,
    ``cp932`` when they are valid CP932 and read as Japanese (Excel's CSV on a Japanese
    Windows), else ``cp1252`` (which decodes any byte, so the admin sees mojibake in names
    rather than a refusal; ``--encoding`` overrides)."""
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp932")
    except UnicodeDecodeError:
        return "cp1252"
    return "cp932" if _plausible_cp932(text) else "cp1252"


# --------------------------------------------------------------------------- reading


@dataclass
class _Table:
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


def _read_table(path: Path, data: bytes, encoding: str | None) -> _Table:
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
    return _Table(path, header, rows)


# --------------------------------------------------------------------------- columns


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


def _columns_for(kind: str, header: list[str]) -> dict[str, list[int]]:
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


# --------------------------------------------------------------------------- helpers


def _clean(value: str) -> str:
    """Names are compared and stored NFC-normalised with surrounding and repeated spaces
    removed, so that a spreadsheet's stray spaces do not create a second person."""
    value = " ".join(value.split())
    return value if value.isascii() else unicodedata.normalize("NFC", value)


def _key(name: str) -> str:
    return _clean(name).casefold()


class _Rows:
    """Problems of one file, with access to a row's cells by field."""

    def __init__(self, table: _Table, cols: dict[str, list[int]],
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


def _too_long(rows: _Rows, line: int, column: str, value: str, limit: int) -> bool:
    if len(value) > limit:
        rows.add(line, column, f"longer than {limit} characters")
        return True
    return False


class _Orgs:
    """The company's organizations by name, plus those this import will create (negative
    placeholder ids until the write phase)."""

    def __init__(self, company_id: int) -> None:
        self.by_key: dict[str, int] = {}
        self.exact: dict[str, int] = {}
        self.names: dict[int, str] = {}
        for oid, name in _raw(m.Organization.select(m.Organization.id, m.Organization.name)
                              .where(m.Organization.company == company_id)
                              .order_by(m.Organization.id)):
            self.names[oid] = name
            self.exact[name] = oid
            self.by_key.setdefault(_key(name), oid)
        self.new: list[str] = []

    def find(self, name: str) -> int | None:
        # Stored names are unique only as written: should two differ only in case, the one
        # written exactly like the cell wins, else the oldest.
        cleaned = _clean(name)
        hit = self.exact.get(cleaned)
        return hit if hit is not None else self.by_key.get(cleaned.casefold())

    def find_or_plan(self, name: str) -> int:
        oid = self.find(name)
        if oid is None:
            self.new.append(_clean(name))
            oid = -len(self.new)
            self.by_key[_key(name)] = oid
            self.names[oid] = _clean(name)
        return oid

    def write(self, store: Store, company_id: int, now: datetime) -> dict[int, int]:
        """Insert the planned organizations; returns placeholder id -> real id."""
        ids = _reserve_ids(store, m.Organization, len(self.new))
        mapping = {-(i + 1): real for i, real in enumerate(ids)}
        _insert(store, m.Organization, [m.Organization.id, m.Organization.company,
                                        m.Organization.name, m.Organization.created_at],
                [(real, company_id, name, now) for real, name in zip(ids, self.new, strict=True)])
        return mapping


def _tuples(query: Any) -> list[tuple[Any, ...]]:
    """Rows of a peewee select as plain tuples (typed loosely: peewee's stubs type a
    ``.tuples()`` query as yielding model instances)."""
    return list(query.tuples())


def _raw(query: Any) -> list[tuple[Any, ...]]:
    """Rows as the driver returns them, without peewee's per-value conversion: for the
    100,000-row preloads of ids, names and addresses (ints and strings on both backends)."""
    return list(query.model._meta.database.execute(query).fetchall())


def _reserve_ids(store: Store, model: type[Model], n: int) -> list[int]:
    """Ids for ``n`` new rows, so that rows referring to them can be written in bulk.

    PostgreSQL: taken from the table's own sequence (safe against concurrent writers).
    SQLite: after the current maximum; the import holds the write lock (BEGIN IMMEDIATE), so
    nobody else can take them meanwhile."""
    if n == 0:
        return []
    table = model._meta.table_name
    if store.is_sqlite:
        start = store.db.execute_sql(f'SELECT COALESCE(MAX(id), 0) FROM "{table}"').fetchone()[0]
        return list(range(int(start) + 1, int(start) + 1 + n))
    cursor = store.db.execute_sql(
        "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
        (table, n))
    return [int(r[0]) for r in cursor.fetchall()]


def _insert(store: Store, model: type[Model], fields: list[Any],
            rows: list[tuple[Any, ...]]) -> None:
    """Bulk insert straight through the driver (building 100,000 rows as peewee expressions
    costs ten times more than writing them). Values still go through each field's
    ``db_value`` so they are stored exactly as peewee would store them."""
    if not rows:
        return
    table = model._meta.table_name
    columns = ", ".join(f'"{f.column_name}"' for f in fields)
    convert = [f.db_value for f in fields]
    plain = (int, str, type(None))  # stored as is; skipping db_value halves the Python work
    values = [tuple(v if type(v) in plain else c(v) for c, v in zip(convert, row, strict=True))
              for row in rows]
    # The driver's own exceptions become peewee's (IntegrityError...), as for any query.
    with peewee.__exception_wrapper__:
        _driver_insert(store, table, columns, len(fields), values)


def _driver_insert(store: Store, table: str, columns: str, width: int,
                   values: list[tuple[Any, ...]]) -> None:
    cursor = store.db.cursor()
    if store.is_sqlite:
        marks = ", ".join("?" * width)
        cursor.executemany(f'INSERT INTO "{table}" ({columns}) VALUES ({marks})', values)
        return
    # PostgreSQL: COPY is its bulk-load path (a third faster than multi-row INSERTs here).
    # CSV format with every value quoted and NULL written as an unquoted \N, so that an empty
    # string stays an empty string and no cell text can be mistaken for NULL.
    buffer = io.StringIO()
    for row in values:
        buffer.write(",".join(
            "\\N" if v is None else '"' + str(v).replace('"', '""') + '"' for v in row))
        buffer.write("\n")
    buffer.seek(0)
    cursor.copy_expert(
        f"COPY \"{table}\" ({columns}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", buffer)


# --------------------------------------------------------------------------- import


def import_csv(store: Store, company_slug: str, kind: str, path: Path,
               encoding: str | None = None,
               progress: Callable[[int, int], None] | None = None,
               *, now: Callable[[], datetime] = m.utcnow,
               freemail_domains: Iterable[str] = (),
               internal_domains: Iterable[str] = ()) -> ImportReport:
    """Import one CSV file of ``kind`` into the company ``company_slug``.

    Runs in one transaction; raises :class:`CsvImportError` (nothing written) listing every
    bad row, :class:`crmstore.db.StoreError` for an unknown company, ``ValueError`` for an
    unknown kind. ``progress(done, total)`` is called every 1,000 rows checked and once when
    the rows are written. ``now`` gives the timestamps of new and changed rows.

    Pass the config's ``policy.freemail_domains`` and the company's ``internal_domains``
    (normalised, as the config holds them): an organization cannot own a freemail or an
    internal domain, and a person cannot have an address in an internal domain (those
    addresses are colleagues, never customers: docs/architecture.md)."""
    if kind not in KINDS:
        raise ValueError(f"unknown import kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CsvImportError([f"{path}:1: (file): cannot read: {exc.strerror}"]) from exc
    table = _read_table(path, data, encoding)
    cols = _columns_for(kind, table.header)
    rows = _Rows(table, cols, frozenset(freemail_domains), frozenset(internal_domains))
    importer = {"organizations": _import_organizations, "persons": _import_persons,
                "deals": _import_deals}[kind]
    try:
        with store.transaction():
            company_id = store.company_id(company_slug)
            report = importer(store, company_id, rows, progress, now())
            if rows.problems:
                # Raising inside the transaction rolls it back: whole file or nothing.
                raise CsvImportError(rows.problems)
    except IntegrityError as exc:
        # Only a concurrent writer can get here (the rows were checked against what was
        # read in this transaction): e.g. a Smart BCC message created the same person on
        # PostgreSQL meanwhile. Nothing was written; running the import again resolves it.
        raise CsvImportError([
            f"{path}:1: (file): the database changed during the import ({exc}); nothing was "
            "written, run the import again"
        ]) from exc
    if progress is not None:
        progress(len(table.rows), len(table.rows))
    return report


def _tick(progress: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if progress is not None and done % _PROGRESS_EVERY == 0:
        progress(done, total)


def _required(rows: _Rows, field_name: str, label: str) -> bool:
    if field_name not in rows.cols:
        rows.add(1, "(header)", f"no {label} column (columns: {', '.join(rows.table.header)})")
        return False
    return True


# ------------------------------------------------------------------ organizations


def _domains_of(rows: _Rows, line: int, cells: list[str]) -> list[str] | None:
    found: list[str] = []
    ok = True
    for value, column in rows.all(cells, "domains"):
        for part in _LIST_SPLIT_RE.split(value):
            if not part:
                continue
            if "@" in part:
                part = part.rpartition("@")[2]  # "@customer.test" or a sample address
            try:
                found.append(normalize_domain(part))
            except AddressError as exc:
                rows.add(line, column, str(exc))
                ok = False
    for value, column in rows.all(cells, "website"):
        raw = value if "//" in value else f"//{value}"
        try:
            host = urlsplit(raw).hostname or ""
            domain = normalize_domain(host)
        except (AddressError, ValueError):
            rows.add(line, column, f"no host name in website {value!r}")
            ok = False
            continue
        found.append(domain.removeprefix("www."))
    return list(dict.fromkeys(found)) if ok else None


def _import_organizations(store: Store, company_id: int, rows: _Rows,
                          progress: Callable[[int, int], None] | None,
                          now: datetime) -> ImportReport:
    total = len(rows.table.rows)
    report = ImportReport("organizations", total, 0, 0, 0)
    if not _required(rows, "name", "Name"):
        return report
    orgs = _Orgs(company_id)
    domain_owner: dict[str, int] = dict(_raw(
        m.OrgDomain.select(m.OrgDomain.domain, m.OrgDomain.organization)
        .where(m.OrgDomain.company == company_id)))
    seen_org: dict[int, int] = {}  # org id -> line
    seen_domain: dict[str, int] = {}
    new_domains: list[tuple[int, str]] = []
    for done, (line, cells) in enumerate(rows.table.rows, start=1):
        _tick(progress, done, total)
        if not rows.check_width(line, cells):
            continue
        name, name_col = rows.first(cells, "name")
        bad = False
        if not name:
            rows.add(line, name_col, "an organization needs a name")
            bad = True
        elif _too_long(rows, line, name_col, _clean(name), _LEN_ORG_NAME):
            bad = True
        domains = _domains_of(rows, line, cells)
        if bad or domains is None:
            continue
        oid = orgs.find(name)
        if oid is not None and oid in seen_org:
            rows.add(line, name_col, f"same organization as line {seen_org[oid]}")
            continue
        for d in domains:
            owner = domain_owner.get(d)
            if d in rows.internal:
                rows.add(line, rows.column_name("domains"),
                         f"{d} is one of the company's own domains: its addresses are "
                         "colleagues, never an organization's")
                bad = True
            elif d in rows.freemail:
                rows.add(line, rows.column_name("domains"),
                         f"{d} is a freemail domain: it cannot identify one organization")
                bad = True
            elif d in seen_domain:
                rows.add(line, rows.column_name("domains"),
                         f"domain {d} also on line {seen_domain[d]}")
                bad = True
            elif owner is not None and owner != oid:
                rows.add(line, rows.column_name("domains"),
                         f"domain {d} already belongs to organization {orgs.names[owner]!r}")
                bad = True
        if bad:
            continue
        if oid is None:
            oid = orgs.find_or_plan(name)
            report.created += 1
        added = [d for d in domains if d not in domain_owner]
        if oid > 0:
            if added:
                report.updated += 1
            else:
                report.unchanged += 1
        seen_org[oid] = line
        for d in domains:
            seen_domain[d] = line
            domain_owner[d] = oid
        new_domains.extend((oid, d) for d in added)
    if rows.problems:
        return report
    mapping = orgs.write(store, company_id, now)
    _insert(store, m.OrgDomain,
            [m.OrgDomain.organization, m.OrgDomain.company, m.OrgDomain.domain],
            [(mapping.get(oid, oid), company_id, d) for oid, d in new_domains])
    return report


# ------------------------------------------------------------------ persons


@dataclass
class _NewPerson:
    name: str
    org: int | None
    addresses: list[str] = field(default_factory=list)


def _addresses_of(rows: _Rows, line: int, cells: list[str], field_name: str) -> list[str] | None:
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
            if len(addr) > _LEN_ADDRESS:
                rows.add(line, column, f"address longer than {_LEN_ADDRESS} characters")
                ok = False
                continue
            found.append(addr)
    return list(dict.fromkeys(found)) if ok else None


def _user_addresses() -> set[str]:
    return {a for (a,) in _raw(m.User.select(m.User.address))}


def _import_persons(store: Store, company_id: int, rows: _Rows,
                    progress: Callable[[int, int], None] | None,
                    now: datetime) -> ImportReport:
    total = len(rows.table.rows)
    report = ImportReport("persons", total, 0, 0, 0)
    if "name" not in rows.cols and "email" not in rows.cols:
        rows.add(1, "(header)", "no Name or Email column "
                 f"(columns: {', '.join(rows.table.header)})")
        return report
    orgs = _Orgs(company_id)
    owner_of: dict[str, int] = dict(_raw(
        m.PersonAddress.select(m.PersonAddress.address, m.PersonAddress.person)
        .where(m.PersonAddress.company == company_id)))
    persons: dict[int, tuple[str, int | None]] = {
        pid: (name, org) for pid, name, org in _raw(
            m.Person.select(m.Person.id, m.Person.name, m.Person.organization)
            .where(m.Person.company == company_id))}
    by_name: dict[str, list[int]] | None = None  # built only if a row has no address
    users = _user_addresses()
    seen_addr: dict[str, int] = {}
    seen_person: dict[int, int] = {}
    new: list[_NewPerson] = []
    changed: dict[int, tuple[str, int | None]] = {}
    added: list[tuple[int, str]] = []  # (existing person id, address)

    for done, (line, cells) in enumerate(rows.table.rows, start=1):
        _tick(progress, done, total)
        if not rows.check_width(line, cells):
            continue
        raw_name, name_col = rows.first(cells, "name")
        name = _clean(raw_name)
        email_col = rows.column_name("email")
        addrs = _addresses_of(rows, line, cells, "email")
        org_name, org_col = rows.first(cells, "organization")
        bad = addrs is None
        if _too_long(rows, line, name_col, name, _LEN_PERSON_NAME):
            bad = True
        if org_name and _too_long(rows, line, org_col, _clean(org_name), _LEN_ORG_NAME):
            bad = True
        if bad or addrs is None:
            continue
        if not name and not addrs:
            rows.add(line, name_col, "a person needs a name or an email address")
            continue
        for a in addrs:
            if a in users:
                rows.add(line, email_col, f"{a} is a dealmail user's address, not a customer's")
                bad = True
            elif a.rpartition("@")[2] in rows.internal:
                rows.add(line, email_col, f"{a} is in one of the company's own domains: a "
                         "colleague, not a customer")
                bad = True
            elif a in seen_addr:
                rows.add(line, email_col, f"address {a} also on line {seen_addr[a]}")
                bad = True
        if bad:
            continue
        matched = sorted({owner_of[a] for a in addrs if a in owner_of})
        if len(matched) > 1:
            rows.add(line, email_col, "the addresses belong to different persons: "
                     + ", ".join(f"{persons[p][0]!r} (#{p})" for p in matched))
            continue
        org = orgs.find(org_name) if org_name else None
        if not addrs:
            if by_name is None:
                by_name = {}
                for pid, (pname, _) in persons.items():
                    by_name.setdefault(_key(pname), []).append(pid)
            candidates = by_name.get(_key(name), [])
            if org_name:
                candidates = [p for p in candidates if persons[p][1] == org]
            if len(candidates) > 1:
                rows.add(line, name_col, f"{len(candidates)} persons are named {name!r}; "
                         "add an email address to tell them apart")
                continue
            matched = candidates
        if matched and matched[0] in seen_person:
            rows.add(line, name_col, f"same person as line {seen_person[matched[0]]}")
            continue
        if org_name and org is None:
            org = orgs.find_or_plan(org_name)
            report.organizations_created += 1
        if not matched:
            person = _NewPerson(name, org, addrs)
            new.append(person)
            pid = -len(new)
            if by_name is not None:
                by_name.setdefault(_key(name), []).append(pid)
            persons[pid] = (name, org)
            report.created += 1
        else:
            pid = matched[0]
            old_name, old_org = persons[pid]
            new_name = name or old_name
            new_org = org if org_name else old_org
            fresh = [a for a in addrs if a not in owner_of]
            if (new_name, new_org) != (old_name, old_org):
                changed[pid] = (new_name, new_org)
                persons[pid] = (new_name, new_org)
            added.extend((pid, a) for a in fresh)
            if fresh or pid in changed:
                report.updated += 1
            else:
                report.unchanged += 1
        seen_person[pid] = line
        for a in addrs:
            seen_addr[a] = line
            owner_of.setdefault(a, pid)
    if rows.problems:
        return report

    org_ids = orgs.write(store, company_id, now)

    def real_org(oid: int | None) -> int | None:
        return org_ids.get(oid, oid) if oid is not None else None

    ids = _reserve_ids(store, m.Person, len(new))
    _insert(store, m.Person, [m.Person.id, m.Person.company, m.Person.name,
                              m.Person.organization, m.Person.auto_created, m.Person.created_at],
            [(pid, company_id, p.name, real_org(p.org), False, now)
             for pid, p in zip(ids, new, strict=True)])
    for pid, (pname, porg) in changed.items():
        (m.Person.update(name=pname, organization=real_org(porg))
         .where(m.Person.id == pid).execute())
    address_rows = [(pid, company_id, a)
                    for pid, p in zip(ids, new, strict=True) for a in p.addresses]
    address_rows.extend((pid, company_id, a) for pid, a in added)
    _insert(store, m.PersonAddress, [m.PersonAddress.person, m.PersonAddress.company,
                                     m.PersonAddress.address], address_rows)
    return report


# ------------------------------------------------------------------ deals


@dataclass
class _DealState:
    id: int  # negative: planned
    title: str
    status: str
    person: int | None
    org: int | None
    owner: int | None
    value: Decimal | None
    currency: str
    stage: str
    external_id: str | None

    def key(self) -> tuple[str, int | None, int | None]:
        return (_key(self.title), self.person, self.org)

    def values(self) -> tuple[Any, ...]:
        return (self.title, self.status, self.person, self.org, self.owner, self.value,
                self.currency, self.stage)


def _parse_value(text: str) -> Decimal | None:
    compact = text.replace(" ", "").replace("\u00a0", "")
    if not _VALUE_RE.match(compact):
        return None
    try:
        value = Decimal(compact.replace(",", ""))
    except InvalidOperation:
        return None
    # DecimalField(max_digits=14, decimal_places=2): at most 12 digits before the point.
    if value >= Decimal(10) ** 12:
        return None
    return value


class _People:
    """Persons of the company for resolving a deal's Person cell."""

    def __init__(self, company_id: int) -> None:
        self.by_address: dict[str, int] = dict(_raw(
            m.PersonAddress.select(m.PersonAddress.address, m.PersonAddress.person)
            .where(m.PersonAddress.company == company_id)))
        self.org: dict[int, int | None] = {}
        self.by_name: dict[str, list[int]] = {}
        for pid, name, org in _raw(
                m.Person.select(m.Person.id, m.Person.name, m.Person.organization)
                .where(m.Person.company == company_id)):
            self.org[pid] = org
            self.by_name.setdefault(_key(name), []).append(pid)


def _resolve_person(rows: _Rows, line: int, cells: list[str], people: _People,
                    orgs: _Orgs, org_name: str) -> tuple[bool, int | None]:
    """(ok, person id) from the Person cell (a name or an address) or a person email column."""
    value, column = rows.first(cells, "person")
    emails = _addresses_of(rows, line, cells, "person_email")
    if emails is None:
        return False, None
    if value and "@" in value:
        try:
            emails.insert(0, normalize_address(value))
        except AddressError as exc:
            rows.add(line, column, f"invalid address {value!r}: {exc}")
            return False, None
        value = ""
    found = {people.by_address[a] for a in emails if a in people.by_address}
    if len(found) > 1:
        rows.add(line, column, "the addresses belong to different persons")
        return False, None
    if found:
        return True, found.pop()
    if emails and not value:
        rows.add(line, column, f"unknown person {emails[0]}: import the persons first")
        return False, None
    if not value:
        return True, None
    candidates = people.by_name.get(_key(value), [])
    if len(candidates) > 1 and org_name:
        oid = orgs.find(org_name)
        candidates = [p for p in candidates if people.org[p] == oid]
    if not candidates:
        rows.add(line, column, f"unknown person {value!r}: import the persons first")
        return False, None
    if len(candidates) > 1:
        rows.add(line, column, f"{len(candidates)} persons are named {value!r}; "
                 "give the person's email address instead")
        return False, None
    return True, candidates[0]


def _import_deals(store: Store, company_id: int, rows: _Rows,
                  progress: Callable[[int, int], None] | None,
                  now: datetime) -> ImportReport:
    total = len(rows.table.rows)
    report = ImportReport("deals", total, 0, 0, 0)
    if not _required(rows, "title", "Title"):
        return report
    orgs = _Orgs(company_id)
    people = _People(company_id)
    user_by_address: dict[str, int] = {}
    user_by_name: dict[str, list[int]] = {}
    for uid, address, uname in _tuples(m.User.select(m.User.id, m.User.address, m.User.name)
                                       .where(m.User.company == company_id)):
        user_by_address[address] = uid
        if uname:
            user_by_name.setdefault(_key(uname), []).append(uid)
    slug = m.Company.get_by_id(company_id).slug
    by_external: dict[str, _DealState] = {}
    by_key: dict[tuple[str, int | None, int | None], _DealState] = {}
    for row in _tuples(m.Deal.select(m.Deal.id, m.Deal.title, m.Deal.status, m.Deal.person,
                                     m.Deal.organization, m.Deal.owner, m.Deal.value,
                                     m.Deal.currency, m.Deal.stage, m.Deal.external_id)
                       .where(m.Deal.company == company_id).order_by(m.Deal.id)):
        state = _DealState(*row)
        if state.external_id:
            by_external.setdefault(state.external_id, state)
        by_key.setdefault(state.key(), state)
    seen: dict[int, int] = {}
    new: list[_DealState] = []
    changed: dict[int, _DealState] = {}

    for done, (line, cells) in enumerate(rows.table.rows, start=1):
        _tick(progress, done, total)
        if not rows.check_width(line, cells):
            continue
        n_problems = len(rows.problems)
        title, title_col = rows.first(cells, "title")
        title = _clean(title)
        if not title:
            rows.add(line, title_col, "a deal needs a title")
        else:
            _too_long(rows, line, title_col, title, _LEN_TITLE)
        status_raw, status_col = rows.first(cells, "status")
        status = _STATUSES.get(status_raw.lower()) if status_raw else None
        if status_raw and status is None:
            why = ("deleted deals are not imported; remove the row"
                   if status_raw.lower() == "deleted" else "must be open, won or lost")
            rows.add(line, status_col, f"unknown status {status_raw!r}: {why}")
        value_raw, value_col = rows.first(cells, "value")
        value = _parse_value(value_raw) if value_raw else None
        if value_raw and value is None:
            rows.add(line, value_col, f"malformed value {value_raw!r} "
                     "(expected a number like 12000 or 12,000.50)")
        currency, currency_col = rows.first(cells, "currency")
        if currency and not _CURRENCY_RE.match(currency):
            rows.add(line, currency_col, f"currency {currency!r} is not a 3-letter code")
        stage, stage_col = rows.first(cells, "stage")
        stage = _clean(stage)
        _too_long(rows, line, stage_col, stage, _LEN_STAGE)
        external, id_col = rows.first(cells, "id")
        _too_long(rows, line, id_col, external, _LEN_EXTERNAL_ID)
        owner_raw, owner_col = rows.first(cells, "owner")
        owner: int | None = None
        if owner_raw:
            if "@" in owner_raw:
                try:
                    owner = user_by_address.get(normalize_address(owner_raw))
                except AddressError as exc:
                    rows.add(line, owner_col, f"invalid address {owner_raw!r}: {exc}")
                    owner = -1
            else:
                hits = user_by_name.get(_key(owner_raw), [])
                owner = hits[0] if len(hits) == 1 else None
            if owner is None:
                rows.add(line, owner_col, f"unknown owner {owner_raw!r}: not a user of "
                         f"company {slug!r}")
        org_name, org_col = rows.first(cells, "organization")
        if org_name:
            _too_long(rows, line, org_col, _clean(org_name), _LEN_ORG_NAME)
        ok, person = _resolve_person(rows, line, cells, people, orgs, org_name)
        if not ok or len(rows.problems) > n_problems:
            continue
        org: int | None
        if org_name:
            org = orgs.find(org_name)
        else:
            org = people.org.get(person) if person is not None else None
        match = (by_external.get(external) if external
                 else by_key.get((_key(title), person, org)))
        if match is not None and match.id in seen:
            rows.add(line, id_col if external else title_col,
                     f"same deal as line {seen[match.id]}")
            continue
        if org_name and org is None:
            org = orgs.find_or_plan(org_name)
            report.organizations_created += 1
        if match is None:
            state = _DealState(-(len(new) + 1), title, status or "open", person, org, owner,
                               value, currency.upper(), stage, external or None)
            new.append(state)
            if external:
                by_external[external] = state
            by_key.setdefault(state.key(), state)
            seen[state.id] = line
            report.created += 1
            continue
        before = match.values()
        match.title = title
        match.status = status or match.status
        match.person = person if person is not None else match.person
        match.org = org if org is not None else match.org
        match.owner = owner if owner is not None else match.owner
        match.value = value if value is not None else match.value
        match.currency = currency.upper() or match.currency
        match.stage = stage or match.stage
        seen[match.id] = line
        if match.values() != before:
            changed[match.id] = match
            report.updated += 1
        else:
            report.unchanged += 1
    if rows.problems:
        return report

    org_ids = orgs.write(store, company_id, now)

    def real_org(oid: int | None) -> int | None:
        return org_ids.get(oid, oid) if oid is not None else None

    ids = _reserve_ids(store, m.Deal, len(new))
    deal_fields = [m.Deal.id, m.Deal.company, m.Deal.external_id, m.Deal.title, m.Deal.status,
                   m.Deal.person, m.Deal.organization, m.Deal.owner, m.Deal.value,
                   m.Deal.currency, m.Deal.stage, m.Deal.created_at, m.Deal.updated_at]
    _insert(store, m.Deal, deal_fields,
            [(did, company_id, d.external_id, d.title, d.status, d.person, real_org(d.org),
              d.owner, d.value, d.currency, d.stage, now, now)
             for did, d in zip(ids, new, strict=True)])
    for d in changed.values():
        (m.Deal.update(title=d.title, status=d.status, person=d.person,
                       organization=real_org(d.org), owner=d.owner, value=d.value,
                       currency=d.currency, stage=d.stage, updated_at=now)
         .where(m.Deal.id == d.id).execute())
    return report

