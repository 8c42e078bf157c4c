"""A user's digest: what happened since their last one, composed as an email.

The digest is the email form of a hosted CRM's personal inbox (docs/architecture.md, rule 3).
It lists, for the period since the user's last digest:

* tracked emails the user may see — their own copies, and colleagues' shared copies on deals the
  user owns — grouped by deal and then by person (subject, correspondent, date, channel, link
  status);
* emails linked to no person, with the reason (unknown correspondent, internal only);
* deal questions still waiting for an answer (``PendingChoice`` rows), with their candidates and
  how to answer;
* messages refused or quarantined because they claimed to be from this user (quarantined
  sightings; ``replay`` audit entries). Quarantined mail is listed, never shown: no subject;
* persons created automatically from mail the user may see;
* the user's mailboxes that the IMAP sync (``mta/imapsync``) cannot read, once: in the digest
  whose period holds the moment the trouble began, not in every digest after it.

Every email passes through :func:`crmstore.visibility.visible_to` — the one privacy rule, with
no exception for admins. Message text is only ever template *data* (``digest.compose``
autoescapes HTML and never compiles message text). An empty digest is not sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment

from crmstore import models as m
from crmstore.handles import handle
from crmstore.outbox import enqueue
from crmstore.visibility import can_see, visible_to
from dealmail.addresses import domain_of
from dealmail.clock import naive_utc
from dealmail.config import Company, Config, User

from .actions import add_actions
from .compose import company_address, new_message, shared_environment

# Labels of the digest and answer emails per language (templates are shared between
# languages so the two can never drift apart in structure).
LABELS: dict[str, dict[str, str]] = {
    "en": {
        "digest_subject": "Your dealmail digest: {count} email(s) since {since}",
        "digest_title": "Your dealmail digest",
        "period": "From {since} to {until} ({tz})",
        "by_deal": "Emails by deal",
        "no_deal": "Emails on persons without a deal",
        "no_person": "Emails linked to no person",
        "pending": "Questions waiting for your answer",
        "refused": "Messages claiming to be from you that failed verification",
        "auto_persons": "Persons created automatically",
        "deal": "Deal",
        "person": "Person",
        "unknown_person": "(no person)",
        "status_deal": "on deal #{id} {title}",
        "status_choice": "needs a deal choice",
        "status_none": "no deal",
        "reason_unknown": "unknown correspondent",
        "reason_internal": "internal only",
        "reason_unattributed": "could not tell who wrote the forwarded email (shown only as "
                               "“{name}”): reply “person {handle} their@address”",
        "channel": "via",
        "from": "from",
        "to": "to",
        "candidates": "Candidates",
        "pending_how": "Reply to the \"which deal?\" question email with the number of the deal "
                       "(0 for no deal). Mail you BCC to a deal's address below is linked to "
                       "that deal, and so is the rest of its thread.",
        "pending_waiting": "question not sent yet",
        "pending_asked": "question sent {when}",
        "quarantined": "quarantined",
        "replayed": "replayed copy refused",
        "received": "received",
        "client": "client",
        "envelope": "envelope sender",
        "level": "verification",
        "refused_how": "If this was not you, tell your admin; nobody can see these messages.",
        "mailboxes": "Mailboxes dealmail cannot sync",
        "mailbox_line": "{account}: failing since {since}: {error}",
        "mailboxes_how": "dealmail keeps trying. Check the password (or app password) of the "
                         "mailbox, or ask your admin.",
        "release_how": "If a quarantined one was yours, release it: send its line (e.g. "
                       "\"{example}\") to {ask}.",
        "footer": "Sent by dealmail. Ask for any deal's history: mail {ask} with \"deal ID\" "
                  "or \"help\".",
        "commands": "Change your emails: reply to this email (or mail {ask}) with one command "
                    "per line, e.g. \"private E12\", \"private thread E12\", \"deal E12 "
                    "Pilot\", \"unlink E12\", \"person E12 ann@customer.test\", \"forget "
                    "E12\", \"ignore @customer.test\".",
        "actions": "Commands",
    },
    "ja": {
        "digest_subject": "dealmail ダイジェスト: {since} 以降のメール {count} 件",
        "digest_title": "dealmail ダイジェスト",
        "period": "{since} から {until} まで ({tz})",
        "by_deal": "案件ごとのメール",
        "no_deal": "案件のない人物のメール",
        "no_person": "人物に紐付いていないメール",
        "pending": "回答待ちの質問",
        "refused": "あなたを名乗り検証に失敗したメッセージ",
        "auto_persons": "自動作成された人物",
        "deal": "案件",
        "person": "人物",
        "unknown_person": "(人物なし)",
        "status_deal": "案件 #{id} {title}",
        "status_choice": "案件の選択待ち",
        "status_none": "案件なし",
        "reason_unknown": "不明な相手",
        "reason_internal": "社内のみ",
        "reason_unattributed": "転送されたメールの差出人を特定できませんでした（表示名「{name}」"
                               "のみ）。「person {handle} 差出人のアドレス」と返信してください",
        "channel": "経路",
        "from": "差出人",
        "to": "宛先",
        "candidates": "候補",
        "pending_how": "「どの案件？」の質問メールに案件の番号で返信してください (案件なしは 0)。"
                       "下記の案件アドレスに BCC したメールはその案件に紐付き、"
                       "スレッドの残りも同じ案件になります。",
        "pending_waiting": "質問は未送信",
        "pending_asked": "質問送信 {when}",
        "quarantined": "隔離",
        "replayed": "再送されたコピーを拒否",
        "received": "受信",
        "client": "クライアント",
        "envelope": "エンベロープ送信者",
        "level": "検証",
        "refused_how": "心当たりがない場合は管理者に連絡してください。",
        "release_how": "隔離されたメールがご自身のものなら、その行 (例: \"{example}\") を "
                       "{ask} 宛てに送ると解除されます。"
                       "これらのメッセージは誰も閲覧できません。",
        "mailboxes": "同期できないメールボックス",
        "mailbox_line": "{account}: {since} から失敗: {error}",
        "mailboxes_how": "dealmail は再試行を続けます。メールボックスのパスワード"
                         "(アプリ パスワード) を確認するか、管理者に連絡してください。",
        "footer": "dealmail より送信。案件の履歴は {ask} に「案件 ID」または「help」と"
                  "送ってください。",
        "commands": "メールの変更: このメールに返信 (または {ask} に送信) し、1行に1つずつ"
                    "コマンドを書いてください。例:「非公開 E12」「非公開 スレッド E12」"
                    "「案件 E12 Pilot」「紐付け解除 E12」「人物 E12 ann@customer.test」"
                    "「削除 E12」「無視 @customer.test」。",
        "actions": "コマンド",
    },
}


def labels(language: str) -> dict[str, str]:
    return LABELS.get(language, LABELS["en"])


def local_time(when: datetime | None, tz: str) -> str:
    """A stored (naive UTC) timestamp as the user reads it: ``YYYY-MM-DD HH:MM`` in their zone."""
    if when is None:
        return "-"
    aware = when.replace(tzinfo=UTC) if when.tzinfo is None else when
    return aware.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M")


@dataclass
class Digest:
    """One user's composed digest (data only; :func:`render_digest` makes the text)."""

    user: User
    company: Company
    user_row: m.User
    since: datetime
    until: datetime
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def email_count(self) -> int:
        return int(self.context["email_count"])

    @property
    def empty(self) -> bool:
        c = self.context
        return not (c["email_count"] or c["pending"] or c["refused"] or c["auto_persons"]
                    or c.get("mailboxes"))


