"""Read queries of the product: conversations of a person or deal, persons and deals listings.

Every query that returns emails filters them with :func:`crmstore.visibility.visible_to`.
Nothing says how many emails the reader may not see: that a colleague has a private email on
a person or deal is the colleague's business alone.
"""

from __future__ import annotations

import json
from typing import Any

from peewee import JOIN, fn

from dealmail.clock import json_time

from . import models as m
from .handles import handle
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
    """Threads and emails about a person or a deal that ``user`` may see, newest first.

    Rows are read as tuples, not model instances: building 5,000 peewee objects cost ~80%
    of the time of a large deal's history (bench scale)."""
    ids = _email_ids_for(person, deal)
    E = m.Email
    visible = (E.select(E.id, E.message_id, E.date, E.subject, E.from_address, E.from_name,
                        E.to_json, E.cc_json, E.snippet, E.thread, E.kind, E.number)
               .where(E.id.in_(ids) & visible_to(user))
               .order_by(E.date.desc(), E.id.desc())
               .limit(limit))
    db = m.Email._meta.database
    # The driver's rows as they are: peewee's per-field conversion of 5,000 rows cost more
    # than the query itself.
    rows = list(db.execute(visible).fetchall())
    email_ids = [r[0] for r in rows]
    # (user id, address, channel, visibility, verification, decisions) per email.
    sightings: dict[int, list[tuple[Any, ...]]] = {}
    if email_ids:
        S = m.Sighting
        shown_ids = E.select(E.id).where(E.id.in_(ids) & visible_to(user))
        q = (S.select(S.email, S.user, m.User.address, S.channel, S.visibility,
                      S.verification, S.decisions_json)
             .join(m.User, on=(S.user == m.User.id))
             .where(S.email.in_(shown_ids)))
        for row in db.execute(q).fetchall():
            sightings.setdefault(row[0], []).append(row[1:])
    thread_ids = sorted({r[9] for r in rows})
    threads: dict[int, int | None] = {}
    deals: dict[int, str] = {}
    pending: set[int] = set()
    if thread_ids:
        T = m.Thread
        in_threads = T.select(T.id).where(T.id.in_(thread_ids))
        threads = dict(T.select(T.id, T.deal).where(T.id.in_(in_threads)).tuples())
        deal_ids = sorted({d for d in threads.values() if d})
        if deal_ids:
            deals = dict(m.Deal.select(m.Deal.id, m.Deal.title)
                         .where(m.Deal.id.in_(deal_ids)).tuples())
        pending = {t for (t,) in m.PendingChoice.select(m.PendingChoice.thread)
                   .where(m.PendingChoice.thread.in_(in_threads)
                          & m.PendingChoice.state.in_(["pending", "asked"])).tuples()}
    out: dict[int, dict[str, Any]] = {}
    # Emails of one conversation mostly share their To/Cc: decode each distinct list once.
    lists: dict[str, list[Any]] = {}

    def addresses(text: str) -> list[Any]:
        found = lists.get(text)
        if found is None:
            found = lists[text] = json.loads(text)
        return [dict(x) for x in found]

    for (eid, message_id, date, subject, from_address, from_name, to_json, cc_json,
         snippet, thread_id, kind, number) in rows:
        entry = out.get(thread_id)
        if entry is None:
            deal_id = threads.get(thread_id)
            entry = out[thread_id] = {
                "id": thread_id,
                "subject": subject,
                "deal": {"id": deal_id, "title": deals[deal_id]} if deal_id else None,
                "needs_choice": thread_id in pending and not deal_id,
                "emails": [],
            }
        seen = sightings.get(eid, [])
        mine = next((s for s in seen if s[0] == user.id), None)
        shown = mine or next((s for s in seen if s[3] == "shared"), None)
        entry["emails"].append({
            "id": eid,
            "handle": handle(number),
            "message_id": message_id,
            "date": json_time(date),
            "subject": subject,
            "from": {"address": from_address, "name": from_name},
            "to": addresses(to_json),
            "cc": addresses(cc_json),
            "channel": shown[2] if shown else None,
            "owner": shown[1] if shown else None,
            "visibility": shown[3] if shown else None,
            "verification": shown[4] if shown else None,
            "snippet": snippet,
            "kind": kind,
            "decisions": json.loads(mine[5]) if mine else [],
        })
    return {"threads": list(out.values())}


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
