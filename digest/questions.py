""""Which deal?" questions: tokens, batching, rate limit, rendering, and applying an answer.

When ``linking.record.record_email`` leaves a :class:`~crmstore.models.PendingChoice` (the
person has several open deals and the thread none), :func:`queue_question` runs in the same
transaction (Smart BCC's ``after_record`` hook) and puts the question in the outbox; nothing is
sent from the transaction itself (docs/architecture.md: everything leaves through the outbox).

Tokens. One question email has one ``Reply-To: <slug>+choice-<token>@<mail domain>``; the token
is ``secrets.token_urlsafe(24)`` (192 random bits) and is never stored: each pending choice of
the email stores ``<first 56 hex of sha256(token)>-<NNN>`` where NNN is its number in the email
(1..:data:`MAX_BATCH`), so the row of "email 2" is found from the token alone, and the outbox
item of a batch is found by the same digest (its ``dedupe_key``). The question's own bytes stay
in the outbox table, like every message dealmail sends.

Batching. A user's questions within ``policy.choice_batch_minutes`` become one email: the first
creates the outbox item with ``next_attempt_at = now + window``; the next ones, while that item
is still queued, unleased and never attempted, are added to it: the item is re-rendered with a
fresh token (nobody has seen the old one) listing every pending email with its own numbered
choices. At most ``policy.choice_questions_per_hour`` question emails per user per hour; the
pending choices over that stay ``pending`` and join the user's next question (or the digest).

Question emails use the null envelope sender (RFC 5321 §4.5.5): a bounce of a question must
never produce a DSN (RFC 3464 §2) nor reach anybody but the user.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment
from peewee import PostgresqlDatabase, fn

from crmstore import models as m
from crmstore.outbox import as_bytes, enqueue
from dealmail.addresses import format_mailbox
from dealmail.clock import naive_utc
from dealmail.config import Company, Config, User
from linking.answers import Candidate
from linking.record import Directory, RecordResult

from .compose import company_address, new_message, render, shared_environment

__all__ = [
    "MAX_BATCH",
    "Item",
    "after_record_hook",
    "apply_choice",
    "ask_again",
    "batch_rows",
    "compose_confirmation",
    "compose_question",
    "new_token",
    "queue_question",
    "queue_relink_questions",
    "refresh_question",
    "refresh_rows",
    "token_hashes",
]

MAX_BATCH = 20
ACTIVE = ("pending", "asked")
_DIGEST_LEN = 56


# --------------------------------------------------------------------------- tokens


def new_token() -> str:
    """A reply token: 192 random bits, URL-safe (fits the routing pattern of mta.routing)."""
    return secrets.token_urlsafe(24)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()[:_DIGEST_LEN]


def item_hash(digest: str, number: int) -> str:
    return f"{digest}-{number:03d}"


def token_hashes(token: str) -> list[str]:
    """The stored hashes a token may stand for (one per possible position in a batch)."""
    digest = token_digest(token)
    return [item_hash(digest, k) for k in range(1, MAX_BATCH + 1)]


def batch_rows(token: str) -> list[tuple[int, m.PendingChoice]]:
    """(number in the question, pending choice) of every row the token was issued for."""
    rows = list(m.PendingChoice.select().where(m.PendingChoice.token_hash.in_(
        token_hashes(token))))
    out = [(int(str(r.token_hash).rsplit("-", 1)[1]), r) for r in rows]
    return sorted(out, key=lambda pair: pair[0])


def _dedupe_key(user_id: int, token: str) -> str:
    return f"question:{user_id}:{token_digest(token)}"


# --------------------------------------------------------------------------- rendering


@dataclass
class Item:
    """One pending email as a question lists it."""

    number: int
    row: m.PendingChoice
    candidates: list[Candidate] = field(default_factory=list)


def candidates_of_rows(rows: Sequence[m.PendingChoice]) -> list[list[Candidate]]:
    """The deals each pending choice offers, with their titles (one query for all rows)."""
    ids = [[int(x) for x in json.loads(row.candidates_json)] for row in rows]
    wanted = sorted({i for one in ids for i in one})
    titles = {d.id: d.title for d in m.Deal.select(m.Deal.id, m.Deal.title)
              .where(m.Deal.id.in_(wanted or [0]))}
    return [[Candidate(i, titles.get(i, f"(deleted deal {i})")) for i in one] for one in ids]


def _local(when: datetime, tz: str) -> str:
    aware = when.replace(tzinfo=ZoneInfo("UTC")) if when.tzinfo is None else when
    return aware.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M")


def _money(value: Any, currency: str) -> str:
    if value is None:
        return "-"
    return f"{float(value):,.2f} {currency}".strip()


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, str):  # SQLite returns an aggregate of dates as text
        return datetime.fromisoformat(value)
    return value  # type: ignore[no-any-return]


def _last_activities(deals: Sequence[m.Deal], reader: m.User | None) -> dict[int, datetime]:
    """Per deal: the latest email date on it that ``reader`` may see, else the deal's update
    time (one query for all the deals)."""
    from crmstore.visibility import visible_to

    out = {int(d.id): d.updated_at for d in deals}
    if not deals:
        return out
    q = (m.Email.select(m.Thread.deal, fn.MAX(m.Email.date))
         .join(m.Thread, on=(m.Email.thread == m.Thread.id))
         .where(m.Thread.deal.in_(list(out)))
         .group_by(m.Thread.deal))
    if reader is not None:
        q = q.where(visible_to(reader))
    for deal_id, latest in q.tuples():
        when = _as_datetime(latest)
        if when is not None:
            out[int(deal_id)] = when
    return out


def _correspondent(row: m.PendingChoice, email: m.Email,
                   participants: Sequence[m.Participant]) -> str:
    chosen = next((p for p in participants if row.person_id and p.person_id == row.person_id),
                  None)
    chosen = chosen or next((p for p in participants if p.person_id), None)
    if chosen is None:
        return format_mailbox(email.from_name, email.from_address)
    return format_mailbox(chosen.name, chosen.address)


def _views(items: Sequence[Item], user: User, reader: m.User | None) -> list[dict[str, Any]]:
    """What the question shows of each item. The reads are made for the whole batch at once
    (emails, participants, deals, organizations, last activities: five queries), because a
    batch is drawn again each time a pending choice joins it, and reading per item made
    that quadratic in queries (8 per item and candidate: 80% of a mailbox sync's time when
    it met many customers with several open deals)."""
    email_ids = [int(i.row.email_id) for i in items]
    emails = {e.id: e for e in m.Email.select().where(m.Email.id.in_(email_ids or [0]))}
    participants: dict[int, list[m.Participant]] = {}
    for p in (m.Participant.select().where(m.Participant.email.in_(email_ids or [0]))
              .order_by(m.Participant.id)):
        participants.setdefault(int(p.email_id), []).append(p)
    deal_ids = sorted({c.deal_id for i in items for c in i.candidates})
    deals = {d.id: d for d in m.Deal.select().where(m.Deal.id.in_(deal_ids or [0]))}
    org_ids = sorted({int(d.organization_id) for d in deals.values()
                      if d.organization_id is not None})
    orgs = {o.id: o for o in m.Organization.select(m.Organization.id, m.Organization.name)
            .where(m.Organization.id.in_(org_ids or [0]))}
    latest = _last_activities(list(deals.values()), reader)
    views = []
    for item in items:
        email = emails[int(item.row.email_id)]
        choices = []
        for n, cand in enumerate(item.candidates, start=1):
            deal = deals.get(cand.deal_id)
            if deal is None:
                choices.append({"n": n, "id": cand.deal_id, "title": cand.title,
                                "organization": "-", "stage": "-", "value": "-",
                                "last_activity": "-", "status": "deleted"})
                continue
            org = orgs.get(deal.organization_id) if deal.organization_id else None
            choices.append({
                "n": n, "id": deal.id, "title": deal.title,
                "organization": org.name if org else "-", "stage": deal.stage or "-",
                "value": _money(deal.value, deal.currency),
                "last_activity": _local(latest[deal.id], user.timezone)[:10],
                "status": deal.status,
            })
        views.append({"number": item.number, "subject": email.subject or "(no subject)",
                      "date": _local(email.date, user.timezone), "timezone": user.timezone,
                      "correspondent": _correspondent(item.row, email,
                                                      participants.get(email.id, [])),
                      "choices": choices})
    return views


def _template(user: User, name: str, ext: str) -> str:
    return f"{name}_ja.{ext}" if user.language == "ja" else f"{name}.{ext}"


def compose_question(
    config: Config, company: Company, user: User, items: Sequence[Item], token: str | None,
    now: datetime, *, notes: Sequence[str] = (), kind: str = "question",
    in_reply_to: str | None = None, env: Environment | None = None,
) -> EmailMessage:
    """The question (or an explanation repeating it) as a text + HTML message to the user's
    primary address. ``token`` None: notes only (a state report, nothing left to answer)."""
    env = env or shared_environment()
    reader = m.User.get_or_none(m.User.address == user.address)
    views = _views(items, user, reader)
    reply_to = company_address(config, company, f"choice-{token}") if token else None
    ctx = {"items": views, "notes": list(notes), "multi": len(views) > 1,
           "reply_to": reply_to, "days": config.policy.choice_token_days, "company": company.name,
           "user": user.name or user.address}
    text = render(env, _template(user, "question", "txt"), **ctx)
    html = render(env, _template(user, "question", "html"), **ctx)
    ja = user.language == "ja"
    if not views:
        subject = "案件の選択について" if ja else "About your deal choice"
    elif len(views) == 1:
        subject = (f"どの案件ですか？ {views[0]['subject']}" if ja
                   else f"Which deal? {views[0]['subject']}")
    else:
        subject = (f"どの案件ですか？ メール{len(views)}件" if ja
                   else f"Which deals? {len(views)} emails")
    if kind != "question" and views:
        subject = ("Re: " + subject)
    return new_message(config, company, to=user.address, subject=subject, text=text,
                       html=html, kind=kind, now=now, reply_to=reply_to,
                       in_reply_to=in_reply_to)


def compose_confirmation(config: Config, company: Company, user: User, lines: Sequence[str],
                         now: datetime, in_reply_to: str | None = None,
                         env: Environment | None = None) -> EmailMessage:
    """The one-line confirmation of recorded choices (one line per email)."""
    env = env or shared_environment()
    text = render(env, _template(user, "confirm", "txt"), lines=list(lines))
    subject = "案件を記録しました" if user.language == "ja" else "Deal choice recorded"
    return new_message(config, company, to=user.address, subject=subject, text=text,
                       kind="confirm", now=now, in_reply_to=in_reply_to)


# --------------------------------------------------------------------------- asking


def _usable(row: m.PendingChoice) -> bool:
    """Still worth asking: the thread has no deal yet, and no user unlinked it on purpose
    (``unlink E12``: its emails stay without a deal until one is named)."""
    thread = m.Thread.get_or_none(m.Thread.id == row.thread_id)
    return (thread is not None and thread.deal_id is None
            and not m.ThreadUnlinked.select().where(
                m.ThreadUnlinked.thread == thread.id).exists())


def _said_none(row: m.PendingChoice) -> bool:
    """The user already answered "no deal" for this thread: do not ask again."""
    return (m.PendingChoice.select(m.PendingChoice.id)
            .where((m.PendingChoice.thread == row.thread_id)
                   & (m.PendingChoice.user == row.user_id)
                   & (m.PendingChoice.state == "answered")
                   & m.PendingChoice.answer_deal.is_null()).exists())


def _void(row: m.PendingChoice) -> None:
    row.state = "void"
    row.save(only=[m.PendingChoice.state])


def _open_batch(user_id: int, company_id: int, now: datetime,
                window: timedelta) -> m.OutboxItem | None:
    if window <= timedelta(0):
        return None
    q = (m.OutboxItem.select()
         .where((m.OutboxItem.kind == "question") & (m.OutboxItem.company == company_id)
                & (m.OutboxItem.state == "queued") & (m.OutboxItem.attempts == 0)
                & m.OutboxItem.lease_until.is_null()
                & (m.OutboxItem.created_at > now - window) & (m.OutboxItem.next_attempt_at > now)
                & m.OutboxItem.dedupe_key.startswith(f"question:{user_id}:"))
         .order_by(m.OutboxItem.id.desc()))
    if isinstance(m.OutboxItem._meta.database, PostgresqlDatabase):
        q = q.for_update()  # the worker claims with SKIP LOCKED; we wait for it instead
    return q.first()


def _questions_last_hour(user_id: int, company_id: int, now: datetime) -> int:
    return int(m.OutboxItem.select()
               .where((m.OutboxItem.kind == "question") & (m.OutboxItem.company == company_id)
                      & (m.OutboxItem.created_at > now - timedelta(hours=1))
                      & m.OutboxItem.dedupe_key.startswith(f"question:{user_id}:"))
               .count())


def _assign(rows: Sequence[m.PendingChoice], token: str, now: datetime,
            days: int) -> list[Item]:
    digest = token_digest(token)
    items = []
    offered = candidates_of_rows(rows)
    for number, row in enumerate(rows, start=1):
        row.token_hash = item_hash(digest, number)
        row.state = "asked"
        row.asked_at = now
        row.expires_at = now + timedelta(days=days)
        row.save(only=[m.PendingChoice.token_hash, m.PendingChoice.state,
                       m.PendingChoice.asked_at, m.PendingChoice.expires_at])
        items.append(Item(number, row, offered[number - 1]))
    return items


def queue_question(config: Config, directory: Directory, user: User, company: Company,
                   now: datetime, pending_id: int | None = None) -> int | None:
    """Put the user's pending choices in a question email (new or the open batch). Must run
    inside the transaction that created the pending choice. Returns the outbox item id, or
    None when nothing was queued (already asked, rate limit reached)."""
    now = naive_utc(now)
    user_id = directory.user_ids[user.address]
    company_id = directory.company_ids[company.slug]
    if pending_id is not None:
        row = m.PendingChoice.get_or_none(m.PendingChoice.id == pending_id)
        if row is None or row.state != "pending":
            return None  # this thread's question is already out
        if _said_none(row) or not _usable(row):
            _void(row)
            return None
    window = timedelta(minutes=config.policy.choice_batch_minutes)
    item = _open_batch(user_id, company_id, now, window)
    members: list[m.PendingChoice] = []
    if item is not None:
        old = str(item.dedupe_key).split(":", 2)[2].split("#", 1)[0]
        members = [r for r in m.PendingChoice.select().where(
            m.PendingChoice.token_hash.in_([item_hash(old, k) for k in range(1, MAX_BATCH + 1)])
            & m.PendingChoice.state.in_(ACTIVE)).order_by(m.PendingChoice.token_hash)]
    elif _questions_last_hour(user_id, company_id, now) >= config.policy.choice_questions_per_hour:
        return None  # stays pending: the next question or the digest lists it
    if item is not None and len(members) >= MAX_BATCH:
        return int(item.id)  # the open batch is full: nothing can join it
    # Read lazily: only as many waiting rows as can join (a mailbox's first sync can leave
    # thousands pending, and reading them all for every new one was quadratic).
    waiting = (m.PendingChoice.select().where(
        (m.PendingChoice.user == user_id) & (m.PendingChoice.state == "pending"))
        .order_by(m.PendingChoice.id).iterator())
    joined = 0
    for r in waiting:
        if len(members) >= MAX_BATCH:
            break
        if _said_none(r) or not _usable(r):
            _void(r)
            continue
        members.append(r)
        joined += 1
    if not members:
        return None
    if item is not None and not joined:
        # The open batch is full and nothing joins it: it is queued as it is (composing it
        # again cost ~0.5 s per message when a mailbox sync met many multi-deal customers).
        return int(item.id)
    token = new_token()
    items = _assign(members, token, now, config.policy.choice_token_days)
    message = compose_question(config, company, user, items, token, now)
    if item is not None:
        domain = str(item.dedupe_key).rsplit("#", 1)[1]
        updated = (m.OutboxItem.update(
            message=as_bytes(message), subject=str(message["Subject"])[:500],
            dedupe_key=f"{_dedupe_key(user_id, token)}#{domain}")
            .where((m.OutboxItem.id == item.id) & (m.OutboxItem.state == "queued")
                   & m.OutboxItem.lease_until.is_null()).execute())
        if updated:
            return int(item.id)
    ids = enqueue(message, kind="question", mail_from="", recipients=[user.address], now=now,
                  company_id=company_id, dedupe_key=_dedupe_key(user_id, token))
    # Held back for the batch window so that the next questions join this email.
    (m.OutboxItem.update(next_attempt_at=now + window)
     .where(m.OutboxItem.id.in_(ids)).execute())
    return ids[0] if ids else None


def refresh_question(config: Config, item: m.OutboxItem, now: datetime,
                     force: bool = False) -> bytes | None:
    """Check a queued question email again just before it is sent (inside a transaction).

    While the question waited for its batch window, its threads may have been decided another
    way (a ``+deal`` follow-up, a colleague's answer, the question answered already). Those
    entries are dropped; when none is left the email is not sent (None); when some were
    dropped, it is drawn again with the rest under a fresh token (nobody has seen the queued
    one); otherwise the queued bytes go out unchanged."""
    key = str(item.dedupe_key or "")
    if not key.startswith("question:"):
        return bytes(item.message)
    digest = key.split(":", 2)[2].split("#", 1)[0]
    rows = list(m.PendingChoice.select().where(m.PendingChoice.token_hash.in_(
        [item_hash(digest, k) for k in range(1, MAX_BATCH + 1)]))
        .order_by(m.PendingChoice.token_hash))
    live = [r for r in rows if r.state in ACTIVE and _usable(r) and not _said_none(r)]
    if len(live) == len(rows) and rows and not force:
        return bytes(item.message)
    for row in rows:
        if row not in live and row.state in ACTIVE:
            _void(row)
    if not live:
        return None
    reader = m.User.get_by_id(live[0].user_id)
    found = config.find_user(reader.address)
    if found is None:  # the user left the config meanwhile: nobody to ask
        return None
    company, user = found
    now = naive_utc(now)
    token = new_token()
    items = _assign(live, token, now, config.policy.choice_token_days)
    message = compose_question(config, company, user, items, token, now)
    raw = as_bytes(message)
    domain = key.rsplit("#", 1)[1] if "#" in key else ""
    (m.OutboxItem.update(message=raw, subject=str(message["Subject"])[:500],
                         dedupe_key=f"{_dedupe_key(reader.id, token)}#{domain}")
     .where(m.OutboxItem.id == item.id).execute())
    return raw


def redraw_questions(config: Config, batches: Sequence[str], now: datetime) -> None:
    """Question emails still waiting in the outbox that asked about emails now forgotten
    (``forget E12``; their pending choices are deleted): drawn again with what is left, or,
    when nothing is, dropped with their bytes (never sent, and the forgotten email's subject
    is not kept in them). Runs in the forgetting transaction; an email already sent stays as
    it was delivered."""
    for digest in batches:
        for item in (m.OutboxItem.select()
                     .where((m.OutboxItem.kind == "question") & (m.OutboxItem.state == "queued")
                            & (m.OutboxItem.attempts == 0) & m.OutboxItem.lease_until.is_null()
                            & m.OutboxItem.dedupe_key.contains(f":{digest}#"))):
            if refresh_question(config, item, now, force=True) is None:
                (m.OutboxItem.update(state="dropped", message=b"", subject="",
                                     last_error="its emails were forgotten")
                 .where(m.OutboxItem.id == item.id).execute())


def queue_relink_questions(config: Config, directory: Directory, company: Company,
                           questions: Sequence[tuple[str, int]], now: datetime) -> None:
    """Ask about emails that re-linking left with several open deals: one question (batched
    like any other) per user, listing their pending choices."""
    asked: set[str] = set()
    for address, pending_id in questions:
        user = company.user(address)
        if user is None or address in asked:
            continue
        asked.add(address)
        queue_question(config, directory, user, company, now, pending_id)


def after_record_hook(config_of: Callable[[], Config], directory_of: Callable[[], Directory],
                      now: Callable[[], datetime]) -> Callable[[RecordResult, User, Company],
                                                               None]:
    """Smart BCC's ``after_record``: ask when the recorded email needs a deal choice."""

    def hook(result: RecordResult, user: User, company: Company) -> None:
        if result.needs_choice and result.pending_choice_id is not None:
            queue_question(config_of(), directory_of(), user, company, now(),
                           result.pending_choice_id)
        queue_relink_questions(config_of(), directory_of(), company,
                               result.relink_questions, now())

    return hook


# --------------------------------------------------------------------------- answering


def refresh_rows(rows: Sequence[m.PendingChoice],
                 now: datetime) -> tuple[list[m.PendingChoice], list[m.PendingChoice]]:
    """Void ``rows`` and make fresh pending choices for those whose thread is still undecided,
    with the choices recomputed from the person's open deals (a deal closed meanwhile is
    dropped). Returns (fresh rows, rows whose customer has no open deal left)."""
    now = naive_utc(now)
    fresh: list[m.PendingChoice] = []
    gone: list[m.PendingChoice] = []
    seen: set[int] = set()
    for row in rows:
        if row.state in ACTIVE:
            _void(row)
        if row.thread_id in seen or not _usable(row) or _said_none(row):
            continue
        seen.add(row.thread_id)
        (m.PendingChoice.update(state="void")
         .where((m.PendingChoice.thread == row.thread_id)
                & (m.PendingChoice.user == row.user_id)
                & m.PendingChoice.state.in_(ACTIVE)).execute())
        old = [int(x) for x in json.loads(row.candidates_json)]
        where = (m.Deal.person == row.person_id) if row.person_id else m.Deal.id.in_(old or [0])
        deals = [d.id for d in m.Deal.select(m.Deal.id)
                 .where(where & (m.Deal.status == "open")).order_by(m.Deal.id)]
        if not deals:
            gone.append(row)
            continue
        fresh.append(m.PendingChoice.create(
            user=row.user_id, email=row.email_id, thread=row.thread_id, person=row.person_id,
            candidates_json=json.dumps(deals), state="pending", created_at=now))
    return fresh, gone


def ask_again(config: Config, rows: Sequence[m.PendingChoice],
              now: datetime) -> tuple[str, list[Item]]:
    """A new token for ``rows`` (fresh pending choices), numbered 1..n."""
    token = new_token()
    return token, _assign(list(rows)[:MAX_BATCH], token, naive_utc(now),
                          config.policy.choice_token_days)


def apply_choice(row: m.PendingChoice, deal_id: int | None, actor: str, company_id: int,
                 now: datetime, answer_text: str, queue_id: str) -> None:
    """Record a valid answer: thread and its emails linked to the deal (``source="choice"``),
    the choice answered, the audit entry written. ``deal_id`` None: "no deal"."""
    now = naive_utc(now)
    if deal_id is not None:
        thread = m.Thread.get_by_id(row.thread_id)
        thread.deal = deal_id
        thread.save(only=[m.Thread.deal])
        if not m.Link.select().where((m.Link.thread == thread.id)
                                     & (m.Link.deal == deal_id)).exists():
            m.Link.create(thread=thread.id, deal=deal_id, source="choice", created_at=now)
        linked = {lk.email_id for lk in m.Link.select(m.Link.email).where(
            m.Link.deal.is_null(False) & m.Link.email.is_null(False)
            & m.Link.email.in_(m.Email.select(m.Email.id).where(m.Email.thread == thread.id)))}
        rows = [{"email": e.id, "deal": deal_id, "source": "choice", "created_at": now}
                for e in m.Email.select(m.Email.id).where(m.Email.thread == thread.id)
                if e.id not in linked]
        if rows:
            m.Link.insert_many(rows).execute()
        # Colleagues asked about the same thread have nothing left to decide.
        (m.PendingChoice.update(state="void")
         .where((m.PendingChoice.thread == thread.id) & (m.PendingChoice.id != row.id)
                & m.PendingChoice.state.in_(ACTIVE)).execute())
    row.state = "answered"
    row.answered_at = now
    row.answer_deal = deal_id
    row.save(only=[m.PendingChoice.state, m.PendingChoice.answered_at,
                   m.PendingChoice.answer_deal])
    m.AuditEntry.create(
        at=now, company=company_id, actor=actor, action="deal_choice", email=row.email_id,
        detail_json=json.dumps({"pending_choice": row.id, "thread": row.thread_id,
                                "deal": deal_id, "answer": answer_text[:200],
                                "queue_id": queue_id}, ensure_ascii=False))
