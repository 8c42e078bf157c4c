"""Importing persons: matched by any of their addresses (or by name when a row has none), new
addresses added to the person they belong to, organizations created when named."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from .. import models as m
from ..db import Store
from .bulk import insert_rows, raw_rows, reserve_ids
from .organizations import Orgs
from .report import ImportReport
from .rows import LEN_ORG_NAME, Rows, addresses_of, clean, name_key, tick, too_long

_LEN_PERSON_NAME = 300  # column width of crmstore.models (see rows.LEN_ORG_NAME)


@dataclass
class _NewPerson:
    name: str
    org: int | None
    addresses: list[str] = field(default_factory=list)


def _user_addresses() -> set[str]:
    return {a for (a,) in raw_rows(m.User.select(m.User.address))}


def import_persons(store: Store, company_id: int, rows: Rows,
                   progress: Callable[[int, int], None] | None,
                   now: datetime) -> ImportReport:
    total = len(rows.table.rows)
    report = ImportReport("persons", total, 0, 0, 0)
    if "name" not in rows.cols and "email" not in rows.cols:
        rows.add(1, "(header)", "no Name or Email column "
                 f"(columns: {', '.join(rows.table.header)})")
        return report
    orgs = Orgs(company_id)
    owner_of: dict[str, int] = dict(raw_rows(
        m.PersonAddress.select(m.PersonAddress.address, m.PersonAddress.person)
        .where(m.PersonAddress.company == company_id)))
    persons: dict[int, tuple[str, int | None]] = {
        pid: (name, org) for pid, name, org in raw_rows(
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
        tick(progress, done, total)
        if not rows.check_width(line, cells):
            continue
        raw_name, name_col = rows.first(cells, "name")
        name = clean(raw_name)
        email_col = rows.column_name("email")
        addrs = addresses_of(rows, line, cells, "email")
        org_name, org_col = rows.first(cells, "organization")
        bad = addrs is None
        if too_long(rows, line, name_col, name, _LEN_PERSON_NAME):
            bad = True
        if org_name and too_long(rows, line, org_col, clean(org_name), LEN_ORG_NAME):
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
                    by_name.setdefault(name_key(pname), []).append(pid)
            candidates = by_name.get(name_key(name), [])
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
                by_name.setdefault(name_key(name), []).append(pid)
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

    ids = reserve_ids(store, m.Person, len(new))
    insert_rows(store, m.Person, [m.Person.id, m.Person.company, m.Person.name,
                                  m.Person.organization, m.Person.auto_created,
                                  m.Person.created_at],
                [(pid, company_id, p.name, real_org(p.org), False, now)
                 for pid, p in zip(ids, new, strict=True)])
    for pid, (pname, porg) in changed.items():
        (m.Person.update(name=pname, organization=real_org(porg))
         .where(m.Person.id == pid).execute())
    address_rows = [(pid, company_id, a)
                    for pid, p in zip(ids, new, strict=True) for a in p.addresses]
    address_rows.extend((pid, company_id, a) for pid, a in added)
    insert_rows(store, m.PersonAddress, [m.PersonAddress.person, m.PersonAddress.company,
                                         m.PersonAddress.address], address_rows)
    report.new_addresses = [a for _pid, _cid, a in address_rows]
    return report