# --------------------------------------------------------------------------- helpers


def internal_checker(config: Config, company: Company) -> Any:
    """Whether an address is the company's own (a user, an internal domain, dealmail)."""
    domains = frozenset(company.internal_domains)
    addrs = frozenset(a for u in company.users for a in u.addresses)

    def is_internal(address: str) -> bool:
        d = domain_of(address)
        return address in addrs or d in domains or d == config.mail_domain

    return is_internal


def find_user_config(config: Config, address: str) -> tuple[Company, User]:
    found = config.find_user(address.strip().lower())
    if found is None or found[1].address != address.strip().lower():
        raise LookupError(f"unknown user {address!r} (give the user's primary address)")
    return found


def last_digest_until(user_address: str) -> datetime | None:
    """End of the period of the last digest queued for this user (audit entry ``digest``)."""
    row = (m.AuditEntry.select()
           .where((m.AuditEntry.action == "digest") & (m.AuditEntry.actor == user_address))
           .order_by(m.AuditEntry.at.desc(), m.AuditEntry.id.desc()).first())
    if row is None:
        return None
    until = json.loads(row.detail_json).get("until")
    return datetime.fromisoformat(until) if until else None


def _deal_ids_of(email_ids: list[int]) -> dict[int, int]:
    """email id -> deal id, from a direct link, else from the email's thread."""
    out: dict[int, int] = {}
    if not email_ids:
        return out
    for email_id, deal_id in (m.Email.select(m.Email.id, m.Thread.deal)
                              .join(m.Thread, on=(m.Email.thread == m.Thread.id))
                              .where(m.Email.id.in_(email_ids) & m.Thread.deal.is_null(False))
                              .tuples()):
        out[email_id] = deal_id
    for lk in (m.Link.select(m.Link.email, m.Link.deal)
               .where(m.Link.email.in_(email_ids) & m.Link.deal.is_null(False))
               .order_by(m.Link.id)):
        out[lk.email_id] = lk.deal_id  # a direct link wins over the thread's deal
    return out


