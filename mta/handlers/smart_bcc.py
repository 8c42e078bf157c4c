"""Smart BCC handler: a user's copy of their mail, sent to ``<slug>@`` or ``<slug>+deal<ID>@``.

One universal company address; only a user's primary address, or an alternate listed in the
config, may use it. The SMTP transaction becomes a capture request (``linking.capture``,
trust ``verify``: the header From names the user and the company's sender-verification policy
decides whether that is believed); the capture's disposition becomes the SMTP reply.
"""

from __future__ import annotations

import logging

from crmstore import models as m
from linking.capture import Capture, CaptureRequest, Disposition, Trust

from .. import replies
from ..replies import Reply
from ..routing import Route
from ..server import DataContext, Job, evidence_of

log = logging.getLogger("dealmail.bcc")


class SmartBccHandler:
    """Handler of the company address and of ``+deal<ID>`` addresses."""

    serves: tuple[str, ...] = ("bcc", "deal")

    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def rcpt_check(self, route: Route) -> Reply | None:
        """``+deal<ID>``: the deal must exist in that company (550 5.1.1)."""
        if route.deal_id is None:
            return None
        company_id = self.capture.directory_of().company_ids.get(route.company.slug)
        exists = (m.Deal.select(m.Deal.id)
                  .where((m.Deal.id == route.deal_id) & (m.Deal.company == company_id))
                  .exists())
        return None if exists else Reply(
            550, "5.1.1", f"<{route.address}>: no deal {route.deal_id} in this company")

    def check(self, ctx: DataContext) -> Reply | Job:
        qid = ctx.queue_id
        request = CaptureRequest(
            raw=ctx.raw, channel="bcc", company=ctx.routes[0].company, queue_id=qid,
            evidence=evidence_of(ctx), trust=Trust.VERIFY,
            deal_id=next((r.deal_id for r in ctx.routes if r.deal_id is not None), None))
        prepared = self.capture.prepare(request)
        if isinstance(prepared, Disposition):
            return replies.for_disposition(prepared, qid)

        def job() -> Reply:
            return replies.for_disposition(prepared(), qid)

        return job
