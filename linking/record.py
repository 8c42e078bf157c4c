"""Storing one received message on the right persons, organization, deal and thread.

:func:`record_email` is called by the handlers inside the SMTP transaction's database
transaction; it only writes rows (email, sighting, participants, links, thread, pending choice)
and returns what it decided. It never sends anything: a question about the deal is a
``PendingChoice`` row that the deal-choice machinery turns into an outbox item.

Persons (seed rule 1): any customer address of the message is matched to a person by any of
the person's addresses. Company users and internal domains are never customers.
Deals (seed rule 2): an explicit ``+deal<ID>`` address, else the thread's deal, else the one
open deal of the matched persons, else a pending choice when several are open. Won and lost
deals are never chosen automatically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from crmstore import models as m
from dealmail.clock import naive_utc
from dealmail.config import Company, Config, User

from .addresses import Mailbox, domain_of
from .parse import normalize_subject
from .threads import find_thread, thread_index_key


@dataclass
class Original:
    """The conversation's message: the received message itself, or a forwarded original."""

    from_: Mailbox
    to: list[Mailbox]
    cc: list[Mailbox]
    subject: str
    date: datetime
    message_id: str | None
    in_reply_to: str | None
    references: list[str]
    thread_index: str | None
    snippet: str
    attachments: list[dict[str, Any]]
    content_hash: str
    forward: dict[str, Any] | None = None  # the parsed forward (chain, note) when forwarded
    original_raw: bytes | None = None  # an attached original's own bytes (to verify its DKIM)


@dataclass
class Delivery:
    """How and by whom this copy arrived."""

    user: User
    company: Company
    channel: str  # bcc | forward | relay | imap
    queue_id: str
    received_at: datetime
    envelope_from: str = ""
    client_ip: str = ""
    verification: str = "none"
    evidence: dict[str, Any] = field(default_factory=dict)
    deal_id: int | None = None  # from a +deal<ID> recipient
    quarantined: bool = False


@dataclass
class RecordResult:
    email_id: int
    sighting_id: int | None
    duplicate: bool  # the same user already had this email: nothing written
    new_email: bool
    thread_id: int
    persons: list[int]
    deal_id: int | None
    needs_choice: bool
    pending_choice_id: int | None
    decisions: list[str]