def describe_emails(user_row: m.User, rows: list[m.Email], is_internal: Any,
                    tz: str) -> list[dict[str, Any]]:
    """Template rows for emails the caller has already filtered with ``visible_to``."""
    ids = [r.id for r in rows]
    if not ids:
        return []
    parts: dict[int, list[m.Participant]] = {}
    for p in (m.Participant.select().where(m.Participant.email.in_(ids))
              .order_by(m.Participant.id)):
        parts.setdefault(p.email_id, []).append(p)
    person_ids = {p.person_id for ps in parts.values() for p in ps if p.person_id}
    for lk in m.Link.select(m.Link.email, m.Link.person).where(
            m.Link.email.in_(ids) & m.Link.person.is_null(False)):
        person_ids.add(lk.person_id)
    persons = {p.id: p for p in m.Person.select().where(m.Person.id.in_(list(person_ids)))} \
        if person_ids else {}
    linked_person: dict[int, int] = {}
    for lk in m.Link.select(m.Link.email, m.Link.person).where(
            m.Link.email.in_(ids) & m.Link.person.is_null(False)).order_by(m.Link.id):
        linked_person.setdefault(lk.email_id, lk.person_id)
    deal_of = _deal_ids_of(ids)
    deals = {d.id: d for d in m.Deal.select().where(m.Deal.id.in_(list(set(deal_of.values()))))} \
        if deal_of else {}
    thread_ids = list({r.thread_id for r in rows})
    pending_threads = {p.thread_id for p in m.PendingChoice.select(m.PendingChoice.thread).where(
        m.PendingChoice.thread.in_(thread_ids)
        & m.PendingChoice.state.in_(["pending", "asked"]))}
    sightings: dict[int, list[m.Sighting]] = {}
    for s in m.Sighting.select().where(m.Sighting.email.in_(ids)).order_by(m.Sighting.id):
        sightings.setdefault(s.email_id, []).append(s)
    out = []
    for r in rows:
        ps = parts.get(r.id, [])
        external = [p for p in ps if not is_internal(p.address)]
        with_person = [p for p in ps if p.person_id]
        pool = with_person or external or ps
        who = pool[0] if pool else None
        correspondent = ({"address": who.address, "name": who.name} if who is not None
                         else {"address": r.from_address, "name": r.from_name})
        pid = (with_person[0].person_id if with_person else linked_person.get(r.id))
        mine = [s for s in sightings.get(r.id, []) if s.user_id == user_row.id
                and s.visibility != "quarantined"]
        shown = mine[0] if mine else next(
            (s for s in sightings.get(r.id, []) if s.visibility == "shared"), None)
        deal = deals.get(deal_of[r.id]) if r.id in deal_of else None
        if deal is not None:
            status = "deal"
        elif r.thread_id in pending_threads:
            status = "choice"
        else:
            status = "none"
        out.append({
            "id": r.id,
            "handle": handle(r.number),
            "mine": bool(mine),
            "visibility": mine[0].visibility if mine else None,
            "subject": r.subject,
            "date": local_time(r.date, tz),
            "sort_date": r.date,
            "from": {"address": r.from_address, "name": r.from_name},
            "correspondent": correspondent,
            "participants": [{"address": p.address, "name": p.name, "role": p.role}
                             for p in ps],
            "channel": shown.channel if shown else "",
            "status": status,
            "deal": {"id": deal.id, "title": deal.title} if deal else None,
            "person": ({"id": pid, "name": persons[pid].name} if pid in persons else None),
            "reason": ("" if pid is not None
                       else "unattributed" if _unattributed(r)
                       else "unknown" if external else "internal"),
            "unattributed": _unattributed(r),
            "snippet_lines": [ln for ln in (r.snippet or "").splitlines() if ln.strip()][:3],
            "thread_id": r.thread_id,
        })
    return out


