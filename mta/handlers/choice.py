"""Deal-choice answers: a user's reply to a "which deal?" question (``<slug>+choice-<token>@``).

The question (``digest.questions``) carries a ``Reply-To`` with a random token; the reply
comes back here. Salmon's confirmation engine is the model (pending -> token -> verify), with
our own rules:

* RCPT: a token that was never issued for this company is refused ``550 5.1.1`` (the address
  does not exist); used and expired tokens are accepted, because their answer is a report of
  the current state and a fresh question, never a bounce.
* DATA: auto-replies (out-of-office, RFC 3834) are accepted and ignored, nothing answered.
  The reply must come from the user who was asked (primary or alternate address) and pass the
  sender gate (``linking.capture.SenderGate``, as for Smart BCC), else ``550 5.7.1`` and
  nothing changes; a token withdrawn between RCPT and DATA is also ``550 5.7.1``.
* The answer is read from the reply's own text (``linking.replytext`` removes the quoted
  question and the signature) and applied by ``digest.answers`` in the committer's
  transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from digest.answers import apply_answer, token_owner
from linking.capture import Capture, CaptureRequest, Disposition, Trust
from linking.replytext import extract_reply_from_message

from .. import replies
from ..replies import Reply
from ..routing import Route
from ..server import DataContext, Job, evidence_of

log = logging.getLogger("dealmail.choice")


class ChoiceHandler:
    """Handler of ``+choice-<token>`` replies (see the module docstring)."""

    serves: tuple[str, ...] = ("choice",)

    def __init__(self, capture: Capture, now: Callable[[], datetime]) -> None:
        self.capture = capture
        self.now = now

    def rcpt_check(self, route: Route) -> Reply | None:
        """A token never issued for this company is an address that does not exist
        (``550 5.1.1``); used and expired ones are accepted."""
        if token_owner(route.token or "", self.capture.directory_of(),
                       route.company) is not None:
            return None
        return Reply(550, "5.1.1", f"<{route.address}>: no such question here")

    def check(self, ctx: DataContext) -> Reply | Job:
        qid = ctx.queue_id
        route = ctx.routes[0]
        token = route.token or ""
        # Out-of-office and other auto-replies to a question are never answered (no loops).
        parsed = self.capture.read(ctx.raw)
        if isinstance(parsed, Disposition):
            return replies.for_disposition(parsed, qid)
        mid = parsed.message_id or "-"
        config = self.capture.config_of()
        directory = self.capture.directory_of()
        company = route.company
        owner_id = token_owner(token, directory, company)
        if owner_id is None:
            log.info("[%s] %s refused: unknown question token", qid, mid)
            return replies.not_allowed("This question does not exist (any more)")
        request = CaptureRequest(raw=ctx.raw, channel="choice", company=company,
                                 queue_id=qid, evidence=evidence_of(ctx), trust=Trust.VERIFY)
        # Quarantine is for stored mail; an unverified answer must change nothing.
        admitted = self.capture.gate.admit(parsed, request, allow_quarantine=False)
        if isinstance(admitted, Disposition):
            log.info("[%s] %s answer refused: %s", qid, mid, admitted.reason)
            return replies.for_disposition(admitted, qid)
        user = admitted.user
        if directory.user_ids.get(user.address) != owner_id:
            log.info("[%s] %s refused: %s is not the user who was asked", qid, mid,
                     parsed.from_.address)
            return replies.not_allowed(
                f"<{parsed.from_.address}> may not answer this question: only the user it "
                "was sent to may answer, from their own address")
        try:
            text = extract_reply_from_message(parsed.full)
        except Exception as exc:  # a malformed body: the sender's fault, told precisely
            log.info("[%s] %s unreadable body: %s", qid, mid, exc)
            return replies.bad_content("the reply's text could not be read")
        # The length, not the text: no message content in a log (dealmail/logs.py).
        log.info("[%s] %s answer from %s (%s), %d characters", qid, mid, user.address,
                 admitted.verification.level, len(text))

        def job() -> Reply:
            apply_answer(config, directory, company, user, token, text, parsed.message_id,
                         parsed.from_.address, qid, self.now())
            return replies.queued(qid)

        return job
