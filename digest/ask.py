"""Answers to ``<slug>+ask@`` mails: a deal's, person's or organization's history by email,
and the commands a user sends about their own tracked emails.

A verified user mails the ask address with a subject (or first line) such as ``deal 42``,
``deal Renewal 2027``, ``person ann@customer.test``, ``org Customer Inc``, ``inbox``, ``show
E12``, ``ignored`` or ``help``; Japanese keywords ``案件``, ``人物``, ``組織`` (and full-width
characters, NFKC-normalised) work too. The same mail may carry commands (``private E12``,
``deal E12 Pilot``..., ``digest/commands.py``), several per mail, anywhere in it.
:func:`parse_mail` reads both, :func:`answer_mail` applies the commands and composes one
answer: what each command did, then the history asked for — threads newest first, each
email's handle, date, participants, subject and first lines — through
:func:`crmstore.visibility.visible_to` (no exception for admins), and :func:`render_answer`
turns it into text and HTML. Nothing says how many emails the user may not see. Unknown or
ambiguous requests get the closest matches and the help text.

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

from crmstore import models as m
from crmstore.handles import email_of, handle, parse_handle
from crmstore.inbox import Result, ignored_patterns
from crmstore.visibility import can_see, known_persons, visible_to
from dealmail.config import Company, Config, User

from .actions import add_actions
from .commands import Command, looks_like_command, parse_command, result_line, run_commands
from .compose import company_address, new_message, shared_environment
from .digests import describe_emails, find_user_config, internal_checker, labels

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
        "what_commands": "your commands",
        "what_counts": "your commands: {done} done, {refused} refused",
        "what_ignored": "correspondents you do not track",
        "what_email": "{handle} {subject}",
        "results": "Your commands",
        "done": "done",
        "unchanged": "no change",
        "refused": "refused",
        "ignored_none": "You track all your correspondents.",
        "ignored_how": "Undo with \"track ADDRESS\" (or \"track @domain\").",
        "email_unknown": "{handle}: unknown, or not an email you may see.",
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
                "  show E12             one email (its thread) by its handle\n"
                "  ignored              the correspondents you do not track\n"
                "  help                 this text\n"
                "Commands about your own emails (E12 is the handle shown beside each email;\n"
                "several per mail, one per line):\n"
                "  private E12 / share E12      your copy only\n"
                "  private thread E12           your copies in its thread, and later ones\n"
                "  deal E12 4 / deal E12 Pilot  the thread goes to that deal\n"
                "  unlink E12                   the thread goes to no deal\n"
                "  person E12 ann@customer.test link a person to the email\n"
                "  forget E12                   remove your copy\n"
                "  ignore ann@customer.test     never track this correspondent (or @domain)\n"
                "  track ann@customer.test      track again\n"
                "Japanese keywords work too: 案件, 人物, 組織, 非公開, 共有, 紐付け解除, 削除, "
                "無視, 追跡.",
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
        "what_commands": "コマンド",
        "what_counts": "コマンド: 実行 {done} 件、拒否 {refused} 件",
        "what_ignored": "記録しない相手",
        "what_email": "{handle} {subject}",
        "results": "コマンドの結果",
        "done": "実行",
        "unchanged": "変更なし",
        "refused": "拒否",
        "ignored_none": "記録しない相手はありません。",
        "ignored_how": "「追跡 アドレス」(または「追跡 @ドメイン」) で元に戻せます。",
        "email_unknown": "{handle}: 不明、または閲覧できないメールです。",
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
                "  表示 E12             ハンドルで指定したメール (スレッド)\n"
                "  無視リスト           記録しない相手の一覧\n"
                "  help                 このヘルプ\n"
                "自分のメールへのコマンド (E12 は各メールに表示されるハンドル。1通に複数可、"
                "1行に1つ):\n"
                "  非公開 E12 / 共有 E12          自分のコピーのみ\n"
                "  非公開 スレッド E12            スレッドの自分のコピーと今後のメール\n"
                "  案件 E12 4 / 案件 E12 Pilot    スレッドをその案件へ\n"
                "  紐付け解除 E12                 スレッドを案件から外す\n"
                "  人物 E12 ann@customer.test     メールに人物を紐付ける\n"
                "  削除 E12                       自分のコピーを削除\n"
                "  無視 ann@customer.test         この相手 (または @ドメイン) を今後記録しない\n"
                "  追跡 ann@customer.test         再び記録する\n"
                "英語のキーワード (deal, person, org, private, share, unlink, forget, ignore, "
                "track) も使えます。",
        "participants": "参加者",
    },
}

_KEYWORDS = {
    "deal": "deal", "案件": "deal",
    "person": "person", "contact": "person", "人物": "person",
    "org": "org", "organization": "org", "organisation": "org", "組織": "org",
    "inbox": "inbox", "受信箱": "inbox",
    "help": "help", "ヘルプ": "help", "?": "help",
    "show": "show", "表示": "show",
    "ignored": "ignored", "無視リスト": "ignored",
}
_REQUEST_RE = re.compile(
    r"^(?P<kw>deal|person|contact|organization|organisation|org|inbox|help|show|ignored|"
    r"案件|人物|組織|受信箱|ヘルプ|表示|無視リスト|\?)(?P<rest>.*)$", re.IGNORECASE | re.DOTALL)
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
    number: int | None = None  # the email of ``show E12``


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
    if kind in ("inbox", "help", "ignored"):
        return Request(kind, raw=text) if not arg else None
    if not arg:
        return None
    if kind == "show":
        number = parse_handle(arg)
        return Request("show", arg, raw=text, number=number) if number is not None else None
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
class Mail:
    """Everything one mail to the ask address asks for: commands in the order written, and
    questions (only the first is answered)."""

    commands: list[Command] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


def parse_mail(subject: str, body: str = "") -> Mail:
    """Commands from the subject and every body line; a question from the subject or the
    first non-blank body line (as :func:`parse_request`), or from any line that is a
    keyword alone or names a handle (``ignored``, ``show E12``). A question alone, or nothing
    understood, gives what :func:`parse_request` gives."""
    mail = Mail()
    lines = [subject, *body.splitlines()]
    first_body = next((i for i, ln in enumerate(lines) if i and ln.strip()), None)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        command = parse_command(line)
        if command is not None:
            mail.commands.append(command)
            continue
        found = _parse_line(line)
        # Elsewhere only a question that is the whole line (``inbox``, ``ignored``) or names
        # a handle: prose lines starting with "deal" or "person" are not questions.
        if found is not None and (i in (0, first_body)
                                  or found.kind in ("show", "inbox", "ignored", "help")):
            mail.requests.append(found)
        elif looks_like_command(line):
            mail.commands.append(Command("not_understood",
                                         raw=" ".join(line.split())[:120]))
    if not mail.commands and not mail.requests:
        mail.requests.append(parse_request(subject, body))
    return mail


@dataclass
class Answer:
    """A composed answer: template context plus the user it is for."""

    user: User
    company: Company
    context: dict[str, Any] = field(default_factory=dict)


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


def _history(user_row: m.User, ids: Any, is_internal: Any, tz: str, ask_address: str,
             language: str) -> dict[str, Any]:
    """Threads of the emails in ``ids`` that the user may see, newest first. How many the
    user may not see is never said: a colleague's private email is its owner's business
    alone, even its existence."""
    visible = m.Email.select().where(m.Email.id.in_(ids) & visible_to(user_row))
    rows = list(visible.order_by(m.Email.date.desc(), m.Email.id.desc()).limit(HISTORY_LIMIT))
    items = describe_emails(user_row, rows, is_internal, tz)
    add_actions(items, ask_address, language)
    threads: dict[int, dict[str, Any]] = {}
    for it in items:  # already newest first: a thread's place is its newest email's
        t = threads.setdefault(it["thread_id"], {"id": it["thread_id"], "subject": it["subject"],
                                                "emails": []})
        t["emails"].append(it)
    return {"threads": list(threads.values()), "shown": len(items)}


def answer_request(config: Config, user_address: str, request: Request,
                   now: datetime) -> Answer:
    """Collect the answer to ``request`` for the user (reads only)."""
    company, user = find_user_config(config, user_address)
    user_row = m.User.get(m.User.address == user.address)
    cid = user_row.company_id
    tz = user.timezone
    is_internal = internal_checker(config, company)
    L = {**labels(user.language), **ASK_LABELS.get(user.language, ASK_LABELS["en"])}
    lang = user.language
    ask = company_address(config, company, "ask")
    ctx: dict[str, Any] = {
        "L": L, "lang": lang, "request": request.raw, "kind": request.kind,
        "arg": request.arg, "what": "", "history": None, "matches": [], "outcome": "",
        "ask_address": ask, "help": L["help"].format(ask=ask), "results": [],
        "ignored": [], "message": "",
        "user": {"address": user.address, "name": user.name or user.address},
    }
    answer = Answer(user=user, company=company, context=ctx)

    def give(outcome: str, what: str) -> Answer:
        ctx["outcome"], ctx["what"] = outcome, what
        return answer

    if request.kind == "commands":  # a mail of commands only (see answer_mail)
        return give("commands", L["what_commands"])
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
        ctx["history"] = _history(user_row, recent_ids or [0], is_internal, tz, ask, lang)
        return give("history", L["what_inbox"])
    if request.kind == "ignored":
        ctx["ignored"] = sorted(ignored_patterns(user_row.id))
        return give("ignored", L["what_ignored"])
    if request.kind == "show":
        email = email_of(cid, request.number or 0)
        if email is None or not can_see(user_row, email.id):
            ctx["message"] = L["email_unknown"].format(handle=request.arg)
            return give("message", request.arg)
        thread_ids = m.Email.select(m.Email.id).where(m.Email.thread == email.thread_id)
        ctx["history"] = _history(user_row, thread_ids, is_internal, tz, ask, lang)
        return give("history", L["what_email"].format(handle=handle(email.number),
                                                      subject=email.subject))

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
        persons = {p.id: p for p in m.Person.select().where(known_persons(user_row))}
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
    ctx["history"] = _history(user_row, ids, is_internal, tz, ask, lang)
    return give("history", what)


def answer_mail(config: Config, user_address: str, mail: Mail, now: datetime,
                queue_id: str = "") -> tuple[Answer, list[Result]]:
    """Apply the mail's commands (inside the caller's transaction, in the order written) and
    compose the one answer: what each command did, then the first question's answer."""
    results = (run_commands(config, user_address, mail.commands, now, "mail", queue_id)
               if mail.commands else [])
    first = mail.requests[0] if mail.requests else Request("commands")
    answer = answer_request(config, user_address, first, now)
    ctx = answer.context
    lang = ctx["lang"]
    results += [Result("ask", r.raw, "refused", "extra_query") for r in mail.requests[1:]]
    ctx["results"] = [{"ok": r.ok, "status": r.status, "text": result_line(r, lang)}
                      for r in results]
    if not mail.requests:
        done = sum(1 for r in results if r.ok)
        ctx["outcome"] = "commands"
        ctx["what"] = ctx["L"]["what_counts"].format(done=done, refused=len(results) - done)
        ctx["request"] = "; ".join(c.raw for c in mail.commands)[:200]
    return answer, results


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
    ask = company_address(config, answer.company, "ask")
    # Replying to an answer with more commands or questions reaches the ask address again.
    return new_message(config, answer.company, to=answer.user.address, subject=subject,
                       text=text, html=html, kind="answer", now=now, in_reply_to=in_reply_to,
                       reply_to=ask)