class Directory:
    """Ids of the config's companies and users in the database (rebuilt on config reload)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.company_ids = {c.slug: c.id for c in m.Company.select(m.Company.id, m.Company.slug)}
        self.user_ids = {u.address: u.id for u in m.User.select(m.User.id, m.User.address)}
        self.internal: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for c in config.companies:
            addrs = frozenset(a for u in c.users for a in u.addresses)
            self.internal[c.slug] = (frozenset(c.internal_domains), addrs)

    def is_internal(self, company: Company, address: str) -> bool:
        domains, addrs = self.internal[company.slug]
        return address in addrs or domain_of(address) in domains or (
            domain_of(address) == self.config.mail_domain
        )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _match_person(
    directory: Directory, company_id: int, box: Mailbox, create: bool, freemail: frozenset[str],
    now: datetime, decisions: list[str], created: list[int],
) -> int | None:
    row = (m.PersonAddress.select(m.PersonAddress.person)
           .where((m.PersonAddress.company == company_id)
                  & (m.PersonAddress.address == box.address)).first())
    if row is not None:
        decisions.append(f"{box.address} matched person #{row.person_id}")
        return int(row.person_id)
    domain = domain_of(box.address)
    if not create:
        decisions.append(f"{box.address}: unknown correspondent (persons are not created)")
        return None
    if domain in freemail:
        decisions.append(f"{box.address}: unknown correspondent at a free-mail domain, "
                         "no person created")
        return None
    org = _org_for_domain(company_id, domain, freemail)
    person = m.Person.create(company=company_id, name=box.name or box.address.split("@")[0],
                             organization=org, auto_created=True, created_at=now)
    m.PersonAddress.create(person=person, company=company_id, address=box.address)
    created.append(person.id)
    decisions.append(f"{box.address}: created person #{person.id}"
                     + (f" in organization #{org}" if org else ""))
    return int(person.id)


def _org_for_domain(company_id: int, domain: str, freemail: frozenset[str]) -> int | None:
    if domain in freemail:
        return None
    row = (m.OrgDomain.select(m.OrgDomain.organization)
           .where((m.OrgDomain.company == company_id) & (m.OrgDomain.domain == domain)).first())
    return int(row.organization_id) if row else None


def record_email(
    config: Config, directory: Directory, original: Original, raw: bytes, delivery: Delivery,
) -> RecordResult:
    """Write the rows for one received copy. Must run inside a transaction."""
    company = delivery.company
    company_id = directory.company_ids[company.slug]
    user_id = directory.user_ids[delivery.user.address]
    now = naive_utc(delivery.received_at)
    decisions: list[str] = []
    dedupe_key = (original.message_id or f"hash:{original.content_hash}")[:400]

    existing = m.Email.get_or_none((m.Email.company == company_id)
                                   & (m.Email.dedupe_key == dedupe_key))
    if existing is not None:
        seen = m.Sighting.get_or_none((m.Sighting.email == existing.id)
                                      & (m.Sighting.user == user_id))
        if seen is not None:
            return RecordResult(existing.id, None, True, False, existing.thread_id, [], None,
                                False, None, ["repeat of an email this user already has"])
        decisions.append(f"same message already stored as email #{existing.id}: "
                         "new sighting only")

    # Participants and persons.
    boxes = ([(original.from_, "from")] + [(b, "to") for b in original.to]
             + [(b, "cc") for b in original.cc])
    freemail = frozenset(config.freemail_domains)
    person_of: dict[str, int | None] = {}
    created: list[int] = []
    for box, _role in boxes:
        if box.address in person_of:
            continue
        if directory.is_internal(company, box.address):
            person_of[box.address] = None
            continue
        person_of[box.address] = _match_person(
            directory, company_id, box, config.create_unknown_persons, freemail, now,
            decisions, created)
    persons = sorted({p for p in person_of.values() if p is not None})
    external = {a for a in person_of if not directory.is_internal(company, a)}
    if not external:
        decisions.append("internal only: no customer among the participants")

    when = naive_utc(original.date)
    if existing is None:
        thread, why = find_thread(
            company_id, [x for x in [original.in_reply_to, *original.references] if x],
            thread_index_key(original.thread_index), original.subject, external, when,
            config.thread_window_days)
        if thread is None:
            thread = m.Thread.create(company=company_id,
                                     subject_key=normalize_subject(original.subject),
                                     created_at=now, last_at=when)
        else:
            decisions.append(f"joins thread #{thread.id} ({why})")
            if when > thread.last_at:
                thread.last_at = when
                thread.save(only=[m.Thread.last_at])
        email = m.Email.create(
            company=company_id, dedupe_key=dedupe_key, message_id=original.message_id,
            content_hash=original.content_hash, thread=thread, subject=original.subject,
            date=when, from_address=original.from_.address, from_name=original.from_.name,
            to_json=_json([b.as_dict() for b in original.to]),
            cc_json=_json([b.as_dict() for b in original.cc]),
            in_reply_to=original.in_reply_to, references=" ".join(original.references),
            thread_index=thread_index_key(original.thread_index), snippet=original.snippet,
            attachments_json=_json(original.attachments), size=len(raw), raw=raw,
            kind=delivery.channel if delivery.channel == "forward" else "bcc",
            forward_json=_json(original.forward) if original.forward else None,
            created_at=now,
        )
        m.Participant.insert_many([
            {"email": email.id, "address": box.address, "name": box.name[:300], "role": role,
             "person": person_of.get(box.address)}
            for box, role in boxes
        ]).execute()
    else:
        email = existing
        thread = m.Thread.get_by_id(existing.thread_id)

    # Links to persons and organizations (idempotent: a second sighting adds nothing twice).
    have = {(lk.person_id, lk.deal_id, lk.organization_id)
            for lk in m.Link.select().where(m.Link.email == email.id)}
    new_links: list[dict[str, Any]] = []
    orgs: set[int] = set()
    for pid in persons:
        if (pid, None, None) not in have:
            new_links.append({"email": email.id, "person": pid, "source": "auto",
                              "created_at": now})
        person = m.Person.get_by_id(pid)
        if person.organization_id:
            orgs.add(person.organization_id)
    for addr in external:
        org = _org_for_domain(company_id, domain_of(addr), freemail)
        if org:
            orgs.add(org)
    for oid in sorted(orgs):
        if (None, None, oid) not in have:
            new_links.append({"email": email.id, "organization": oid, "source": "auto",
                              "created_at": now})

    # The deal.
    deal_id: int | None = None
    deal_source = "auto"
    needs_choice = False
    pending_id: int | None = None
    existing_deals = [d for (_p, d, _o) in have if d]
    if delivery.deal_id is not None:
        deal_id, deal_source = delivery.deal_id, "address"
        decisions.append(f"deal #{deal_id} named by the +deal address")
        if thread.deal_id is None:
            thread.deal = deal_id
            thread.save(only=[m.Thread.deal])
    elif existing_deals:
        deal_id = existing_deals[0]
    elif thread.deal_id is not None:
        deal_id, deal_source = thread.deal_id, "thread"
        decisions.append(f"deal #{deal_id} followed from the thread")
    elif not delivery.user.auto_link_deals:
        decisions.append("automatic deal linking is off for this user")
    elif persons:
        open_deals = list(
            m.Deal.select(m.Deal.id, m.Deal.title)
            .where(m.Deal.person.in_(persons) & (m.Deal.status == "open")
                   & (m.Deal.company == company_id))
            .order_by(m.Deal.id))
        if len(open_deals) == 1:
            deal_id = open_deals[0].id
            decisions.append(f"deal #{deal_id} {open_deals[0].title!r}: the person's only "
                             "open deal")
            thread.deal = deal_id
            thread.save(only=[m.Thread.deal])
        elif len(open_deals) > 1:
            needs_choice = True
            cands = [d.id for d in open_deals]
            decisions.append("needs choice among " + ", ".join(
                f"#{d.id} {d.title!r}" for d in open_deals))
            already = (m.PendingChoice.select(m.PendingChoice.id)
                       .where((m.PendingChoice.thread == thread.id)
                              & (m.PendingChoice.user == user_id)
                              & m.PendingChoice.state.in_(["pending", "asked"])).first())
            if already is None:
                pending_id = m.PendingChoice.create(
                    user=user_id, email=email.id, thread=thread.id, person=persons[0],
                    candidates_json=_json(cands), state="pending", created_at=now,
                ).id
            else:
                pending_id = already.id
        else:
            decisions.append("no open deal for the matched persons")
    if deal_id is not None and deal_id not in existing_deals:
        new_links.append({"email": email.id, "deal": deal_id, "source": deal_source,
                          "created_at": now})
    if new_links:
        m.Link.insert_many(new_links).execute()

    visibility = "quarantined" if delivery.quarantined else delivery.user.default_visibility
    sighting = m.Sighting.create(
        email=email.id, user=user_id, channel=delivery.channel, visibility=visibility,
        queue_id=delivery.queue_id, received_at=now, envelope_from=delivery.envelope_from,
        client_ip=delivery.client_ip, verification=delivery.verification,
        evidence_json=_json(delivery.evidence), decisions_json=_json(decisions),
    )
    return RecordResult(
        email_id=email.id, sighting_id=sighting.id, duplicate=False,
        new_email=existing is None, thread_id=thread.id, persons=persons, deal_id=deal_id,
        needs_choice=needs_choice, pending_choice_id=pending_id, decisions=decisions,
    )
