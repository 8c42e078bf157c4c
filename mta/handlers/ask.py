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
from dealmail.config import Config
from digest.ask import answer_message, answer_request, parse_request
from linking.replytext import extract_reply_from_message

from .. import replies
from ..replies import Reply
from ..server import DataContext, Job
from .common import read_message
from .smart_bcc import Verifier

log = logging.getLogger("dealmail.ask")


class AskHandler:
    def __init__(self, config_of: Callable[[], Config], now: Callable[[], datetime],
                 verifier: Verifier) -> None:
        self.config_of = config_of
        self.now = now
        self.verifier = verifier

    def check(self, ctx: DataContext) -> Reply | Job:
        qid = ctx.queue_id
        parsed = read_message(ctx, log, "request")
        if isinstance(parsed, Reply):
            return parsed
        company = ctx.routes[0].company
        config = self.config_of()
        found = config.find_user(parsed.from_.address)
        if found is None or found[0].slug != company.slug:
            log.info("[%s] ask refused: %s is not a user of %s", qid, parsed.from_.address,
                     company.slug)
            return replies.not_allowed(
                f"<{parsed.from_.address}> is not allowed to use this address")
        _company, user = found
        verdict = self.verifier(ctx, parsed, company, user)
        if verdict.temp_error:
            return replies.dns_temp_failure(
                f"Sender verification failed temporarily: {verdict.reason}")
        if not verdict.accepted:
            log.info("[%s] ask refused: %s not verified (%s; level %s)", qid,
                     parsed.from_.address, verdict.reason, verdict.level)
            return replies.not_allowed(
                f"Message from <{parsed.from_.address}> could not be verified: "
                f"{verdict.reason}")
        try:
            body = extract_reply_from_message(parsed.full)
        except Exception:  # a body we cannot read still has a subject to answer
            log.info("[%s] ask: body unreadable, using the subject only", qid)
            body = ""
        request = parse_request(parsed.subject, body)
        message_id = parsed.message_id
        now = self.now()

        def job() -> Reply:
            answer = answer_request(config, user.address, request, now)
            msg = answer_message(config, answer, now, in_reply_to=message_id)
            ids = enqueue(msg, kind="answer", mail_from="", recipients=[user.address],
                          now=now)
            log.info("[%s] ask from %s (%s %s): answer queued as outbox %s", qid,
                     user.address, request.kind, request.arg, ids)
            return replies.queued(qid)

        return job
