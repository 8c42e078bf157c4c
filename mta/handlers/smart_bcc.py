"""Smart BCC handler: a user's copy of their mail, sent to ``<slug>@`` or ``<slug>+deal<ID>@``.

Seed rules 4 and 5: one universal company address; only a user's primary address, or an
alternate listed in the config, may use it. The sender is the header From, parsed strictly;
whether the claim is believable is decided by the sender verifier (trusted network here,
cryptographic levels in ``mta.senderauth``). A message that passes is stored once and linked by
``linking.record``; auto-replies are accepted and ignored so that no loop can start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dealmail.config import Company, Config, User
from linking.originals import originals_for
from linking.parse import ParsedMessage
from linking.record import Arrival, Directory, Original, RecordResult, record_email

from .. import replies
from ..replies import Reply
from ..server import DataContext, Job
from .common import read_message

log = logging.getLogger("dealmail.bcc")


@dataclass
class Verification:
    """The sender verifier's answer for one message."""

    level: str
    reason: str
    accepted: bool
    quarantine: bool = False
    temp_error: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)
    header: str | None = None  # our Authentication-Results line for the stored copy


Verifier = Callable[[DataContext, ParsedMessage, Company, User], Verification]
AfterRecord = Callable[[RecordResult, User, Company], None]
# Checks the DKIM signatures of an attached original: (raw, from domain) -> results.
SignatureCheck = Callable[[bytes, str], list[dict[str, Any]]]


class SmartBccHandler:
    channel = "bcc"

    def __init__(
        self,
        config_of: Callable[[], Config],
        directory_of: Callable[[], Directory],
        now: Callable[[], datetime],
        verifier: Verifier,
        after_record: AfterRecord | None = None,
        signature_check: SignatureCheck | None = None,
    ) -> None:
        self.signature_check = signature_check
        self.config_of = config_of
        self.directory_of = directory_of
        self.now = now
        self.verifier = verifier
        self.after_record = after_record

    def check(self, ctx: DataContext) -> Reply | Job:
        qid = ctx.queue_id
        parsed = read_message(ctx, log, "message")
        if isinstance(parsed, Reply):
            return parsed
        mid = parsed.message_id or "-"
        company = ctx.routes[0].company
        config = self.config_of()
        found = config.find_user(parsed.from_.address)
        if found is None or found[0].slug != company.slug:
            log.info("[%s] %s refused: sender %s is not a user of %s", qid, mid,
                     parsed.from_.address, company.slug)
            return replies.not_allowed(
                f"<{parsed.from_.address}> is not allowed to use this address")
        _company, user = found
        verdict = self.verifier(ctx, parsed, company, user)
        if verdict.temp_error:
            log.info("[%s] %s deferred: %s", qid, mid, verdict.reason)
            return replies.dns_temp_failure(f"Sender verification failed temporarily: "
                                            f"{verdict.reason}")
        if not verdict.accepted and not verdict.quarantine:
            log.info("[%s] %s refused: sender %s not verified (%s; level %s)", qid, mid,
                     parsed.from_.address, verdict.reason, verdict.level)
            return replies.not_allowed(
                f"Message from <{parsed.from_.address}> could not be verified: "
                f"{verdict.reason}. If this is your address, send from your login address "
                "or ask your admin to list it among your alternate addresses")
        envelope = ctx.mail_from.lower()
        if envelope and envelope not in user.addresses:
            log.info("[%s] %s envelope sender <%s> is not an address of %s", qid, mid,
                     ctx.mail_from, user.address)
        deal_id = next((r.deal_id for r in ctx.routes if r.deal_id is not None), None)
        now = self.now()
        channel, originals, _chains = originals_for(parsed, user, config, now)
        for original in originals:
            # An attached original keeps its own signature: record whether it verifies, as
            # evidence of who wrote it (it never makes the forward itself verified).
            if original.original_raw and original.forward is not None and self.signature_check:
                original.forward["dkim"] = self.signature_check(
                    original.original_raw, original.from_.address.rpartition("@")[2])
        arrival = Arrival(
            user=user, company=company, channel=channel, queue_id=qid, received_at=now,
            envelope_from=ctx.mail_from, client_ip=ctx.peer_ip, verification=verdict.level,
            evidence=verdict.evidence, deal_id=deal_id,
            quarantined=not verdict.accepted and verdict.quarantine,
        )
        log.info("[%s] %s accepted from %s (%s, %s)", qid, mid, user.address, verdict.level,
                 channel)

        # RFC 8601 §5: our verdict is the topmost header of this user's stored copy. It is
        # kept with the sighting (each copy is verified on its own) and prepended when the
        # copy is exported (crmstore.queries.stored_copy), so a 25 MB message is not copied
        # again just to gain one header line.
        if verdict.header:
            arrival.evidence = {**arrival.evidence,
                                 "authentication_results": verdict.header}

        def job() -> Reply:
            store_copies(config, self.directory_of(), originals, ctx.raw, arrival,
                         self.after_record)
            return replies.queued(qid)

        return job


