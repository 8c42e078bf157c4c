"""Importing deals: identified by their external id or by (title, person, organization); the
person named by name or address, the owner a user of the company, status, value, currency and
stage checked."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from dealmail.addresses import AddressError, normalize_address

from .. import models as m
from ..db import Store
from .bulk import insert_rows, raw_rows, reserve_ids, tuple_rows
from .organizations import Orgs
from .report import ImportReport
from .rows import LEN_ORG_NAME, Rows, addresses_of, clean, name_key, required, tick, too_long

# Column widths of crmstore.models (see rows.LEN_ORG_NAME).
_LEN_TITLE = 300
_LEN_STAGE = 100
_LEN_EXTERNAL_ID = 64

_STATUSES = {"open": "open", "won": "won", "lost": "lost"}
_VALUE_RE = re.compile(r"^(?:\d+|\d{1,3}(?:,\d{3})+)(?:\.\d{1,2})?$")
_CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")


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
        return (name_key(self.title), self.person, self.org)

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
        self.by_address: dict[str, int] = dict(raw_rows(
            m.PersonAddress.select(m.PersonAddress.address, m.PersonAddress.person)
            .where(m.PersonAddress.company == company_id)))
        self.org: dict[int, int | None] = {}
        self.by_name: dict[str, list[int]] = {}
        for pid, name, org in raw_rows(
                m.Person.select(m.Person.id, m.Person.name, m.Person.organization)
                .where(m.Person.company == company_id)):
            self.org[pid] = org
            self.by_name.setdefault(name_key(name), []).append(pid)


def _resolve_person(rows: Rows, line: int, cells: list[str], people: _People,
                    orgs: Orgs, org_name: str) -> tuple[bool, int | None]:
    """(ok, person id) from the Person cell (a name or an address) or a person email column."""
    value, column = rows.first(cells, "person")
    emails = addresses_of(rows, line, cells, "person_email")
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
    candidates = people.by_name.get(name_key(value), [])
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


def import_deals(store: Store, company_id: int, rows: Rows,
                 progress: Callable[[int, int], None] | None,
                 now: datetime) -> ImportReport:
    total = len(rows.table.rows)
    report = ImportReport("deals", total, 0, 0, 0)
    if not required(rows, "title", "Title"):
        return report
    orgs = Orgs(company_id)
    people = _People(company_id)
    user_by_address: dict[str, int] = {}
    user_by_name: dict[str, list[int]] = {}
    for uid, address, uname in tuple_rows(
            m.User.select(m.User.id, m.User.address, m.User.name)
            .where(m.User.company == company_id)):
        user_by_address[address] = uid
        if uname:
            user_by_name.setdefault(name_key(uname), []).append(uid)
    slug = m.Company.get_by_id(company_id).slug
    by_external: dict[str, _DealState] = {}
    by_key: dict[tuple[str, int | None, int | None], _DealState] = {}
    for row in tuple_rows(
            m.Deal.select(m.Deal.id, m.Deal.title, m.Deal.status, m.Deal.person,
                          m.Deal.organization, m.Deal.owner, m.Deal.value, m.Deal.currency,
                          m.Deal.stage, m.Deal.external_id)
            .where(m.Deal.company == company_id).order_by(m.Deal.id)):
        state = _DealState(*row)
        if state.external_id:
            by_external.setdefault(state.external_id, state)
        by_key.setdefault(state.key(), state)
    seen: dict[int, int] = {}
    new: list[_DealState] = []
    changed: dict[int, _DealState] = {}

    for done, (line, cells) in enumerate(rows.table.rows, start=1):
        tick(progress, done, total)
        if not rows.check_width(line, cells):
            continue
        n_problems = len(rows.problems)
        title, title_col = rows.first(cells, "title")
        title = clean(title)
        if not title:
            rows.add(line, title_col, "a deal needs a title")
        else:
            too_long(rows, line, title_col, title, _LEN_TITLE)
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
        stage = clean(stage)
        too_long(rows, line, stage_col, stage, _LEN_STAGE)
        external, id_col = rows.first(cells, "id")
        too_long(rows, line, id_col, external, _LEN_EXTERNAL_ID)
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
                hits = user_by_name.get(name_key(owner_raw), [])
                owner = hits[0] if len(hits) == 1 else None
            if owner is None:
                rows.add(line, owner_col, f"unknown owner {owner_raw!r}: not a user of "
                         f"company {slug!r}")
        org_name, org_col = rows.first(cells, "organization")
        if org_name:
            too_long(rows, line, org_col, clean(org_name), LEN_ORG_NAME)
        ok, person = _resolve_person(rows, line, cells, people, orgs, org_name)
        if not ok or len(rows.problems) > n_problems:
            continue
        org: int | None
        if org_name:
            org = orgs.find(org_name)
        else:
            org = people.org.get(person) if person is not None else None
        match = (by_external.get(external) if external
                 else by_key.get((name_key(title), person, org)))
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

    ids = reserve_ids(store, m.Deal, len(new))
    deal_fields = [m.Deal.id, m.Deal.company, m.Deal.external_id, m.Deal.title, m.Deal.status,
                   m.Deal.person, m.Deal.organization, m.Deal.owner, m.Deal.value,
                   m.Deal.currency, m.Deal.stage, m.Deal.created_at, m.Deal.updated_at]
    insert_rows(store, m.Deal, deal_fields,
                [(did, company_id, d.external_id, d.title, d.status, d.person, real_org(d.org),
                  d.owner, d.value, d.currency, d.stage, now, now)
                 for did, d in zip(ids, new, strict=True)])
    for d in changed.values():
        (m.Deal.update(title=d.title, status=d.status, person=d.person,
                       organization=real_org(d.org), owner=d.owner, value=d.value,
                       currency=d.currency, stage=d.stage, updated_at=now)
         .where(m.Deal.id == d.id).execute())
    return report
