"""The ``<slug>+ask@`` handler: a verified user asks for a deal's, person's or org's history.

Only the company's users may ask, verified exactly as for Smart BCC (the same verifier: trusted
network, DKIM, upstream Authentication-Results...). Anyone else is refused at SMTP time with
``550 5.7.1`` and nothing is sent — an answer to a forged sender would be backscatter and a
privacy leak. Quarantine does not apply here: an unverified request is simply refused.
Automatic messages (Auto-Submitted, our own marker) are accepted and ignored (no loops,
RFC 3834 §2). The answer is composed by :mod:`digest.ask` and queued in the outbox inside the
committer's transaction; it is sent after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from crmstore.outbox import enqueue
from digest.ask import (
    answer_message,
    answer_request,
    parse_release,
    parse_request,
    release_message,
)
from linking.capture import Capture, CaptureRequest, Disposition, Trust
from linking.replytext import extract_reply_from_message

from .. import replies
from ..replies import Reply
from ..routing import Route
from ..server import DataContext, Job, evidence_of

log = logging.getLogger("dealmail.ask")


class AskHandler:
    serves: tuple[str, ...] = ("ask",)

    def __init__(self, capture: Capture, now: Callable[[], datetime]) -> None:
        self.capture = capture
        self.now = now

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
            return self._release_job(qid, user.address, release, parsed.message_id)
        request_ = parse_request(parsed.subject, body)
        message_id = parsed.message_id
        now = self.now()

        def job() -> Reply:
            answer = answer_request(config, user.address, request_, now)
            msg = answer_message(config, answer, now, in_reply_to=message_id)
            ids = enqueue(msg, kind="answer", mail_from="", recipients=[user.address],
                          now=now)
            log.info("[%s] ask from %s (%s %s): answer queued as outbox %s", qid,
                     user.address, request_.kind, request_.arg, ids)
            return replies.queued(qid)

        return job

    def _release_job(self, qid: str, user: str, email_id: int, message_id: str | None) -> Job:
        """``release E<ID>``: the verified user releases their own quarantined copy (in the
        committer's transaction, with the capture hooks), and is told."""
        config = self.capture.config_of()
        now = self.now()

        def job() -> Reply:
            done = self.capture.release(email_id, actor=user, user_address=user)
            msg = release_message(config, user, email_id, done is not None, now,
                                  in_reply_to=message_id)
            enqueue(msg, kind="answer", mail_from="", recipients=[user], now=now)
            log.info("[%s] release E%s asked by %s: %s", qid, email_id, user,
                     "released" if done is not None else "no such quarantined copy")
            return replies.queued(qid)

        return job