# --------------------------------------------------------------------------- release

# "release E12" (the line the digest shows beside a quarantined copy, E12 its handle); 解除 in
# Japanese.
_RELEASE_RE = re.compile(r"^(?:release|解除)\s*:?\s*#?E?(\d{1,18})$", re.IGNORECASE)


def parse_release(subject: str, body: str = "") -> int | None:
    """The handle number of a ``release E<number>`` request in the subject or the first
    non-blank body line, else None (then the message is an ordinary request)."""
    first = next((ln for ln in body.splitlines() if ln.strip()), "")
    for line in (subject, first):
        text = _PREFIX_RE.sub("", unicodedata.normalize("NFKC", line).strip()).strip()
        match = _RELEASE_RE.match(" ".join(text.split()))
        if match:
            return int(match.group(1))
    return None


def release_message(config: Config, user_address: str, number: int, released: bool,
                    now: datetime, in_reply_to: str | None = None) -> EmailMessage:
    """The answer to ``release E<number>``: done (with the subject, now the user's own copy),
    or why not (no quarantined copy of theirs by that handle)."""
    company, user = find_user_config(config, user_address)
    ja = user.language == "ja"
    h = handle(number)
    if released:
        email = email_of(m.User.get(m.User.address == user.address).company_id, number)
        subject = email.subject if email is not None else ""
        title = f"解除しました: {h}" if ja else f"Released from quarantine: {h}"
        text = (f"{h}「{subject}」を隔離から解除し、通常どおり保存しました。\n" if ja else
                f"{h} \"{subject}\" is released from quarantine and stored as your "
                "own copy, linked as usual.\n")
    else:
        title = f"解除できません: {h}" if ja else f"Nothing to release: {h}"
        text = (f"{h} はあなたの隔離メールではありません。\n" if ja else
                f"There is no quarantined copy of yours with the handle {h}.\n")
    return new_message(config, company, to=user.address, subject=f"dealmail: {title}",
                       text=text, kind="answer", now=now, in_reply_to=in_reply_to,
                       reply_to=company_address(config, company, "ask"))
