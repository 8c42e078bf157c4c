"""Read queries of the product: conversations of a person or deal, persons and deals listings.

Every query that returns emails filters them with :func:`crmstore.visibility.visible_to`; the
count of emails the reader may not see is returned alongside, never their content.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from peewee import JOIN, fn

from . import models as m
from .visibility import visible_to


class NotFound(LookupError):
    """An unknown user, person or deal named by an admin or a request."""


def find_user(address: str) -> m.User:
    """The active user with this primary address. A user removed from the config stays as an
    inactive row (sightings and deals point at it) but reads nothing any more."""
    user = m.User.get_or_none((m.User.address == address.strip().lower()) & m.User.active)
    if user is None:
        raise NotFound(f"unknown user {address!r}")
    return user


def find_person(company_id: int, address: str) -> m.Person:
    row = (m.PersonAddress.select(m.PersonAddress.person)
           .where((m.PersonAddress.company == company_id)
                  & (m.PersonAddress.address == address.strip().lower())).first())
    if row is None:
        raise NotFound(f"no person with address {address!r}")
    return m.Person.get_by_id(row.person_id)


def find_deal(company_id: int, deal_id: int) -> m.Deal:
    deal = m.Deal.get_or_none((m.Deal.id == deal_id) & (m.Deal.company == company_id))
    if deal is None:
        raise NotFound(f"no deal {deal_id}")
    return deal


def _email_ids_for(person: m.Person | None, deal: m.Deal | None) -> Any:
    """Sub-select of the ids of emails linked (directly or by their thread) to the target."""
    if deal is not None:
        direct = m.Link.select(m.Link.email).where((m.Link.deal == deal.id)
                                                   & m.Link.email.is_null(False))
        by_thread = (m.Email.select(m.Email.id)
                     .join(m.Thread, on=(m.Email.thread == m.Thread.id))
                     .where(m.Thread.deal == deal.id))
        return direct | by_thread
    assert person is not None
    return m.Link.select(m.Link.email).where((m.Link.person == person.id)
                                             & m.Link.email.is_null(False))


def conversations(user: m.User, person: m.Person | None = None, deal: m.Deal | None = None,
                  limit: int = 5000) -> dict[str, Any]:
    """Threads and emails about a person or a deal that ``user`` may see, newest first."""
    ids = _email_ids_for(person, deal)
    base = m.Email.select().where(m.Email.id.in_(ids))
    total = base.count()
    rows = list(
        m.Email.select(m.Email.id, m.Email.message_id, m.Email.date, m.Email.subject,
                       m.Email.from_address, m.Email.from_name, m.Email.to_json,
                       m.Email.cc_json, m.Email.snippet, m.Email.thread, m.Email.kind)
        .where(m.Email.id.in_(ids) & visible_to(user))
        .order_by(m.Email.date.desc(), m.Email.id.desc())
        .limit(limit)
    )
    email_ids = [r.id for r in rows]
    sightings: dict[int, list[m.Sighting]] = {}
    if email_ids:
        q = (m.Sighting.select(m.Sighting, m.User.id, m.User.address)
             .join(m.User, on=(m.Sighting.user == m.User.id))
             .where(m.Sighting.email.in_(email_ids)))
        for s in q:
            sightings.setdefault(s.email_id, []).append(s)
    thread_ids = sorted({r.thread_id for r in rows})
    threads = {t.id: t for t in m.Thread.select().where(m.Thread.id.in_(thread_ids))} \
        if thread_ids else {}
    deal_ids = {t.deal_id for t in threads.values() if t.deal_id}
    deals = {d.id: d for d in m.Deal.select().where(m.Deal.id.in_(list(deal_ids)))} \
        if deal_ids else {}
    pending = set()
    if thread_ids:
        pending = {p.thread_id for p in m.PendingChoice.select(m.PendingChoice.thread)
                   .where(m.PendingChoice.thread.in_(thread_ids)
                          & m.PendingChoice.state.in_(["pending", "asked"]))}
    out: OrderedDict[int, dict[str, Any]] = OrderedDict()
    for r in rows:
        t = threads[r.thread_id]
        entry = out.get(t.id)
        if entry is None:
            d = deals.get(t.deal_id) if t.deal_id else None
            entry = out[t.id] = {
                "id": t.id,
                "subject": r.subject,
                "deal": {"id": d.id, "title": d.title} if d else None,
                "needs_choice": t.id in pending and d is None,
                "emails": [],
            }
        mine = [s for s in sightings.get(r.id, []) if s.user_id == user.id]
        shown = mine[0] if mine else next(
            (s for s in sightings.get(r.id, []) if s.visibility == "shared"), None)
        entry["emails"].append({
            "id": r.id,
            "message_id": r.message_id,
            "date": r.date.isoformat() + "Z" if r.date else None,
            "subject": r.subject,
            "from": {"address": r.from_address, "name": r.from_name},
            "to": json.loads(r.to_json),
            "cc": json.loads(r.cc_json),
            "channel": shown.channel if shown else None,
            "owner": shown.user.address if shown else None,
            "visibility": shown.visibility if shown else None,
            "verification": shown.verification if shown else None,
            "snippet": r.snippet,
            "kind": r.kind,
            "decisions": json.loads(shown.decisions_json) if shown and mine else [],
        })
    return {"threads": list(out.values()), "hidden": total - len(rows)}


def list_persons(company_id: int) -> list[dict[str, Any]]:
    addrs: dict[int, list[str]] = {}
    for pa in m.PersonAddress.select().where(m.PersonAddress.company == company_id):
        addrs.setdefault(pa.person_id, []).append(pa.address)
    open_deals = dict(
        m.Deal.select(m.Deal.person, fn.COUNT(m.Deal.id))
        .where((m.Deal.company == company_id) & (m.Deal.status == "open"))
        .group_by(m.Deal.person).tuples())
    out = []
    q = (m.Person.select(m.Person, m.Organization.name.alias("org_name"))
         .join(m.Organization, JOIN.LEFT_OUTER, on=(m.Person.organization == m.Organization.id))
         .where(m.Person.company == company_id).order_by(m.Person.id))
    for p in q.objects():
        out.append({"id": p.id, "name": p.name, "addresses": sorted(addrs.get(p.id, [])),
                    "organization": p.org_name, "open_deals": open_deals.get(p.id, 0),
                    "auto_created": p.auto_created})
    return out


def list_deals(company_id: int) -> list[dict[str, Any]]:
    out = []
    P = m.Person.alias()
    Org = m.Organization.alias()
    U = m.User.alias()
    q = (m.Deal.select(m.Deal, P.name.alias("person_name"), Org.name.alias("org_name"),
                       U.address.alias("owner_address"))
         .join(P, JOIN.LEFT_OUTER, on=(m.Deal.person == P.id))
         .switch(m.Deal).join(Org, JOIN.LEFT_OUTER, on=(m.Deal.organization == Org.id))
         .switch(m.Deal).join(U, JOIN.LEFT_OUTER, on=(m.Deal.owner == U.id))
         .where(m.Deal.company == company_id).order_by(m.Deal.id))
    for d in q.objects():
        out.append({"id": d.id, "title": d.title, "status": d.status, "stage": d.stage,
                    "person": d.person_name, "organization": d.org_name,
                    "owner": d.owner_address,
                    # Two decimals whatever the backend: SQLite's NUMERIC affinity gives
                    # back 12000 for a stored 12000.00, PostgreSQL's numeric(14,2) 12000.00.
                    "value": f"{d.value:.2f}" if d.value is not None else None,
                    "currency": d.currency})
    return out


def stored_copy(sighting: m.Sighting) -> bytes:
    """A user's stored copy of an email as bytes: our Authentication-Results header for that
    copy (RFC 8601 §5, topmost), then the message exactly as received."""
    evidence = json.loads(sighting.evidence_json or "{}")
    header = evidence.get("authentication_results")
    raw = bytes(m.Email.get_by_id(sighting.email_id).raw)
    if not header:
        return raw
    return str(header).encode("utf-8", "surrogateescape") + b"\r\n" + raw
