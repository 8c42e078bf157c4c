"""Answers to ``<slug>+ask@`` requests: a deal's, person's or organization's history by email.

A verified user mails the ask address with a subject (or first line) such as ``deal 42``,
``deal Renewal 2027``, ``person ann@customer.test``, ``org Customer Inc``, ``inbox`` or
``help``; Japanese keywords ``案件``, ``人物``, ``組織`` (and full-width characters,
NFKC-normalised) work too.
:func:`parse_request` reads the request, :func:`answer_request` collects the history — threads
newest first, each email's date, participants, subject and first lines — through
:func:`crmstore.visibility.visible_to` (no exception for admins), with the number of emails the
user may not see, and :func:`render_answer` turns it into text and HTML. Unknown or ambiguous
requests get the closest matches and the help text.

Persons created automatically are only named to a user who may see at least one of their
emails: such a person exists only because of someone's mail, and a colleague's private mail
must not leak through a person's name.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any

from jinja2 import Environment
from peewee import Expression

from crmstore import models as m
from crmstore.visibility import visible_to
from dealmail.config import Company, Config, User

from .compose import company_address, new_message
from .digests import (
    describe_emails,
    find_user_config,
    internal_checker,
    labels,
    shared_environment,
)

ASK_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "answer_subject": "dealmail: {what}",
        "what_deal": "deal #{id} {title}",
        "what_person": "person {name}",
        "what_org": "organization {name}",
        "what_inbox": "your inbox",
        "what_help": "help",
        "what_unknown": "request not understood",
        "what_ambiguous": "several matches",
        "what_not_found": "nothing found",
        "history": "History of {what}, newest first",
        "thread": "Thread",
        "nothing": "No email you may see.",
        "hidden": "{n} email(s) you may not see are not shown.",
        "you_asked": "You asked: {raw}",
        "unknown": "dealmail did not understand this request.",
        "ambiguous": "Several {kind}s match \"{arg}\"; ask again with one of these:",
        "not_found": "No {kind} matches \"{arg}\".",
        "closest": "Closest matches:",
        "kind_deal": "deal",
        "kind_person": "person",
        "kind_org": "organization",
        "help_title": "How to ask dealmail",
        "help": "Send an email to {ask} with one of these as the subject or first line:\n"
                "  deal 42              the history of deal 42\n"
                "  deal Renewal 2027    a deal by its title\n"
                "  person ann@customer.test   a person by address or name\n"
                "  org Customer Inc     an organization\n"
                "  inbox                your latest tracked emails\n"
                "  help                 this text\n"
                "Japanese keywords work too: 案件, 人物, 組織.",
        "participants": "participants",
    },
    "ja": {
        "answer_subject": "dealmail: {what}",
        "what_deal": "案件 #{id} {title}",
        "what_person": "人物 {name}",
        "what_org": "組織 {name}",
        "what_inbox": "受信箱",
        "what_help": "ヘルプ",
        "what_unknown": "リクエストを理解できません",
        "what_ambiguous": "複数の候補",
        "what_not_found": "見つかりません",
        "history": "{what} の履歴 (新しい順)",
        "thread": "スレッド",
        "nothing": "閲覧できるメールはありません。",
        "hidden": "閲覧権限のないメール {n} 件は表示していません。",
        "you_asked": "リクエスト: {raw}",
        "unknown": "このリクエストを理解できませんでした。",
        "ambiguous": "「{arg}」に一致する{kind}が複数あります。次のいずれかで再度お送りください:",
        "not_found": "「{arg}」に一致する{kind}はありません。",
        "closest": "近い候補:",
        "kind_deal": "案件",
        "kind_person": "人物",
        "kind_org": "組織",
        "help_title": "dealmail への問い合わせ方法",
        "help": "{ask} 宛てに、件名または本文の1行目に次のいずれかを書いて送ってください:\n"
                "  案件 42              案件 42 の履歴\n"
                "  案件 Renewal 2027    案件名で指定\n"
                "  人物 ann@customer.test   アドレスまたは名前で人物を指定\n"
                "  組織 Customer Inc     組織\n"
                "  inbox                最近の自分のメール\n"
                "  help                 このヘルプ\n"
                "英語のキーワード (deal, person, org) も使えます。",
        "participants": "参加者",
    },
}

_KEYWORDS = {
    "deal": "deal", "案件": "deal",
    "person": "person", "contact": "person", "人物": "person",
    "org": "org", "organization": "org", "organisation": "org", "組織": "org",
    "inbox": "inbox", "受信箱": "inbox",
    "help": "help", "ヘルプ": "help", "?": "help",
}
_REQUEST_RE = re.compile(
    r"^(?P<kw>deal|person|contact|organization|organisation|org|inbox|help|案件|人物|組織|"
    r"受信箱|ヘルプ|\?)(?P<rest>.*)$", re.IGNORECASE | re.DOTALL)
_PREFIX_RE = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|tr|返信|転送)\s*[:：]\s*)+", re.IGNORECASE)
_ID_RE = re.compile(r"^#?(\d{1,18})$")
HISTORY_LIMIT = 200
INBOX_LIMIT = 30


@dataclass(frozen=True)
class Request:
    """One parsed request: ``kind`` is deal, person, org, inbox, help or unknown."""

    kind: str
    arg: str = ""
    deal_id: int | None = None
    raw: str = ""


def _parse_line(line: str) -> Request | None:
    text = unicodedata.normalize("NFKC", line).strip()
    text = _PREFIX_RE.sub("", text).strip()
    match = _REQUEST_RE.match(text)
    if match is None:
        return None
    kw, rest = match.group("kw"), match.group("rest")
    if kw.isascii() and kw != "?" and rest[:1].isalpha() and rest[:1].isascii():
        return None  # "deals", "helpful": not a keyword
    kind = _KEYWORDS[kw.lower()]
    arg = " ".join(rest.strip().lstrip(":").split())
    if kind in ("inbox", "help"):
        return Request(kind, raw=text) if not arg else None
    if not arg:
        return None
    if kind == "deal":
        idm = _ID_RE.match(arg)
        if idm:
            return Request("deal", arg, int(idm.group(1)), raw=text)
    return Request(kind, arg, raw=text)


def parse_request(subject: str, body: str = "") -> Request:
    """The request in the subject, else in the first non-blank line of the body."""
    found = _parse_line(subject) if subject.strip() else None
    if found is not None:
        return found
    first = next((ln for ln in body.splitlines() if ln.strip()), "")
    found = _parse_line(first) if first else None
    if found is not None:
        return found
    return Request("unknown", raw=" ".join((subject.strip() or first.strip()).split())[:200])


@dataclass
class Answer:
    """A composed answer: template context plus the user it is for."""

    user: User
    company: Company
    context: dict[str, Any] = field(default_factory=dict)


def _known_persons(user_row: m.User) -> Expression:
    """Persons this user may be told about: imported ones, and automatically created ones
    that appear in an email the user may see."""
    seen = m.Email.select(m.Email.id).where(visible_to(user_row))
    with_seen_mail = m.Participant.select(m.Participant.person).where(
        m.Participant.email.in_(seen) & m.Participant.person.is_null(False))
    return (m.Person.company == user_row.company_id) & (
        ~m.Person.auto_created | m.Person.id.in_(with_seen_mail))


def _match(names: dict[int, str], arg: str) -> tuple[list[int], list[int]]:
    """(matches, closest): exact (case-folded) match, else unique substring, else fuzzy."""
    want = arg.casefold()
    exact = [i for i, n in names.items() if n.casefold() == want]
    if exact:
        return exact, []
    part = [i for i, n in names.items() if want in n.casefold()]
    if part:
        return part, []
    by_name: dict[str, list[int]] = {}
    for i, n in names.items():
        by_name.setdefault(n.casefold(), []).append(i)
    close = difflib.get_close_matches(want, list(by_name), n=5, cutoff=0.5)
    return [], [i for c in close for i in by_name[c]]


def _history(user_row: m.User, ids: Any, is_internal: Any, tz: str) -> dict[str, Any]:
    """Threads of the emails in ``ids`` that the user may see, newest first, and the number
    of those the user may not see."""
    total = m.Email.select().where(m.Email.id.in_(ids)).count()
    visible = m.Email.select().where(m.Email.id.in_(ids) & visible_to(user_row))
    shown = visible.count()
    rows = list(visible.order_by(m.Email.date.desc(), m.Email.id.desc()).limit(HISTORY_LIMIT))
    items = describe_emails(user_row, rows, is_internal, tz)
    threads: dict[int, dict[str, Any]] = {}
    for it in items:  # already newest first: a thread's place is its newest email's
        t = threads.setdefault(it["thread_id"], {"id": it["thread_id"], "subject": it["subject"],
                                                "emails": []})
        t["emails"].append(it)
    return {"threads": list(threads.values()), "hidden": total - shown, "shown": shown}


def answer_request(config: Config, user_address: str, request: Request,
                   now: datetime) -> Answer:
    """Collect the answer to ``request`` for the user (reads only)."""
    company, user = find_user_config(config, user_address)
    user_row = m.User.get(m.User.address == user.address)
    cid = user_row.company_id
    tz = user.timezone
    is_internal = internal_checker(config, company)
    L = {**labels(user.language), **ASK_LABELS.get(user.language, ASK_LABELS["en"])}
    ctx: dict[str, Any] = {
        "L": L, "lang": user.language, "request": request.raw, "kind": request.kind,
        "arg": request.arg, "what": "", "history": None, "matches": [], "outcome": "",
        "ask_address": company_address(config, company, "ask"),
        "help": L["help"].format(ask=company_address(config, company, "ask")),
        "user": {"address": user.address, "name": user.name or user.address},
    }
    answer = Answer(user=user, company=company, context=ctx)

    def give(outcome: str, what: str) -> Answer:
        ctx["outcome"], ctx["what"] = outcome, what
        return answer

    if request.kind == "help":
        return give("help", L["what_help"])
    if request.kind == "unknown":
        return give("unknown", L["what_unknown"])
    if request.kind == "inbox":
        own = m.Sighting.select(m.Sighting.email).where(
            (m.Sighting.user == user_row.id) & (m.Sighting.visibility != "quarantined"))
        recent = (m.Email.select(m.Email.id).where(m.Email.id.in_(own))
                  .order_by(m.Email.date.desc(), m.Email.id.desc()).limit(INBOX_LIMIT))
        recent_ids = [e.id for e in recent]
        ctx["history"] = _history(user_row, recent_ids or [0], is_internal, tz)
        return give("history", L["what_inbox"])

    kind_label = L[f"kind_{request.kind}"]
    target: Any = None
    found: list[int]
    close: list[int]
    if request.kind == "deal":
        deals = {d.id: d for d in m.Deal.select().where(m.Deal.company == cid)}
        if request.deal_id is not None:
            target = deals.get(request.deal_id)
            found, close = ([request.deal_id], []) if target else ([], [])
        else:
            found, close = _match({i: d.title for i, d in deals.items()}, request.arg)
            target = deals[found[0]] if len(found) == 1 else None
        options = [{"label": f"deal {i}", "name": f"#{i} {deals[i].title}"}
                   for i in (found if len(found) > 1 else close)]
    elif request.kind == "person":
        persons = {p.id: p for p in m.Person.select().where(_known_persons(user_row))}
        if "@" in request.arg:
            addr = request.arg.strip("<>").lower()
            row = (m.PersonAddress.select(m.PersonAddress.person)
                   .where((m.PersonAddress.company == cid) & (m.PersonAddress.address == addr))
                   .first())
            found = [row.person_id] if row is not None and row.person_id in persons else []
            close = []
        else:
            found, close = _match({i: p.name for i, p in persons.items()}, request.arg)
        target = persons[found[0]] if len(found) == 1 else None
        first_addr = {pa.person_id: pa.address for pa in m.PersonAddress.select().where(
            m.PersonAddress.person.in_(list(persons) or [0])).order_by(m.PersonAddress.id.desc())}
        options = [{"label": f"person {first_addr.get(i, persons[i].name)}",
                    "name": persons[i].name} for i in (found if len(found) > 1 else close)]
    else:
        orgs = {o.id: o for o in m.Organization.select().where(m.Organization.company == cid)}
        found, close = _match({i: o.name for i, o in orgs.items()}, request.arg)
        target = orgs[found[0]] if len(found) == 1 else None
        options = [{"label": f"org {orgs[i].name}", "name": orgs[i].name}
                   for i in (found if len(found) > 1 else close)]
    if target is None:
        ctx["matches"] = options
        ctx["kind_label"] = kind_label
        if len(found) > 1:
            return give("ambiguous", L["what_ambiguous"])
        return give("not_found", L["what_not_found"])

    if request.kind == "deal":
        what = L["what_deal"].format(id=target.id, title=target.title)
        ids: Any = (m.Link.select(m.Link.email).where((m.Link.deal == target.id)
                                                      & m.Link.email.is_null(False))
                    | m.Email.select(m.Email.id).join(m.Thread, on=(m.Email.thread == m.Thread.id))
                    .where(m.Thread.deal == target.id))
    elif request.kind == "person":
        what = L["what_person"].format(name=target.name)
        ids = m.Link.select(m.Link.email).where((m.Link.person == target.id)
                                                & m.Link.email.is_null(False))
    else:
        what = L["what_org"].format(name=target.name)
        org_persons = m.Person.select(m.Person.id).where(m.Person.organization == target.id)
        org_deals = m.Deal.select(m.Deal.id).where(m.Deal.organization == target.id)
        ids = (m.Link.select(m.Link.email).where(
            (m.Link.organization == target.id) | m.Link.person.in_(org_persons)
            | m.Link.deal.in_(org_deals))
            | m.Email.select(m.Email.id).join(m.Thread, on=(m.Email.thread == m.Thread.id))
            .where(m.Thread.deal.in_(org_deals)))
    ctx["history"] = _history(user_row, ids, is_internal, tz)
    return give("history", what)


def render_answer(answer: Answer, env: Environment | None = None) -> tuple[str, str, str]:
    """(subject, text, html) of an answer."""
    env = env or shared_environment()
    c = answer.context
    subject = c["L"]["answer_subject"].format(what=c["what"])
    return (subject, env.get_template("ask.txt").render(**c),
            env.get_template("ask.html").render(**c))


def answer_message(config: Config, answer: Answer, now: datetime,
                   in_reply_to: str | None = None,
                   env: Environment | None = None) -> EmailMessage:
    subject, text, html = render_answer(answer, env)
    return new_message(config, answer.company, to=answer.user.address, subject=subject,
                       text=text, html=html, kind="answer", now=now, in_reply_to=in_reply_to)


# --------------------------------------------------------------------------- release

# "release E12" (the line the digest shows beside a quarantined copy); 解除 in Japanese.
_RELEASE_RE = re.compile(r"^(?:release|解除)\s*:?\s*#?E?(\d{1,18})$", re.IGNORECASE)


def parse_release(subject: str, body: str = "") -> int | None:
    """The email id of a ``release E<ID>`` request in the subject or the first non-blank body
    line, else None (then the message is an ordinary request)."""
    first = next((ln for ln in body.splitlines() if ln.strip()), "")
    for line in (subject, first):
        text = _PREFIX_RE.sub("", unicodedata.normalize("NFKC", line).strip()).strip()
        match = _RELEASE_RE.match(" ".join(text.split()))
        if match:
            return int(match.group(1))
    return None


def release_message(config: Config, user_address: str, email_id: int, released: bool,
                    now: datetime, in_reply_to: str | None = None) -> EmailMessage:
    """The answer to ``release E<ID>``: done (with the subject, now the user's own copy), or
    why not (no quarantined copy of theirs by that number)."""
    company, user = find_user_config(config, user_address)
    ja = user.language == "ja"
    if released:
        subject = m.Email.get_by_id(email_id).subject
        title = f"解除しました: E{email_id}" if ja else f"Released from quarantine: E{email_id}"
        text = (f"E{email_id}「{subject}」を隔離から解除し、通常どおり保存しました。\n" if ja else
                f"E{email_id} \"{subject}\" is released from quarantine and stored as your "
                "own copy, linked as usual.\n")
    else:
        title = f"解除できません: E{email_id}" if ja else f"Nothing to release: E{email_id}"
        text = (f"E{email_id} はあなたの隔離メールではありません。\n" if ja else
                f"There is no quarantined copy of yours with the number E{email_id}.\n")
    return new_message(config, company, to=user.address, subject=f"dealmail: {title}",
                       text=text, kind="answer", now=now, in_reply_to=in_reply_to)
