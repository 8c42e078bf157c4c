"""Quarantined copies for the admin: list their metadata, drop them.

A copy is quarantined when its sender claimed to be a user and the company's policy could not
verify that, with ``on_unverified = "quarantine"`` (``linking/capture.py``): it is stored with
``sighting.visibility = "quarantined"`` and nobody sees it (``crmstore/visibility.py``). The
admin's tools (``dealmail quarantine``) show only what an MTA admin needs to judge it — the
claimed sender, client address, envelope, verification evidence, subject, size and dates —
never the body: the copy belongs to the claimed user, and an admin never reads another user's
mail. Releasing a copy (``linking/quarantine.py``) makes it the claimed user's normal copy.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from dealmail.clock import json_time, naive_utc

from . import models as m

__all__ = ["drop_quarantined", "list_quarantined", "prune_auto_persons"]


def list_quarantined(company_id: int | None = None) -> list[dict[str, Any]]:
    """Every quarantined copy, oldest first (metadata only)."""
    q = m.Sighting.select().where(m.Sighting.visibility == "quarantined")
    if company_id is not None:
        q = q.where(m.Sighting.user.in_(m.User.select(m.User.id)
                                         .where(m.User.company == company_id)))
    sightings = list(q.order_by(m.Sighting.received_at, m.Sighting.id))
    emails = {e.id: e for e in m.Email.select(
        m.Email.id, m.Email.subject, m.Email.size, m.Email.date, m.Email.message_id,
        m.Email.from_address).where(m.Email.id.in_([s.email_id for s in sightings] or [0]))}
    users = {u.id: u for u in m.User.select(m.User.id, m.User.address, m.User.company)}
    slugs = dict(m.Company.select(m.Company.id, m.Company.slug).tuples())
    out = []
    for s in sightings:
        email, user = emails[s.email_id], users[s.user_id]
        out.append({
            "id": email.id, "sighting": s.id, "company": slugs.get(user.company_id),
            "claimed_user": user.address, "from": email.from_address,
            "envelope_from": s.envelope_from, "client_ip": s.client_ip,
            "channel": s.channel, "verification": s.verification,
            "evidence": json.loads(s.evidence_json or "{}"),
            "subject": email.subject, "size": email.size, "message_id": email.message_id,
            "date": json_time(email.date), "received": json_time(s.received_at),
            "queue_id": s.queue_id,
        })
    return out


def drop_quarantined(email_id: int, now: datetime, actor: str = "dealmail quarantine") -> bool:
    """Delete the quarantined copies of email ``email_id`` (must run inside a transaction).
    An email nobody else holds a copy of goes with them (its participants, links and pending
    choices cascade), and so do persons created automatically from it alone. False when the
    email has no quarantined copy."""
    copies = list(m.Sighting.select().where((m.Sighting.email == email_id)
                                            & (m.Sighting.visibility == "quarantined")))
    if not copies:
        return False
    email = m.Email.get_by_id(email_id)
    m.Sighting.delete().where(m.Sighting.id.in_([s.id for s in copies])).execute()
    detail = {"email": email_id, "message_id": email.message_id,
              "users": [s.user_id for s in copies], "client_ip": copies[0].client_ip}
    if not m.Sighting.select().where(m.Sighting.email == email_id).exists():
        persons = {p.person_id for p in m.Participant.select(m.Participant.person)
                   .where((m.Participant.email == email_id) & m.Participant.person.is_null(False))}
        thread_id = email.thread_id
        email.delete_instance(recursive=False)
        if not m.Email.select().where(m.Email.thread == thread_id).exists():
            m.Thread.delete().where(m.Thread.id == thread_id).execute()
        detail["removed_persons"] = prune_auto_persons(persons)
        detail["email_deleted"] = True
    m.AuditEntry.create(at=naive_utc(now), company=email.company_id, actor=actor,
                        action="quarantine-drop", email=None, detail_json=json.dumps(detail))
    return True


def prune_auto_persons(person_ids: set[int] | list[int]) -> list[int]:
    """Remove persons that were created automatically and that nothing holds any more: no
    participation in a stored email, no link, no deal. Returns the ids removed."""
    removed = []
    for pid in sorted(person_ids):
        person = m.Person.get_or_none(m.Person.id == pid)
        if person is None or not person.auto_created:
            continue
        if (m.Participant.select().where(m.Participant.person == pid).exists()
                or m.Link.select().where(m.Link.person == pid).exists()
                or m.Deal.select().where(m.Deal.person == pid).exists()):
            continue
        person.delete_instance(recursive=False)  # addresses cascade
        removed.append(pid)
    return removed
