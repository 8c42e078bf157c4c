"""Persons that exist only because a user wrote to a mistyped address.

Relayed mail creates a person for each unknown customer address (``linking/record.py``). When
the destination answers that the mailbox does not exist (RFC 3463 ``5.1.x``: bad mailbox,
bad system, bad syntax), a person created that way is nobody: it is removed, so that it never
shows in listings, digests or "which deal?" questions. Removed only when nothing shows it is
somebody: created automatically, never the sender of a stored email, no deal. Its address and
participations stay on the stored emails (``Participant.person`` becomes empty) and an audit
entry records the removal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import datetime

from dealmail.clock import naive_utc

from . import models as m

__all__ = ["forget_bounced_persons"]

log = logging.getLogger("dealmail.bounces")


def forget_bounced_persons(company_id: int | None, addresses: Iterable[str],
                           now: datetime) -> list[int]:
    """Remove the nobody persons of ``addresses`` (which hard-bounced with 5.1.x) in the
    caller's transaction; returns the removed person ids."""
    wanted = sorted({a.lower() for a in addresses})
    if company_id is None or not wanted:
        return []
    removed = []
    for pa in (m.PersonAddress.select()
               .where((m.PersonAddress.company == company_id)
                      & m.PersonAddress.address.in_(wanted))):
        person = m.Person.get_or_none(m.Person.id == pa.person_id)
        if person is None or not person.auto_created:
            continue
        if (m.Deal.select().where(m.Deal.person == person.id).exists()
                or m.Participant.select().where((m.Participant.person == person.id)
                                                & (m.Participant.role == "from")).exists()
                or m.PersonAddress.select().where(
                    (m.PersonAddress.person == person.id)
                    & m.PersonAddress.address.not_in(wanted)).exists()):
            continue
        # Choices offered because of this person are void: it has no deal to choose.
        (m.PendingChoice.update(state="void")
         .where((m.PendingChoice.person == person.id)
                & m.PendingChoice.state.in_(["pending", "asked"])).execute())
        person.delete_instance()  # addresses and links cascade; participants keep the address
        m.AuditEntry.create(at=naive_utc(now), company=company_id, actor="dealmail outbox",
                            action="person-removed", email=None,
                            detail_json=json.dumps({"person": person.id, "name": person.name,
                                                    "address": pa.address,
                                                    "reason": "mailbox does not exist (5.1.x)"}))
        log.info("person #%s <%s> removed: created only by mail to an address that does not "
                 "exist", person.id, pa.address)
        removed.append(person.id)
    return removed
