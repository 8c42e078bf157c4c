"""Notices: short emails that tell a user what dealmail did with their mail when it is not what
they might expect — today, a ``+deal<ID>`` that named a deal of another customer (obeyed, and
said). Queued in the outbox from a capture hook, inside the transaction that recorded the email.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from crmstore import models as m
from crmstore.outbox import enqueue
from dealmail.clock import naive_utc
from dealmail.config import Company, Config, User
from linking.record import DealMismatch, Directory, RecordResult

from .compose import new_message, render, shared_environment

__all__ = ["deal_mismatch_hook", "deal_mismatch_line"]

_LINES = {
    "en": "“{subject}” is on deal #{deal} {title}, as you asked — note that this deal belongs to "
          "{owner}, not to {correspondents}. To move it, send it again to the right "
          "+deal address.",
    "ja": "「{subject}」はご指定どおり案件#{deal}「{title}」に紐付けました。ただし、この案件は"
          "{correspondents}ではなく{owner}の案件です。別の案件にする場合は、正しい+deal"
          "アドレスへもう一度送ってください。",
}


def deal_mismatch_line(user: User, subject: str, mismatch: DealMismatch) -> str:
    lang = "ja" if user.language == "ja" else "en"
    sep = "、" if lang == "ja" else ", "
    return _LINES[lang].format(subject=subject or "(no subject)", deal=mismatch.deal_id,
                               title=mismatch.title, owner=mismatch.belongs_to,
                               correspondents=sep.join(mismatch.correspondents))


def deal_mismatch_hook(config_of: Callable[[], Config], directory_of: Callable[[], Directory],
                       now: Callable[[], datetime]) -> Callable[[RecordResult, User, Company],
                                                                None]:
    """A capture hook: when a user's ``+deal`` named another customer's deal, tell them."""

    def hook(result: RecordResult, user: User, company: Company) -> None:
        mismatch = result.deal_mismatch
        if mismatch is None:
            return
        config = config_of()
        email = m.Email.get_by_id(result.email_id)
        when = naive_utc(now())
        text = render(shared_environment(), "notice.txt",
                      lines=[deal_mismatch_line(user, email.subject, mismatch)])
        subject = ("案件の紐付けをご確認ください" if user.language == "ja"
                   else f"Check the deal of: {email.subject}"[:200])
        message = new_message(config, company, to=user.address, subject=subject, text=text,
                              kind="notice", now=when, in_reply_to=email.message_id)
        enqueue(message, kind="notice", mail_from="", recipients=[user.address], now=when,
                company_id=directory_of().company_ids.get(company.slug))

    return hook