def _unattributed(email: m.Email) -> str:
    """The display name of a forwarded email's sender that matched no person (Outlook shows
    only a name for address-book contacts), else ""."""
    if not email.forward_json:
        return ""
    try:
        return str(json.loads(email.forward_json).get("unattributed") or "")
    except (ValueError, AttributeError):
        return ""


def _group(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                list[dict[str, Any]]]:
    """(by deal then person, by person without deal, without person)."""
    deals: dict[int, dict[str, Any]] = {}
    no_deal: dict[int, dict[str, Any]] = {}
    no_person: list[dict[str, Any]] = []
    for it in sorted(items, key=lambda x: (x["sort_date"], x["id"])):
        person = it["person"]
        if it["deal"] is not None:
            d = deals.setdefault(it["deal"]["id"], {**it["deal"], "persons": {}})
            key = person["id"] if person else 0
            g = d["persons"].setdefault(key, {"person": person, "emails": []})
            g["emails"].append(it)
        elif person is not None:
            g = no_deal.setdefault(person["id"], {"person": person, "emails": []})
            g["emails"].append(it)
        else:
            no_person.append(it)
    by_deal = []
    for d in sorted(deals.values(), key=lambda d: (d["title"].casefold(), d["id"])):
        groups = sorted(d["persons"].values(),
                        key=lambda g: (g["person"] is None,
                                       (g["person"] or {}).get("name", "").casefold()))
        by_deal.append({"id": d["id"], "title": d["title"], "persons": groups})
    by_person = sorted(no_deal.values(), key=lambda g: (g["person"]["name"].casefold(),
                                                        g["person"]["id"]))
    return by_deal, by_person, no_person


# --------------------------------------------------------------------------- composing


