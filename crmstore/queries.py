"""Read queries of the product: conversations of a person or deal, persons and deals listings.

Every query that returns emails filters them with :func:`crmstore.visibility.visible_to`.
Nothing says how many emails the reader may not see: that a colleague has a private email on
a person or deal is the colleague's business alone.
"""

from __future__ import annotations

import json
from operator import itemgetter
from typing import Any

from peewee import JOIN, fn

from dealmail.clock import json_time

from . import models as m
from .handles import handle
from .hotpath import column_sql, table_sql
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

    One statement reads the visible emails (the rule of :func:`visible_to`, applied once) with
    their thread's deal, whether a deal choice is pending and the user's own sighting; a
    second one, only for emails the user has no sighting of, the first shared sighting they
    are shown with and its owner. Rows are read as the driver's tuples: building 5,000 peewee
    objects, or converting their fields, cost more than the query (bench scale)."""
    ids = _email_ids_for(person, deal)
    E = m.Email
    # Chosen and limited on narrow rows (id, date): sorting 5,000 full rows through SQLite's
    # sorter cost as much as the rest of the query.
    visible = (E.select(E.id, E.date)
               .where(E.id.in_(ids) & visible_to(user))
               .order_by(E.date.desc(), E.id.desc())
               .limit(limit))
    db = m.Email._meta.database
    shown_sql, shown_params = visible.sql()
    p = db.param
    # The emails are chosen, ordered and limited first (the CTE); the rest joins one row per
    # email: its columns, its thread, the thread's deal and the user's own sighting (one per
    # email and user).
    T, D, S, PC, U = m.Thread, m.Deal, m.Sighting, m.PendingChoice, m.User

    t = table_sql

    def c(alias: str, model: type[m.BaseModel], field: str) -> str:
        return f"{alias}.{column_sql(model, field)}"

    sql = (
        f"WITH shown AS ({shown_sql}) "
        f"SELECT {', '.join(c('e', E, f) for f in _LISTED)}, "
        f"{c('t', T, 'deal')}, {c('d', D, 'title')}, "
        f"EXISTS(SELECT 1 FROM {t(PC)} pc WHERE {c('pc', PC, 'thread')} = {c('t', T, 'id')} "
        f"AND {c('pc', PC, 'state')} IN ('pending', 'asked')), "
        f"{c('mine', S, 'id')}, {c('mine', S, 'channel')}, {c('mine', S, 'visibility')}, "
        f"{c('mine', S, 'verification')}, {c('mine', S, 'decisions_json')} "
        f"FROM shown JOIN {t(E)} e ON {c('e', E, 'id')} = {c('shown', E, 'id')} "
        f"JOIN {t(T)} t ON {c('t', T, 'id')} = {c('e', E, 'thread')} "
        f"LEFT JOIN {t(D)} d ON {c('d', D, 'id')} = {c('t', T, 'deal')} "
        f"LEFT JOIN {t(S)} mine ON {c('mine', S, 'email')} = {c('shown', E, 'id')} "
        f"AND {c('mine', S, 'user')} = {p}")
    rows = db.execute_sql(sql, [*shown_params, user.id]).fetchall()
    # Newest first, as the CTE chose them: sorted here rather than by SQLite's sorter on
    # wide rows (the same comparison: stored dates are ISO text on SQLite, datetimes on
    # PostgreSQL).
    rows.sort(key=itemgetter(2, 0), reverse=True)
    # A colleague's email is shown with its first shared sighting (and its owner). Looked up
    # by the ids of those emails only: as a join, PostgreSQL planned it over every sighting.
    others: dict[int, tuple[Any, ...]] = {}
    theirs = [r[0] for r in rows if r[_MINE_ID] is None]
    for start in range(0, len(theirs), 1000):
        chunk = theirs[start:start + 1000]
        marks = ", ".join([p] * len(chunk))
        for row in db.execute_sql(
                f"SELECT {c('s', S, 'email')}, {c('u', U, 'address')}, {c('s', S, 'channel')}, "
                f"{c('s', S, 'visibility')}, {c('s', S, 'verification')} FROM {t(S)} s "
                f"JOIN {t(U)} u ON {c('u', U, 'id')} = {c('s', S, 'user')} "
                f"WHERE {c('s', S, 'email')} IN ({marks}) "
                f"AND {c('s', S, 'visibility')} = 'shared' ORDER BY {c('s', S, 'id')}",
                chunk).fetchall():
            others.setdefault(row[0], row[1:])
    out: dict[int, dict[str, Any]] = {}
    # Emails of one conversation mostly share their To/Cc (and often their decisions):
    # decode each distinct text once, hand out copies.
    lists: dict[str, list[Any]] = {}

    def decoded(text: str) -> list[Any]:
        found = lists.get(text)
        if found is None:
            found = lists[text] = json.loads(text)
        return found

    reader = user.address
    for (eid, message_id, date, subject, from_address, from_name, to_json, cc_json,
         snippet, thread_id, kind, number, deal_id, deal_title, pending, mine_id, channel,
         visibility, verification, decisions) in rows:
        entry = out.get(thread_id)
        if entry is None:
            entry = out[thread_id] = {
                "id": thread_id,
                "subject": subject,
                "deal": {"id": deal_id, "title": deal_title} if deal_id else None,
                "needs_choice": bool(pending) and not deal_id,
                "emails": [],
            }
        if mine_id is not None:
            owner = reader
        else:  # shown through a colleague's shared sighting: never its decisions
            owner, channel, visibility, verification = others.get(eid, _NOT_SHOWN)
        entry["emails"].append({
            "id": eid,
            "handle": handle(number),
            "message_id": message_id,
            "date": _json_time(date),
            "subject": subject,
            "from": {"address": from_address, "name": from_name},
            "to": [dict(x) for x in decoded(to_json)],
            "cc": [dict(x) for x in decoded(cc_json)],
            "channel": channel,
            "owner": owner,
            "visibility": visibility,
            "verification": verification,
            "snippet": snippet,
            "kind": kind,
            "decisions": list(decoded(decisions)) if decisions is not None else [],
        })
    return {"threads": list(out.values())}


# (owner, channel, visibility, verification) of an email without a sighting to show.
_NOT_SHOWN: tuple[Any, ...] = (None, None, None, None)
# The email columns a conversation lists, in the order the row tuples are unpacked.
_LISTED = ("id", "message_id", "date", "subject", "from_address", "from_name", "to_json",
           "cc_json", "snippet", "thread", "kind", "number")
# The row's column holding the user's own sighting id (after the thread's deal, its title
# and the pending flag).
_MINE_ID = len(_LISTED) + 3


def _json_time(value: Any) -> str | None:
    """:func:`json_time` of a stored timestamp; SQLite's text form ("YYYY-MM-DD HH:MM:SS"
    and optional fraction, naive UTC) is cut into shape without parsing it (5,000 per call)."""
    if isinstance(value, str) and len(value) >= 19 and value[10] == " ":
        return f"{value[:10]}T{value[11:19]}Z"
    return json_time(value)


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
