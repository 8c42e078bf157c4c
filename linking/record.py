"""Storing one received message on the right persons, organization, deal and thread.

:func:`record_email` is called by the handlers inside the SMTP transaction's database
transaction; it only writes rows (email, sighting, participants, links, thread, pending choice)
and returns what it decided. It never sends anything: a question about the deal is a
``PendingChoice`` row that the deal-choice machinery turns into an outbox item.

Persons (docs/architecture.md, rule 1): any customer address of the message is matched to a
person by any of the person's addresses. Company users and internal domains are never
customers. Deals (docs/architecture.md, rule 2): an explicit ``+deal<ID>`` address, else the
thread's deal, else the one open deal of the matched persons, else a pending choice when
several are open. Won and lost
deals are never chosen automatically.

A user's standing choices (crmstore/inbox.py) are followed: a thread they made private or
shared gives their later copies in it that visibility, a thread a user unlinked from its deal
gets none automatically, and the correspondents they ignore (``Arrival.ignored``) are neither
linked nor created as persons. Each new email takes its company's next number (its handle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from crmstore import models as m
from crmstore.hotpath import HotPath
from dealmail.addresses import Mailbox, domain_of
from dealmail.clock import naive_utc
from dealmail.config import Company, Config, User

from .parse import normalize_subject
from .relink import RelinkReport, relink_addresses
from .threads import thread_index_key


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
class Arrival:
    """How and by whom this copy arrived (its source, user, channel and evidence)."""

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
    #: Correspondents this user does not track (linking/capture.py): neither linked nor
    #: created as persons, like the company's own addresses.
    ignored: frozenset[str] = frozenset()


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
    #: A ``+deal<ID>`` the user named that belongs to another customer than the email's:
    #: obeyed, and the user is told (deal id, title, the deal's customer, the email's).
    deal_mismatch: DealMismatch | None = None
    #: Earlier emails linked because this one created a person they carry: the questions
    #: (user address, pending choice id) the caller should queue.
    relink_questions: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class DealMismatch:
    deal_id: int
    title: str
    belongs_to: str
    correspondents: tuple[str, ...]


def _deal_mismatch(deal_id: int, persons: list[int], orgs: set[int]) -> DealMismatch | None:
    """Whether the deal a user named is about none of the email's customers: its person is
    not among them and its organization is not theirs. A deal without a customer, or an
    email without one, cannot be a mismatch."""
    deal = m.Deal.get_or_none(m.Deal.id == deal_id)
    if deal is None or not persons or (deal.person_id is None and deal.organization_id is None):
        return None
    if deal.person_id in persons or (deal.organization_id is not None
                                     and deal.organization_id in orgs):
        return None
    if deal.person_id is not None:
        owner = m.Person.get_by_id(deal.person_id).name
    else:
        owner = m.Organization.get_by_id(deal.organization_id).name
    names = tuple(p.name for p in m.Person.select(m.Person.name)
                  .where(m.Person.id.in_(persons)).order_by(m.Person.id))
    return DealMismatch(deal_id, deal.title, owner, names)


class Directory:
    """Ids of the config's companies and users in the database (rebuilt on config reload)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.company_ids = {c.slug: c.id for c in m.Company.select(m.Company.id, m.Company.slug)}
        self.user_ids = {u.address: u.id for u in m.User.select(m.User.id, m.User.address)}
        self.hot = HotPath(m.Email._meta.database)
        self.freemail = frozenset(config.policy.freemail_domains)
        self.internal: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for c in config.companies:
            addrs = frozenset(a for u in c.users for a in u.addresses)
            self.internal[c.slug] = (frozenset(c.internal_domains), addrs)

    def is_internal(self, company: Company, address: str) -> bool:
        domains, addrs = self.internal[company.slug]
        return address in addrs or domain_of(address) in domains or (
            domain_of(address) == self.config.mail_domain
        )


# One encoder for every row: json.dumps with options builds a new JSONEncoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


def _json(value: Any) -> str:
    return _ENCODER.encode(value)


