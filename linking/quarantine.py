"""Releasing a quarantined copy: it becomes the claimed user's normal copy, linked as usual.

The copy's links (persons, organization, a deal the person's only open deal or the thread gave)
were written when it was captured; what capture held back for a quarantined copy is what would
have reached somebody: the "which deal?" pending choice (and with it the question email) and
the other capture hooks. :func:`release_quarantined` gives the copy the user's default
visibility, records the release in the audit log, and creates that pending choice when the
email still needs one; the caller (``Capture.release``) then runs the hooks, in the same
transaction, exactly as for a copy stored just now.

The admin releases with ``dealmail quarantine release ID`` (the email's id); the claimed user
with ``release E<number>`` (the email's handle, crmstore/handles.py) to the company's ``+ask``
address (only from a verified sender: a forged
request is refused before it gets here).
"""

from __future__ import annotations

import json
from datetime import datetime

from crmstore import models as m
from dealmail.clock import naive_utc
from dealmail.config import Company, Config, User

from .record import RecordResult

__all__ = ["Released", "release_quarantined"]


class Released:
    """A released copy: the record result the hooks get, its user and company."""

    def __init__(self, result: RecordResult, user: User, company: Company) -> None:
        self.result = result
        self.user = user
        self.company = company


def release_quarantined(config: Config, email_id: int, now: datetime, actor: str,
                        user_address: str | None = None) -> Released | None:
    """Release the quarantined copy of email ``email_id`` (of ``user_address`` only, when
    given). Must run inside a transaction. None when there is no such copy, or when its user
    is no longer in the config."""
    q = m.Sighting.select().where((m.Sighting.email == email_id)
                                  & (m.Sighting.visibility == "quarantined"))
    if user_address is not None:
        q = q.where(m.Sighting.user == m.User.select(m.User.id)
                    .where(m.User.address == user_address))
    sighting = q.order_by(m.Sighting.id).first()
    if sighting is None:
        return None
    found = config.find_user(m.User.get_by_id(sighting.user_id).address)
    if found is None:
        return None
    company, user = found
    when = naive_utc(now)
    email = m.Email.get_by_id(email_id)
    # A thread the user made private or shared (``private thread E12``) decides, as for a copy
    # stored now (linking/record.py).
    rule = m.ThreadVisibility.get_or_none((m.ThreadVisibility.thread == email.thread_id)
                                          & (m.ThreadVisibility.user == sighting.user_id))
    visibility = rule.visibility if rule is not None else user.default_visibility
    (m.Sighting.update(visibility=visibility)
     .where(m.Sighting.id == sighting.id).execute())
    decisions = [f"released from quarantine by {actor}"]
    persons = sorted({lk.person_id for lk in m.Link.select(m.Link.person).where(
        (m.Link.email == email_id) & m.Link.person.is_null(False))})
    deal_links = [lk.deal_id for lk in m.Link.select(m.Link.deal).where(
        (m.Link.email == email_id) & m.Link.deal.is_null(False))]
    thread_deal = m.Thread.get_by_id(email.thread_id).deal_id
    deal_id = deal_links[0] if deal_links else thread_deal
    pending_id: int | None = None
    unlinked = m.ThreadUnlinked.select().where(
        m.ThreadUnlinked.thread == email.thread_id).exists()
    if deal_id is None and persons and user.auto_link_deals and not unlinked:
        open_deals = [d.id for d in m.Deal.select(m.Deal.id).where(
            m.Deal.person.in_(persons) & (m.Deal.status == "open")).order_by(m.Deal.id)]
        if len(open_deals) > 1:
            existing = m.PendingChoice.get_or_none(
                (m.PendingChoice.thread == email.thread_id)
                & (m.PendingChoice.user == sighting.user_id)
                & m.PendingChoice.state.in_(["pending", "asked"]))
            pending_id = existing.id if existing is not None else m.PendingChoice.create(
                user=sighting.user_id, email=email_id, thread=email.thread_id,
                person=persons[0], candidates_json=json.dumps(open_deals), state="pending",
                created_at=when).id
            decisions.append("needs choice among " + ", ".join(f"#{d}" for d in open_deals))
    old = json.loads(sighting.decisions_json or "[]")
    (m.Sighting.update(decisions_json=json.dumps([*old, *decisions], ensure_ascii=False))
     .where(m.Sighting.id == sighting.id).execute())
    m.AuditEntry.create(at=when, company=email.company_id, actor=actor,
                        action="quarantine-release", email=email_id,
                        detail_json=json.dumps({"user": user.address,
                                                "visibility": visibility}))
    result = RecordResult(
        email_id=email_id, sighting_id=sighting.id, duplicate=False, new_email=False,
        thread_id=email.thread_id, persons=persons, deal_id=deal_id,
        needs_choice=pending_id is not None, pending_choice_id=pending_id,
        decisions=decisions)
    return Released(result, user, company)
