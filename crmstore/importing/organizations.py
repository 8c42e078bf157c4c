"""Importing organizations (name, mail domains, website), and the company's organizations by
name for every kind that names one (persons and deals create those that do not exist)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from urllib.parse import urlsplit

from dealmail.addresses import AddressError, normalize_domain

from .. import models as m
from ..db import Store
from .bulk import insert_rows, raw_rows, reserve_ids
from .report import ImportReport
from .rows import LEN_ORG_NAME, Rows, clean, name_key, required, tick, too_long

_LIST_SPLIT_RE = re.compile(r"[,;\s]+")


class Orgs:
    """The company's organizations by name, plus those this import will create (negative
    placeholder ids until the write phase)."""

    def __init__(self, company_id: int) -> None:
        self.by_key: dict[str, int] = {}
        self.exact: dict[str, int] = {}
        self.names: dict[int, str] = {}
        for oid, name in raw_rows(m.Organization.select(m.Organization.id, m.Organization.name)
                                  .where(m.Organization.company == company_id)
                                  .order_by(m.Organization.id)):
            self.names[oid] = name
            self.exact[name] = oid
            self.by_key.setdefault(name_key(name), oid)
        self.new: list[str] = []

    def find(self, name: str) -> int | None:
        # Stored names are unique only as written: should two differ only in case, the one
        # written exactly like the cell wins, else the oldest.
        cleaned = clean(name)
        hit = self.exact.get(cleaned)
        return hit if hit is not None else self.by_key.get(cleaned.casefold())

    def find_or_plan(self, name: str) -> int:
        oid = self.find(name)
        if oid is None:
            self.new.append(clean(name))
            oid = -len(self.new)
            self.by_key[name_key(name)] = oid
            self.names[oid] = clean(name)
        return oid

    def write(self, store: Store, company_id: int, now: datetime) -> dict[int, int]:
        """Insert the planned organizations; returns placeholder id -> real id."""
        ids = reserve_ids(store, m.Organization, len(self.new))
        mapping = {-(i + 1): real for i, real in enumerate(ids)}
        insert_rows(store, m.Organization, [m.Organization.id, m.Organization.company,
                                            m.Organization.name, m.Organization.created_at],
                    [(real, company_id, name, now)
                     for real, name in zip(ids, self.new, strict=True)])
        return mapping


def _domains_of(rows: Rows, line: int, cells: list[str]) -> list[str] | None:
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


def import_organizations(store: Store, company_id: int, rows: Rows,
                         progress: Callable[[int, int], None] | None,
                         now: datetime) -> ImportReport:
    total = len(rows.table.rows)
    report = ImportReport("organizations", total, 0, 0, 0)
    if not required(rows, "name", "Name"):
        return report
    orgs = Orgs(company_id)
    domain_owner: dict[str, int] = dict(raw_rows(
        m.OrgDomain.select(m.OrgDomain.domain, m.OrgDomain.organization)
        .where(m.OrgDomain.company == company_id)))
    seen_org: dict[int, int] = {}  # org id -> line
    seen_domain: dict[str, int] = {}
    new_domains: list[tuple[int, str]] = []
    for done, (line, cells) in enumerate(rows.table.rows, start=1):
        tick(progress, done, total)
        if not rows.check_width(line, cells):
            continue
        name, name_col = rows.first(cells, "name")
        bad = False
        if not name:
            rows.add(line, name_col, "an organization needs a name")
            bad = True
        elif too_long(rows, line, name_col, clean(name), LEN_ORG_NAME):
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
    insert_rows(store, m.OrgDomain,
                [m.OrgDomain.organization, m.OrgDomain.company, m.OrgDomain.domain],
                [(mapping.get(oid, oid), company_id, d) for oid, d in new_domains])
    return report