def store_copies(config: Config, directory: Directory, originals: list[Original],
                 stored: bytes, arrival: Arrival,
                 after_record: AfterRecord | None) -> list[RecordResult]:
    """Store and link one received copy (inside the caller's transaction): the part every
    capturing channel shares (Smart BCC, forwards, the authenticated relay)."""
    results = []
    for original in originals:
        result = record_email(config, directory, original, stored, arrival)
        if result.duplicate:
            note_repeat(result, arrival)
        results.append(result)
        if after_record is not None and not result.duplicate:
            after_record(result, arrival.user, arrival.company)
    for original, result in zip(originals, results, strict=True):
        log.info("[%s] %s stored as email #%s%s: %s", arrival.queue_id,
                 original.message_id or "-", result.email_id,
                 " (repeat, no-op)" if result.duplicate else "",
                 "; ".join(result.decisions) or "no decision")
    return results


def note_repeat(result: RecordResult, arrival: Arrival) -> None:
    """A copy this user already has. The same bytes from another network or envelope are a
    replay of a signed message by someone who received it (RELIABILITY.md 0.7): log it and
    keep it in the audit log (the user's digest lists it); the first copy stays the only one."""
    from crmstore import models as m

    first = (m.Sighting.select().where(m.Sighting.email == result.email_id)
             .order_by(m.Sighting.id).first())
    if first is None:
        return
    if (first.client_ip, first.envelope_from.lower()) == (
            arrival.client_ip, arrival.envelope_from.lower()):
        return
    log.warning("[%s] replay attempt: email #%s first received from %s <%s>, again from %s "
                "<%s>", arrival.queue_id, result.email_id, first.client_ip,
                first.envelope_from, arrival.client_ip, arrival.envelope_from)
    m.AuditEntry.create(
        at=arrival.received_at.replace(tzinfo=None), company=first.email.company_id,
        actor=arrival.user.address, action="replay", email=result.email_id,
        detail_json=json.dumps({"client_ip": arrival.client_ip,
                                "envelope_from": arrival.envelope_from,
                                "queue_id": arrival.queue_id}))


def deal_rcpt_check(directory_of: Callable[[], Directory]) -> Callable[[Any], Reply | None]:
    """RCPT-time check of ``+deal<ID>``: the deal must exist in that company (550 5.1.1)."""
    from crmstore import models as m

    def check(route: Any) -> Reply | None:
        if route.kind != "deal":
            return None
        company_id = directory_of().company_ids.get(route.company.slug)
        exists = (m.Deal.select(m.Deal.id)
                  .where((m.Deal.id == route.deal_id) & (m.Deal.company == company_id))
                  .exists())
        return None if exists else replies.Reply(
            550, "5.1.1", f"<{route.address}>: no deal {route.deal_id} in this company")

    return check
