"""Answers to "which deal?" questions: reading a user's reply and applying it.

The question (``digest.questions``) carries a ``Reply-To`` with a random token; the reply comes
back to ``<slug>+choice-<token>@`` (``mta/handlers/choice.py`` checks who sends it and reads its
text). Here the answer is applied, inside the transaction that records it: a valid answer
links the email and its thread to the deal, writes the audit entry and queues a one-line
confirmation (unless the user turned them off); anything unclear queues a short explanation
repeating the choices, with the same token; an answer to a question that was replaced or has
expired gets the current state and a fresh question, never a bounce. Every message back goes
through the outbox, from the null sender to the user's primary address.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from crmstore import models as m
from crmstore.handles import handle
from crmstore.outbox import enqueue
from dealmail.clock import naive_utc
from dealmail.config import Company, Config, User
from linking.answers import Answer, read_answers
from linking.parse import MARKER_HEADER
from linking.record import Directory

from . import questions as q
from .compose import company_address

__all__ = ["apply_answer", "token_owner"]

log = logging.getLogger("dealmail.choice")

_TEXT = {
    "en": {
        "linked": "“{subject}” is now on deal {id} “{title}”.",
        "none": "“{subject}” stays without a deal.",
        "was_linked": "“{subject}” was already answered: it is on deal {id} “{title}”.",
        "was_none": "“{subject}” was already answered: no deal.",
        "elsewhere": "“{subject}” is already on deal {id} “{title}”.",
        "expired": "The question about “{subject}” has expired; here it is again.",
        "replaced": "The question about “{subject}” was replaced; here is the current one.",
        "closed": "Deal {id} “{title}” is no longer open ({status}); please choose again "
                  "for “{subject}”.",
        "deleted": "Deal {id} no longer exists; please choose again for “{subject}”.",
        "unclear": "I could not read your answer about “{subject}”: {why}.",
        "missing": "“{subject}” still needs an answer.",
        "no_open": "“{subject}”: the customer has no open deal left, so it stays without a "
                   "deal.",
        "problem": "{why}.",
        "unlinked": "“{subject}” was taken off any deal (unlink), so this question is closed; "
                    "to put it on a deal, mail “deal {handle} <deal>” to {ask}.",
    },
    "ja": {
        "linked": "「{subject}」を案件{id}「{title}」に紐付けました。",
        "none": "「{subject}」は案件に紐付けません。",
        "was_linked": "「{subject}」はすでに回答済みです（案件{id}「{title}」）。",
        "was_none": "「{subject}」はすでに回答済みです（案件なし）。",
        "elsewhere": "「{subject}」はすでに案件{id}「{title}」に紐付いています。",
        "expired": "「{subject}」についての質問は期限切れです。改めてお尋ねします。",
        "replaced": "「{subject}」についての質問は新しいものに置き換えられました。",
        "closed": "案件{id}「{title}」はもう進行中ではありません（{status}）。「{subject}」の"
                  "案件を選び直してください。",
        "deleted": "案件{id}は削除されました。「{subject}」の案件を選び直してください。",
        "unclear": "「{subject}」への回答「{text}」を読み取れませんでした。{why_ja}",
        "missing": "「{subject}」はまだ回答が必要です。",
        "no_open": "「{subject}」: 顧客の進行中の案件がなくなったため、案件なしのままにします。",
        "problem": "回答を読み取れませんでした。メールごとに「1: 2, 2: 0」のように番号で答えて"
                   "ください。",
        "unlinked": "「{subject}」は案件から外されたため (紐付け解除)、この質問は終了しました。"
                    "案件に紐付けるには {ask} に「案件 {handle} <案件>」と送ってください。",
    },
}


def _say(user: User, key: str, **values: Any) -> str:
    lang = "ja" if user.language == "ja" else "en"
    return _TEXT[lang][key].format(**values)


def _why_ja(answer: Answer, count: int) -> str:
    if answer.kind == "ambiguous":
        return "複数の案件名に一致します。番号で答えてください。"
    return f"0から{count}までの番号、または案件名の一部で答えてください。"


def apply_answer(config: Config, directory: Directory, company: Company, user: User,
                 token: str, text: str, reply_id: str | None, actor: str, qid: str,
                 now: datetime) -> None:
    """Apply one reply to a question (inside the caller's transaction) and queue what is
    said back: a confirmation, an explanation with the same token, or a fresh question."""
    nnow = naive_utc(now)
    company_id = directory.company_ids[company.slug]
    pairs = q.batch_rows(token)
    by_number = dict(pairs)
    top = max(by_number) if by_number else 0
    cands = dict(zip(by_number, q.candidates_of_rows(list(by_number.values())), strict=True))
    answers = read_answers(text, [cands.get(k, []) for k in range(1, top + 1)])
    notes: list[str] = []
    done: list[str] = []
    fresh_needed: list[m.PendingChoice] = []
    waiting: list[q.Item] = []
    for k, row in pairs:
        subject = _subject(row)
        thread = m.Thread.get_by_id(row.thread_id)
        if row.state == "answered":
            notes.append(_state_note(user, row, subject))
            continue
        if thread.deal_id is not None:
            if row.state in q.ACTIVE:
                row.state = "void"
                row.save(only=[m.PendingChoice.state])
            deal = m.Deal.get_by_id(thread.deal_id)
            notes.append(_say(user, "elsewhere", subject=subject, id=deal.id,
                              title=deal.title))
            continue
        if m.ThreadUnlinked.select().where(m.ThreadUnlinked.thread == thread.id).exists():
            # A user took the thread off any deal by command: not asked again.
            if row.state in q.ACTIVE:
                row.state = "void"
                row.save(only=[m.PendingChoice.state])
            number = m.Email.select(m.Email.number).where(m.Email.id == row.email_id).scalar()
            notes.append(_say(user, "unlinked", subject=subject, handle=handle(number),
                              ask=company_address(config, company, "ask")))
            continue
        if row.state not in q.ACTIVE:
            notes.append(_say(user, "replaced", subject=subject))
            fresh_needed.append(row)
            continue
        if row.expires_at is not None and row.expires_at < nnow:
            notes.append(_say(user, "expired", subject=subject))
            fresh_needed.append(row)
            continue
        answer = answers.by_item.get(k)
        if answer is None:
            if answers.by_item:
                notes.append(_say(user, "missing", subject=subject))
            waiting.append(q.Item(k, row, cands[k]))
            continue
        if answer.kind == "none":
            q.apply_choice(row, None, actor, company_id, nnow, answer.text, qid)
            done.append(_handled(user, row, _say(user, "none", subject=subject)))
            continue
        if answer.kind == "deal" and answer.deal_id is not None:
            deal = m.Deal.get_or_none((m.Deal.id == answer.deal_id)
                                      & (m.Deal.company == company_id))
            if deal is None:
                notes.append(_say(user, "deleted", id=answer.deal_id, subject=subject))
                fresh_needed.append(row)
            elif deal.status != "open":
                notes.append(_say(user, "closed", id=deal.id, title=deal.title,
                                  status=deal.status, subject=subject))
                fresh_needed.append(row)
            else:
                q.apply_choice(row, deal.id, actor, company_id, nnow, answer.text, qid)
                done.append(_handled(user, row, _say(user, "linked", subject=subject,
                                                     id=deal.id, title=deal.title)))
            continue
        notes.append(_say(user, "unclear", subject=subject, why=answer.why,
                          text=answer.text, why_ja=_why_ja(answer, len(cands[k]))))
        waiting.append(q.Item(k, row, cands[k]))
    if answers.problems and waiting:
        notes.extend(_say(user, "problem", why=p) for p in answers.problems)

    log.info("[%s] choice token answered by %s: %d recorded, %d waiting, %d to ask again",
             qid, user.address, len(done), len(waiting), len(fresh_needed))
    if fresh_needed:
        # One Reply-To per email: what is still open is asked again under a new token.
        fresh, gone = q.refresh_rows(fresh_needed + [i.row for i in waiting], now)
        notes.extend(_say(user, "no_open", subject=_subject(r)) for r in gone)
        new_token, items = q.ask_again(config, fresh, now) if fresh else (None, [])
        _send(config, company, user, company_id, q.compose_question(
            config, company, user, items, new_token, now, notes=done + notes,
            kind="answer", in_reply_to=reply_id), now)
    elif waiting:
        # Explain what was understood and repeat the choices; the token stays valid.
        _send(config, company, user, company_id, q.compose_question(
            config, company, user, waiting, token, now, notes=done + notes,
            kind="answer", in_reply_to=reply_id), now)
    elif notes:
        _send(config, company, user, company_id, q.compose_question(
            config, company, user, [], None, now, notes=done + notes, kind="answer",
            in_reply_to=reply_id), now)
    elif done and user.confirm_choices:
        _send(config, company, user, company_id, q.compose_confirmation(
            config, company, user, done, now, in_reply_to=reply_id), now)

def _send(config: Config, company: Company, user: User, company_id: int, message: Any,
          now: datetime) -> None:
    kind = str(message.get(MARKER_HEADER, "answer"))
    enqueue(message, kind=kind, mail_from="", recipients=[user.address], now=now,
            company_id=company_id)


def _handled(user: User, row: m.PendingChoice, line: str) -> str:
    """A recorded choice's line with the email's handle in front (``E12 “Proposal” is now
    on deal...``), so the user can act on it by mail (``digest/commands.py``)."""
    number = (m.Email.select(m.Email.number).where(m.Email.id == row.email_id).scalar())
    if number is None:
        return line
    return f"{handle(number)}{'' if user.language == 'ja' else ' '}{line}"


def _subject(row: m.PendingChoice) -> str:
    email = m.Email.get_or_none(m.Email.id == row.email_id)
    return (email.subject if email is not None and email.subject else "(no subject)")[:120]


def _state_note(user: User, row: m.PendingChoice, subject: str) -> str:
    if row.answer_deal_id is None:
        return _say(user, "was_none", subject=subject)
    deal = m.Deal.get_or_none(m.Deal.id == row.answer_deal_id)
    title = deal.title if deal is not None else "?"
    return _say(user, "was_linked", subject=subject, id=row.answer_deal_id, title=title)


def token_owner(token: str, directory: Directory, company: Company) -> int | None:
    """The user a token was issued to, if it was issued for ``company``."""
    if not token:
        return None
    company_id = directory.company_ids.get(company.slug)
    row = (m.PendingChoice.select(m.PendingChoice.user)
           .join(m.User, on=(m.PendingChoice.user == m.User.id))
           .where(m.PendingChoice.token_hash.in_(q.token_hashes(token))
                  & (m.User.company == company_id)).first())
    return int(row.user_id) if row is not None else None