def compose_digest(config: Config, user_address: str, since: datetime, until: datetime,
                   now: datetime) -> Digest:
    """Collect the digest of ``user_address`` for ``[since, until)`` (reads only)."""
    company, user = find_user_config(config, user_address)
    user_row = m.User.get(m.User.address == user.address)
    lo, hi = naive_utc(since), naive_utc(until)
    tz = user.timezone
    is_internal = internal_checker(config, company)

    # Emails of the period: the user's own copies, and shared copies on deals the user owns.
    own = (m.Sighting.select(m.Sighting.email)
           .where((m.Sighting.user == user_row.id) & (m.Sighting.visibility != "quarantined")
                  & (m.Sighting.received_at >= lo) & (m.Sighting.received_at < hi)))
    owned_deals = m.Deal.select(m.Deal.id).where(m.Deal.owner == user_row.id)
    on_owned = (m.Link.select(m.Link.email).where(m.Link.deal.in_(owned_deals)
                                                  & m.Link.email.is_null(False))
                | m.Email.select(m.Email.id).join(m.Thread, on=(m.Email.thread == m.Thread.id))
                .where(m.Thread.deal.in_(owned_deals)))
    recent = (m.Sighting.select(m.Sighting.email)
              .where((m.Sighting.received_at >= lo) & (m.Sighting.received_at < hi)
                     & (m.Sighting.visibility == "shared") & m.Sighting.email.in_(on_owned)))
    rows = list(m.Email.select()
                .where((m.Email.id.in_(own) | m.Email.id.in_(recent)) & visible_to(user_row))
                .order_by(m.Email.date, m.Email.id))
    items = describe_emails(user_row, rows, is_internal, tz)
    add_actions(items, company_address(config, company, "ask"), user.language)
    by_deal, by_person, no_person = _group(items)

    # Questions still waiting (whatever their age), about emails the user may see.
    pending = []
    now_n = naive_utc(now)
    q = (m.PendingChoice.select()
         .where((m.PendingChoice.user == user_row.id)
                & m.PendingChoice.state.in_(["pending", "asked"])
                & (m.PendingChoice.expires_at.is_null() | (m.PendingChoice.expires_at > now_n)))
         .order_by(m.PendingChoice.created_at, m.PendingChoice.id))
    for pc in q:
        if not can_see(user_row, pc.email_id):
            continue
        email = m.Email.get_by_id(pc.email_id)
        cand_ids = [int(x) for x in json.loads(pc.candidates_json)]
        titles = {d.id: d for d in m.Deal.select().where(m.Deal.id.in_(cand_ids))} \
            if cand_ids else {}
        person = m.Person.get_or_none(m.Person.id == pc.person_id) if pc.person_id else None
        pending.append({
            "id": pc.id,
            "subject": email.subject,
            "handle": handle(email.number),
            "date": local_time(email.date, tz),
            "person": person.name if person else "",
            "state": pc.state,
            "asked": local_time(pc.asked_at, tz) if pc.asked_at else "",
            "candidates": [{"n": i, "id": d, "title": titles[d].title,
                            "address": company_address(config, company, f"deal{d}")}
                           for i, d in enumerate(cand_ids, start=1) if d in titles],
        })

    # Messages that claimed to be from this user: quarantined copies (listed, never shown)
    # and refused replays of an already stored message (docs/reliability.md 0.7).
    refused = []
    for s in (m.Sighting.select()
              .where((m.Sighting.user == user_row.id) & (m.Sighting.visibility == "quarantined")
                     & (m.Sighting.received_at >= lo) & (m.Sighting.received_at < hi))
              .order_by(m.Sighting.received_at, m.Sighting.id)):
        refused.append({"kind": "quarantined", "received": local_time(s.received_at, tz),
                        "client_ip": s.client_ip, "envelope_from": s.envelope_from,
                        "level": s.verification, "subject": None,
                        "release": f"release {handle(s.email.number)}"})
    for a in (m.AuditEntry.select()
              .where((m.AuditEntry.action == "replay") & (m.AuditEntry.actor == user.address)
                     & (m.AuditEntry.at >= lo) & (m.AuditEntry.at < hi))
              .order_by(m.AuditEntry.at, m.AuditEntry.id)):
        detail = json.loads(a.detail_json or "{}")
        subject = None
        if a.email_id is not None and can_see(user_row, a.email_id):
            subject = m.Email.get_by_id(a.email_id).subject
        refused.append({"kind": "replayed", "received": local_time(a.at, tz),
                        "client_ip": str(detail.get("client_ip", "")),
                        "envelope_from": str(detail.get("envelope_from", "")),
                        "level": "", "subject": subject, "release": ""})

    # Persons created automatically in the period from mail this user may see (a person
    # made from a colleague's private mail would reveal that correspondence).
    seen_mail = m.Email.select(m.Email.id).where(visible_to(user_row))
    auto = []
    for p in (m.Person.select()
              .where((m.Person.company == user_row.company_id) & m.Person.auto_created
                     & (m.Person.created_at >= lo) & (m.Person.created_at < hi)
                     & m.Person.id.in_(m.Participant.select(m.Participant.person)
                                       .where(m.Participant.email.in_(seen_mail))))
              .order_by(m.Person.id)):
        addrs = sorted(a.address for a in p.addresses)
        auto.append({"id": p.id, "name": p.name, "addresses": addrs})

    # Mailboxes the sync cannot read, told once: in the period their trouble began.
    mailboxes = [{"account": a.key.split("/", 1)[-1].rsplit("@", 1)[0],
                  "since": local_time(a.failing_since, tz), "error": a.last_error[:300]}
                 for a in m.MailboxAccount.select().where(
                     (m.MailboxAccount.user == user_row.id)
                     & (m.MailboxAccount.state == "failing")
                     & (m.MailboxAccount.failing_since >= lo)
                     & (m.MailboxAccount.failing_since < hi)).order_by(m.MailboxAccount.id)]

    L = labels(user.language)
    context: dict[str, Any] = {
        "L": L,
        "lang": user.language,
        "user": {"address": user.address, "name": user.name or user.address},
        "company": company.name,
        "since": local_time(lo, tz),
        "until": local_time(hi, tz),
        "tz": tz,
        "email_count": len(items),
        "by_deal": by_deal,
        "by_person": by_person,
        "no_person": no_person,
        "pending": pending,
        "refused": refused,
        "auto_persons": auto,
        "mailboxes": mailboxes,
        "ask_address": company_address(config, company, "ask"),
    }
    return Digest(user=user, company=company, user_row=user_row, since=since, until=until,
                  context=context)