class _Lookup:
    """Per-message memo of person and organization lookups: the participants' persons and
    their domains' organizations are read in one statement (:meth:`prefetch`), anything
    else one query per address or domain."""

    def __init__(self, hot: HotPath, company_id: int, freemail: frozenset[str]) -> None:
        self.hot = hot
        self.company_id = company_id
        self.freemail = freemail
        self.orgs: dict[str, int | None] = {}
        self.person_org: dict[int, int | None] = {}
        self.persons: dict[str, tuple[int, int | None] | None] = {}

    def prefetch(self, addresses: list[str]) -> None:
        """Look up these addresses' persons and their (non free-mail) domains'
        organizations at once."""
        domains = sorted({d for d in map(domain_of, addresses)
                          if d not in self.freemail and d not in self.orgs})
        found, orgs = self.hot.persons_and_orgs(self.company_id, addresses, domains)
        for address in addresses:
            self.persons[address] = found.get(address)
        for domain in domains:
            self.orgs[domain] = orgs.get(domain)

    def org_of_domain(self, domain: str) -> int | None:
        if domain in self.freemail:
            return None
        if domain not in self.orgs:
            self.orgs[domain] = self.hot.org_of_domain(self.company_id, domain)
        return self.orgs[domain]

    def person(self, box: Mailbox, create: bool, now: datetime, decisions: list[str],
               created: list[int]) -> int | None:
        domain = domain_of(box.address)
        if box.address in self.persons:
            found = self.persons[box.address]
        else:
            found = self.hot.person_of_address(self.company_id, box.address)
        if found is not None:
            pid, org = found
            self.person_org[pid] = org
            decisions.append(f"{box.address} matched person #{pid}")
            return pid
        if not create:
            decisions.append(f"{box.address}: unknown correspondent (persons are not created)")
            return None
        # A free-mail address is a person like any other (small businesses and most of
        # Japan write from one); only organizations are never derived from its domain.
        org = self.org_of_domain(domain)
        pid = self.hot.insert(m.Person, {
            "company": self.company_id, "name": (box.name or box.address.split("@")[0])[:300],
            "organization": org, "auto_created": True, "created_at": now})
        self.hot.insert(m.PersonAddress, {"person": pid, "company": self.company_id,
                                          "address": box.address})
        self.person_org[pid] = org
        created.append(pid)
        decisions.append(f"{box.address}: created person #{pid}"
                         + (f" in organization #{org}" if org else ""))
        return pid


def _find_thread(hot: HotPath, company_id: int, original: Original, external: set[str],
                 when: datetime, window_days: int) -> tuple[int | None, str]:
    """The existing thread this email joins, and why. Order of evidence: references we
    stored (RFC 5322 §3.6.4), Outlook's Thread-Index, then subject + shared participant."""
    refs = [x for x in [original.in_reply_to, *original.references] if x]
    tid = hot.thread_of_message_ids(company_id, refs[-50:])
    if tid is not None:
        return tid, "references"
    key = thread_index_key(original.thread_index)
    if key:
        tid = hot.thread_of_index(company_id, key)
        if tid is not None:
            return tid, "thread-index"
    subject_key = normalize_subject(original.subject)
    if subject_key and external:
        since = when - timedelta(days=window_days)
        for cand in hot.thread_candidates(company_id, subject_key, since):
            if hot.thread_shares_participant(cand, external):
                return cand, "subject and participant"
    return None, "new"


