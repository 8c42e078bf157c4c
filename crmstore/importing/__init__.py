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
and are written in bulk through the driver (``executemany`` on SQLite, ``COPY`` on
PostgreSQL), so 100,000 persons import in seconds.

Layout
======

:func:`import_csv` (here) reads the file, then hands its rows to the importer of the kind:

- ``encoding``: :func:`detect_encoding`;
- ``reading``: decoding, the delimiter, each row's physical line, the columns of each field;
- ``rows``: a row's cells by field and the problems found; the cell rules every kind shares;
- ``bulk``: preloads, id reservation, inserts through the driver;
- ``organizations``, ``persons``, ``deals``: check every row of that kind, then write;
- ``report``: :class:`ImportReport` and :class:`CsvImportError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from peewee import IntegrityError

from .. import models as m
from ..db import Store
from .deals import import_deals
from .encoding import detect_encoding
from .organizations import import_organizations
from .persons import import_persons
from .reading import columns_for, read_table
from .report import CsvImportError, ImportReport
from .rows import Rows

__all__ = [
    "KINDS",
    "CsvImportError",
    "ImportReport",
    "detect_encoding",
    "import_csv",
]

KINDS = ("organizations", "persons", "deals")


def import_csv(store: Store, company_slug: str, kind: str, path: Path,
               encoding: str | None = None,
               progress: Callable[[int, int], None] | None = None,
               *, now: Callable[[], datetime] = m.utcnow,
               freemail_domains: Iterable[str] = (),
               internal_domains: Iterable[str] = (),
               after_write: Callable[[int, ImportReport], None] | None = None,
               ) -> ImportReport:
    """Import one CSV file of ``kind`` into the company ``company_slug``.

    Runs in one transaction; raises :class:`CsvImportError` (nothing written) listing every
    bad row, :class:`crmstore.db.StoreError` for an unknown company, ``ValueError`` for an
    unknown kind. ``progress(done, total)`` is called every 1,000 rows checked and once when
    the rows are written. ``now`` gives the timestamps of new and changed rows.

    Pass the config's ``policy.freemail_domains`` and the company's ``internal_domains``
    (normalised, as the config holds them): an organization cannot own a freemail or an
    internal domain, and a person cannot have an address in an internal domain (those
    addresses are colleagues, never customers: docs/architecture.md).

    ``after_write(company_id, report)`` runs inside the same transaction once the rows are
    written (the CLI re-links earlier mail to the addresses the import added)."""
    if kind not in KINDS:
        raise ValueError(f"unknown import kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CsvImportError([f"{path}:1: (file): cannot read: {exc.strerror}"]) from exc
    table = read_table(path, data, encoding)
    cols = columns_for(kind, table.header)
    rows = Rows(table, cols, frozenset(freemail_domains), frozenset(internal_domains))
    importer = {"organizations": import_organizations, "persons": import_persons,
                "deals": import_deals}[kind]
    try:
        with store.transaction():
            company_id = store.company_id(company_slug)
            report = importer(store, company_id, rows, progress, now())
            if rows.problems:
                # Raising inside the transaction rolls it back: whole file or nothing.
                raise CsvImportError(rows.problems)
            if after_write is not None:
                after_write(company_id, report)
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