def render_digest(digest: Digest, env: Environment | None = None) -> tuple[str, str, str]:
    """(subject, text, html) of a composed digest."""
    env = env or shared_environment()
    c = digest.context
    subject = c["L"]["digest_subject"].format(count=c["email_count"], since=c["since"])
    text = env.get_template("digest.txt").render(**c)
    html = env.get_template("digest.html").render(**c)
    return subject, text, html


def digest_message(config: Config, digest: Digest, now: datetime,
                   env: Environment | None = None) -> EmailMessage:
    subject, text, html = render_digest(digest, env)
    # Replying to the digest with command lines sends them to the +ask address.
    return new_message(config, digest.company, to=digest.user.address, subject=subject,
                       text=text, html=html, kind="digest", now=now,
                       reply_to=company_address(config, digest.company, "ask"))


def queue_digest(config: Config, digest: Digest, period: str, now: datetime,
                 env: Environment | None = None) -> list[int]:
    """Queue the digest for ``period`` (call inside a transaction). The outbox dedupe key
    ``digest:<user>:<period>`` makes a second call for the same period queue nothing, so a
    run interrupted and restarted never sends a digest twice."""
    key = f"digest:{digest.user.address}:{period}"
    if m.OutboxItem.select().where(m.OutboxItem.dedupe_key.startswith(key + "#")).exists():
        return []
    message = digest_message(config, digest, now, env)
    ids = enqueue(message, kind="digest", mail_from="", recipients=[digest.user.address],
                  now=now, company_id=digest.user_row.company_id, dedupe_key=key)
    if ids:
        m.AuditEntry.create(
            at=naive_utc(now), company=digest.user_row.company_id, actor=digest.user.address,
            action="digest",
            detail_json=json.dumps({"period": period, "since": naive_utc(digest.since)
                                    .isoformat(), "until": naive_utc(digest.until).isoformat(),
                                    "outbox": ids, "emails": digest.email_count}))
    return ids


def default_since(user: User, until: datetime, last: datetime | None) -> datetime:
    """Start of the next digest's period: the end of the last one, else one period back."""
    if last is not None:
        return last.replace(tzinfo=UTC) if last.tzinfo is None else last
    return until - (timedelta(days=7) if user.digest == "weekly" else timedelta(days=1))