def record_email(
    config: Config, directory: Directory, original: Original, raw: bytes, arrival: Arrival,
) -> RecordResult:
    """Write the rows for one received copy. Must run inside a transaction."""
    hot = directory.hot
    company = arrival.company
    company_id = directory.company_ids[company.slug]
    user_id = directory.user_ids[arrival.user.address]
    now = naive_utc(arrival.received_at)
    decisions: list[str] = []
    dedupe_key = (original.message_id or f"hash:{original.content_hash}")[:400]

    existing = hot.email_by_key(company_id, dedupe_key)
    if existing is not None:
        if hot.has_sighting(existing[0], user_id):
            return RecordResult(existing[0], None, True, False, existing[1], [], None,
                                False, None, ["repeat of an email this user already has"])
        decisions.append(f"same message already stored as email #{existing[0]}: "
                         "new sighting only")

    # Participants and persons.
    boxes = ([(original.from_, "from")] + [(b, "to") for b in original.to]
             + [(b, "cc") for b in original.cc])
    lookup = _Lookup(hot, company_id, directory.freemail)
    lookup.prefetch(list(dict.fromkeys(
        box.address for box, _role in boxes
        if not directory.is_internal(company, box.address)
        and box.address not in arrival.ignored)))
    person_of: dict[str, int | None] = {}
    created: list[int] = []
    for box, _role in boxes:
        if box.address in person_of:
            continue
        if directory.is_internal(company, box.address):
            person_of[box.address] = None
            continue
        if box.address in arrival.ignored:
            person_of[box.address] = None
            decisions.append(f"{box.address}: a correspondent this user does not track")
            continue
        person_of[box.address] = lookup.person(box, config.policy.create_unknown_persons, now,
                                               decisions, created)
    if original.forward and original.forward.get("unattributed"):
        decisions.append(f"could not tell who wrote the forwarded email (shown only as "
                         f"{original.forward['unattributed']!r}): stored as the forwarder's")
    elif original.forward and original.forward.get("sender_by_name"):
        decisions.append(f"forwarded email's sender {original.forward['sender_by_name']!r} "
                         f"matched by name to {original.from_.address}")
    persons = sorted({p for p in person_of.values() if p is not None})
    external = {a for a in person_of
                if not directory.is_internal(company, a) and a not in arrival.ignored}
    relinked = RelinkReport()
    if created:
        # The CRM just learned these addresses: earlier mail that carries them is linked now,
        # in this transaction (linking/relink.py).
        new_addresses = [a for a, pid in person_of.items() if pid in created]
        relinked = relink_addresses(config, company, company_id, new_addresses, now,
                                    actor=arrival.user.address)
        if relinked.emails:
            decisions.append(f"{relinked.emails} earlier email(s) linked to the new "
                             "person(s)")
    if not external:
        decisions.append("internal only: no customer among the participants")

    when = naive_utc(original.date)
    have: set[tuple[int | None, int | None, int | None]] = set()
    open_deals: list[tuple[int, str]] | None = None  # the persons' open deals, once read
    new_thread_deal: int | None = None  # the deal a thread made here was created with
    joined = existing is not None  # an existing thread: the user's choices for it apply
    if existing is None:
        thread_id, why = _find_thread(hot, company_id, original, external, when,
                                      config.policy.thread_window_days)
        if thread_id is None:
            # A new thread gets the deal decided below for it in its INSERT (not in an
            # UPDATE after): the +deal address, else the persons' only open deal.
            if arrival.deal_id is not None:
                new_thread_deal = arrival.deal_id
            elif arrival.user.auto_link_deals and persons:
                open_deals = hot.open_deals(company_id, persons)
                if len(open_deals) == 1:
                    new_thread_deal = open_deals[0][0]
            thread_id = hot.insert(m.Thread, {
                "company": company_id, "subject_key": normalize_subject(original.subject),
                "deal": new_thread_deal, "created_at": now, "last_at": when})
            thread_deal = None
        else:
            decisions.append(f"joins thread #{thread_id} ({why})")
            thread_deal = hot.join_thread(thread_id, when)
            joined = True
        email_id = hot.insert(m.Email, {
            "company": company_id, "dedupe_key": dedupe_key, "message_id": original.message_id,
            "content_hash": original.content_hash, "thread": thread_id,
            "subject": original.subject, "date": when,
            "from_address": original.from_.address, "from_name": original.from_.name[:300],
            "to_json": _json([b.as_dict() for b in original.to]),
            "cc_json": _json([b.as_dict() for b in original.cc]),
            "in_reply_to": original.in_reply_to, "references": " ".join(original.references),
            "thread_index": thread_index_key(original.thread_index),
            "snippet": original.snippet, "attachments_json": _json(original.attachments),
            "size": len(raw), "raw": raw,
            "kind": arrival.channel if arrival.channel == "forward" else "bcc",
            "forward_json": _json(original.forward) if original.forward else None,
            "created_at": now, "number": hot.next_email_number(company_id),
        })
        hot.insert_many(m.Participant, [
            {"email": email_id, "address": box.address, "name": box.name[:300], "role": role,
             "person": person_of.get(box.address)}
            for box, role in boxes
        ])
    else:
        email_id, thread_id = existing
        thread_deal = hot.thread_row(thread_id)[1]
        # Links are per email: a second sighting adds nothing twice.
        have = hot.links_of_email(email_id)

    new_links: list[dict[str, Any]] = []
    orgs: set[int] = set()
    for pid in persons:
        if (pid, None, None) not in have:
            new_links.append({"email": email_id, "person": pid, "deal": None,
                              "organization": None, "source": "auto", "created_at": now})
        org = lookup.person_org.get(pid)
        if org:
            orgs.add(org)
    for addr in sorted(external):
        org = lookup.org_of_domain(domain_of(addr))
        if org:
            orgs.add(org)
    for oid in sorted(orgs):
        if (None, None, oid) not in have:
            new_links.append({"email": email_id, "person": None, "deal": None,
                              "organization": oid, "source": "auto", "created_at": now})

    # The deal.
    deal_id: int | None = None
    deal_source = "auto"
    needs_choice = False
    pending_id: int | None = None
    existing_deals = [d for (_p, d, _o) in have if d]
    mismatch: DealMismatch | None = None
    if arrival.deal_id is not None:
        deal_id, deal_source = arrival.deal_id, "address"
        decisions.append(f"deal #{deal_id} named by the +deal address")
        mismatch = _deal_mismatch(deal_id, persons, orgs)
        if mismatch is not None:
            decisions.append(f"deal #{deal_id} {mismatch.title!r} belongs to "
                             f"{mismatch.belongs_to}, not to "
                             f"{', '.join(mismatch.correspondents)}: linked as asked")
        if thread_deal is None and new_thread_deal != deal_id:
            hot.set_thread_deal(thread_id, deal_id)
    elif existing_deals:
        deal_id = existing_deals[0]
    elif thread_deal is not None:
        deal_id, deal_source = thread_deal, "thread"
        decisions.append(f"deal #{deal_id} followed from the thread")
    elif joined and hot.thread_unlinked(thread_id):
        decisions.append("no deal: the thread was unlinked from its deal by a user")
    elif not arrival.user.auto_link_deals:
        decisions.append("automatic deal linking is off for this user")
    elif persons:
        if open_deals is None:
            open_deals = hot.open_deals(company_id, persons)
        if len(open_deals) == 1:
            deal_id = open_deals[0][0]
            decisions.append(f"deal #{deal_id} {open_deals[0][1]!r}: the person's only "
                             "open deal")
            if new_thread_deal != deal_id:
                hot.set_thread_deal(thread_id, deal_id)
        elif len(open_deals) > 1 and arrival.quarantined:
            # Nobody may be asked about a copy nobody may see: the question waits for its
            # release (linking/quarantine.py).
            decisions.append("needs a deal choice once released from quarantine")
        elif len(open_deals) > 1:
            needs_choice = True
            decisions.append("needs choice among " + ", ".join(
                f"#{d} {title!r}" for d, title in open_deals))
            pending_id = hot.pending_for_thread(thread_id, user_id)
            if pending_id is None:
                pending_id = hot.insert(m.PendingChoice, {
                    "user": user_id, "email": email_id, "thread": thread_id,
                    "person": persons[0], "candidates_json": _json([d for d, _ in open_deals]),
                    "state": "pending", "created_at": now})
        else:
            decisions.append("no open deal for the matched persons")
    if deal_id is not None and deal_id not in existing_deals:
        new_links.append({"email": email_id, "person": None, "deal": deal_id,
                          "organization": None, "source": deal_source, "created_at": now})
    hot.insert_many(m.Link, new_links)

    # A thread the user made private (or shared) keeps that for their later copies.
    chosen = hot.thread_visibility(thread_id, user_id) if joined else None
    visibility = ("quarantined" if arrival.quarantined
                  else chosen or arrival.user.default_visibility)
    sighting_id = hot.insert(m.Sighting, {
        "email": email_id, "user": user_id, "channel": arrival.channel,
        "visibility": visibility, "queue_id": arrival.queue_id, "received_at": now,
        "envelope_from": arrival.envelope_from, "client_ip": arrival.client_ip,
        "verification": arrival.verification, "evidence_json": _json(arrival.evidence),
        "decisions_json": _json(decisions),
    })
    return RecordResult(
        email_id=email_id, sighting_id=sighting_id, duplicate=False,
        new_email=existing is None, thread_id=thread_id, persons=persons, deal_id=deal_id,
        needs_choice=needs_choice, pending_choice_id=pending_id, decisions=decisions,
        deal_mismatch=mismatch, relink_questions=relinked.questions,
    )
