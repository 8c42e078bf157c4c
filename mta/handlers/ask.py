"""The ``<slug>+ask@`` handler: a verified user asks for a deal's, person's or org's history,
and sends commands about their own tracked emails (``private E12``, ``forget E12``...).

Only the company's users may ask, verified exactly as for Smart BCC (the same verifier: trusted
network, DKIM, upstream Authentication-Results...). Anyone else is refused at SMTP time with
``550 5.7.1`` and nothing is sent or changed — an answer to a forged sender would be
backscatter and a privacy leak, a command from one would be a stranger's hand on a user's
mail. Quarantine does not apply here: an unverified request is simply refused. Automatic
messages (Auto-Submitted, our own marker) are accepted and ignored (no loops, RFC 3834 §2).
The commands of one mail are applied, and the one answer (:mod:`digest.ask`) queued in the
outbox, inside the committer's transaction: all of it or nothing is committed, and the answer
is sent after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from crmstore.handles import email_of
from crmstore.outbox import enqueue
from dealmail.config import Company
from digest.ask import answer_mail, answer_message, parse_mail, parse_release, release_message
from linking.capture import Capture, CaptureRequest, Disposition, Trust
from linking.replytext import extract_reply_from_message

from .. import replies
from ..replies import Reply
from ..routing import Route
from ..server import DataContext, Job, evidence_of

log = logging.getLogger("dealmail.ask")


class AskHandler:
    serves: tuple[str, ...] = ("ask",)

    def __init__(self, capture: Capture, now: Callable[[], datetime],
                 scrub: Callable[[], None] | None = None) -> None:
        self.capture = capture
        self.now = now
        # Asked when a command deleted an email: its content leaves the database files
        # after the commit (crmstore.db.Store.scrub_after_commit).
        self.scrub = scrub

    def rcpt_check(self, route: Route) -> Reply | None:
        return None

    def check(self, ctx: DataContext) -> Reply | Job:
        qid = ctx.queue_id
        parsed = self.capture.read(ctx.raw)
        if isinstance(parsed, Disposition):
            return replies.for_disposition(parsed, qid)
        company = ctx.routes[0].company
        config = self.capture.config_of()
        request = CaptureRequest(raw=ctx.raw, channel="ask", company=company, queue_id=qid,
                                 evidence=evidence_of(ctx), trust=Trust.VERIFY)
        # An unverified request is refused, never quarantined: an answer to a forged sender
        # would be backscatter and a privacy leak.
        admitted = self.capture.gate.admit(parsed, request, allow_quarantine=False)
        if isinstance(admitted, Disposition):
            log.info("[%s] ask refused: %s", qid, admitted.reason)
            return replies.for_disposition(admitted, qid)
        user = admitted.user
        try:
            body = extract_reply_from_message(parsed.full)
        except Exception:  # a body we cannot read still has a subject to answer
            log.info("[%s] ask: body unreadable, using the subject only", qid)
            body = ""
        release = parse_release(parsed.subject, body)
        if release is not None:
            return self._release_job(qid, user.address, company, release, parsed.message_id)
        mail = parse_mail(parsed.subject, body)
        message_id = parsed.message_id
        now = self.now()
        company_id = self.capture.directory_of().company_ids.get(company.slug)

        def job() -> Reply:
            answer, results = answer_mail(config, user.address, mail, now, qid)
            if self.scrub is not None and any(r.values.get("deleted") for r in results):
                self.scrub()
            msg = answer_message(config, answer, now, in_reply_to=message_id)
            ids = enqueue(msg, kind="answer", mail_from="", recipients=[user.address],
                          now=now, company_id=company_id)
            log.info("[%s] ask from %s: %d command(s) (%d refused), %s; answer queued as "
                     "outbox %s", qid, user.address, len(results),
                     sum(1 for r in results if not r.ok),
                     ", ".join(f"{r.kind} {r.arg}".strip() for r in mail.requests) or "-",
                     ids)
            return replies.queued(qid)

        return job

    def _release_job(self, qid: str, user: str, company: Company, number: int,
                     message_id: str | None) -> Job:
        """``release E<number>``: the verified user releases their own quarantined copy (in
        the committer's transaction, with the capture hooks), and is told."""
        config = self.capture.config_of()
        company_id = self.capture.directory_of().company_ids.get(company.slug)
        now = self.now()

        def job() -> Reply:
            email = email_of(company_id, number) if company_id is not None else None
            done = (self.capture.release(email.id, actor=user, user_address=user)
                    if email is not None else None)
            msg = release_message(config, user, number, done is not None, now,
                                  in_reply_to=message_id)
            enqueue(msg, kind="answer", mail_from="", recipients=[user], now=now,
                    company_id=company_id)
            log.info("[%s] release E%s asked by %s: %s", qid, number, user,
                     "released" if done is not None else "no such quarantined copy")
            return replies.queued(qid)

        return job
