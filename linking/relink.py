"""Re-linking stored mail when the CRM learns more.

An email is linked to the persons its correspondents were known as when it arrived. When a
person is later imported, created from a newer email, or given another address, the earlier
emails that carry one of those addresses are linked now, in the transaction that added the
address: participant → person, email → person and organization, and the thread's deal when it
has none (the person's one open deal; several open deals → a pending "which deal?" choice for
each user who has a copy, asked in that user's next question). Each re-linked email gets an
audit entry. ``dealmail relink`` runs the same over a whole company. A correspondent every
holder of an email ignores is not linked, and a thread a user unlinked gets no deal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from crmstore import models as m
from crmstore.inbox import ignored_patterns, is_ignored
from dealmail.clock import naive_utc
from dealmail.config import Company, Config

__all__ = ["RelinkReport", "relink_addresses"]

_BATCH = 500


@dataclass
class RelinkReport:
    emails: int = 0
    participants: int = 0
    deals: int = 0
    #: (user address, pending choice id) of the questions the caller should queue.
    questions: list[tuple[str, int]] = field(default_factory=list)

    def merge(self, other: RelinkReport) -> None:
        self.emails += other.emails
        self.participants += other.participants
        self.deals += other.deals
        self.questions.extend(other.questions)


def relink_addresses(config: Config, company: Company, company_id: int,
                     addresses: Iterable[str] | None, now: datetime,
                     actor: str = "dealmail",
                     progress: Callable[[int, int], None] | None = None) -> RelinkReport:
    """Link the stored emails of ``company`` whose participants carry one of ``addresses``
    (None: every address) to the persons those addresses now belong to. Must run inside the
    caller's transaction. ``progress(done, total)`` counts the emails to re-link (every 100,
    and once at the end)."""
    report = RelinkReport()
    wanted = None if addresses is None else sorted(set(addresses))
    chunks: list[list[str] | None] = (
        [None] if wanted is None else
        [wanted[i:i + _BATCH] for i in range(0, len(wanted), _BATCH)])
    for chunk in chunks:
        report.merge(_relink_chunk(config, company, company_id, chunk, naive_utc(now), actor,
                                   progress))
    return report


def _relink_chunk(config: Config, company: Company, company_id: int, chunk: list[str] | None,
                  now: datetime, actor: str,
                  progress: Callable[[int, int], None] | None = None) -> RelinkReport:
    report = RelinkReport()
    known = (m.PersonAddress.select(m.PersonAddress.address, m.PersonAddress.person)
             .where(m.PersonAddress.company == company_id))
    if chunk is not None:
        known = known.where(m.PersonAddress.address.in_(chunk))
    person_of = {row.address: row.person_id for row in known}
    if not person_of:
        return report
    orphans = (m.Participant
               .select(m.Participant.id, m.Participant.email, m.Participant.address)
               .join(m.Email, on=(m.Participant.email == m.Email.id))
               .where((m.Email.company == company_id) & m.Participant.person.is_null()
                      & m.Participant.address.in_(list(person_of))))
    by_email: dict[int, dict[int, int]] = {}  # email -> {participant id: person id}
    ignoring = _IgnoreLists()
    for p in orphans:
        if ignoring.by_every_owner(p.email_id, p.address):
            continue
        by_email.setdefault(p.email_id, {})[p.id] = person_of[p.address]
    total = len(by_email)
    for done, (email_id, parts) in enumerate(sorted(by_email.items()), start=1):
        _relink_email(config, company, company_id, email_id, parts, now, actor, report)
        if progress is not None and (done % 100 == 0 or done == total):
            progress(done, total)
    return report


class _IgnoreLists:
    """Users' ignore lists (``ignore ann@customer.test``, crmstore/inbox.py): a correspondent
    every holder of an email ignores is not linked to it later either."""

    def __init__(self) -> None:
        self._owners: dict[int, list[int]] = {}
        self._patterns: dict[int, frozenset[str]] = {}

    def by_every_owner(self, email_id: int, address: str) -> bool:
        owners = self._owners.get(email_id)
        if owners is None:
            owners = self._owners[email_id] = [
                s.user_id for s in m.Sighting.select(m.Sighting.user)
                .where(m.Sighting.email == email_id)]
        for user_id in owners:
            if user_id not in self._patterns:
                self._patterns[user_id] = ignored_patterns(user_id)
        return bool(owners) and all(is_ignored(address, self._patterns[u]) for u in owners)


def _relink_email(config: Config, company: Company, company_id: int, email_id: int,
                  parts: dict[int, int], now: datetime, actor: str,
                  report: RelinkReport) -> None:
    for participant_id, person_id in parts.items():
        (m.Participant.update(person=person_id)
         .where(m.Participant.id == participant_id).execute())
    report.participants += len(parts)
    persons = sorted(set(parts.values()))
    have = {(lk.person_id, lk.organization_id) for lk in
            m.Link.select(m.Link.person, m.Link.organization).where(m.Link.email == email_id)}
    orgs = {p.organization_id for p in m.Person.select(m.Person.organization)
            .where(m.Person.id.in_(persons)) if p.organization_id is not None}
    rows = [{"email": email_id, "person": pid, "source": "relink", "created_at": now}
            for pid in persons if (pid, None) not in have]
    rows += [{"email": email_id, "organization": oid, "source": "relink", "created_at": now}
             for oid in sorted(orgs) if (None, oid) not in have]
    if rows:
        m.Link.insert_many(rows).execute()
    email = m.Email.get_by_id(email_id)
    thread = m.Thread.get_by_id(email.thread_id)
    deal_note: dict[str, object] = {}
    has_deal = thread.deal_id is not None or m.Link.select().where(
        (m.Link.email == email_id) & m.Link.deal.is_null(False)).exists()
    # A thread a user took off any deal (``unlink E12``) stays without one.
    unlinked = m.ThreadUnlinked.select().where(m.ThreadUnlinked.thread == thread.id).exists()
    if not has_deal and not unlinked:
        open_deals = [d.id for d in m.Deal.select(m.Deal.id).where(
            (m.Deal.company == company_id) & m.Deal.person.in_(persons)
            & (m.Deal.status == "open")).order_by(m.Deal.id)]
        if len(open_deals) == 1:
            deal_id = open_deals[0]
            thread.deal = deal_id
            thread.save(only=[m.Thread.deal])
            m.Link.create(email=email_id, deal=deal_id, source="relink", created_at=now)
            report.deals += 1
            deal_note = {"deal": deal_id}
        elif len(open_deals) > 1:
            deal_note = {"needs_choice": open_deals}
            _ask_owners(config, company, email, persons[0], open_deals, now, report)
    report.emails += 1
    m.AuditEntry.create(
        at=now, company=company_id, actor=actor, action="relink", email=email_id,
        detail_json=json.dumps({"persons": persons, "organizations": sorted(orgs),
                                **deal_note}))


def _ask_owners(config: Config, company: Company, email: m.Email, person_id: int,
                open_deals: list[int], now: datetime, report: RelinkReport) -> None:
    """A pending choice for each user holding a (non-quarantined) copy whose automatic deal
    linking is on, unless that user already has one for the thread."""
    for sighting in (m.Sighting.select(m.Sighting.user)
                     .where((m.Sighting.email == email.id)
                            & (m.Sighting.visibility != "quarantined"))):
        user_row = m.User.get_by_id(sighting.user_id)
        user = company.user(user_row.address)
        if user is None or not user.auto_link_deals:
            continue
        exists = m.PendingChoice.select().where(
            (m.PendingChoice.thread == email.thread_id)
            & (m.PendingChoice.user == user_row.id)
            & m.PendingChoice.state.in_(("pending", "asked"))).exists()
        if exists:
            continue
        row = m.PendingChoice.create(
            user=user_row.id, email=email.id, thread=email.thread_id, person=person_id,
            candidates_json=json.dumps(open_deals), state="pending", created_at=now)
        report.questions.append((user.address, int(row.id)))
