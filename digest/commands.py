"""Commands about a user's own tracked emails, by email: reading them and saying what was done.

A verified user mails ``<slug>+ask@`` (``mta/handlers/ask.py``) with command lines in the
subject or the body, several per mail, English or Japanese, full-width characters accepted
(NFKC): ``private E12``, ``share E12``, ``private thread E12``, ``deal E12 4``, ``deal E12
Pilot``, ``unlink E12``, ``person E12 ann@customer.test``, ``forget E12``, ``ignore
ann@customer.test``, ``ignore @customer.test``, ``track ann@customer.test``. Several handles may
follow one verb (``forget E12 E13``). A line shaped like a command (a word, then a handle) that
is not one is reported as not understood; any other line (greetings, signatures, quoted text)
is not a command.

:func:`run_commands` applies them through ``crmstore.inbox`` (which checks that each email is
the user's own copy) inside the caller's transaction, and :func:`result_line` says what became
of each in the user's language: done, unchanged, or refused and why. A refusal about an email
never tells an unknown handle from a colleague's email.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crmstore import inbox
from crmstore import models as m
from crmstore.handles import parse_handle
from dealmail.config import Config

from .digests import find_user_config, internal_checker
from .questions import redraw_questions

__all__ = ["Command", "parse_command", "result_line", "run_commands"]

_VERBS = {
    "private": "private", "非公開": "private",
    "share": "share", "共有": "share",
    "deal": "deal", "案件": "deal",
    "unlink": "unlink", "紐付け解除": "unlink",
    "person": "person", "contact": "person", "人物": "person",
    "forget": "forget", "削除": "forget", "忘れる": "forget",
    "ignore": "ignore", "無視": "ignore",
    "track": "track", "追跡": "track",
}
# Longest first, so that a keyword never stops at a shorter one it starts with.
_VERB_RE = re.compile(
    r"^(?P<verb>" + "|".join(re.escape(v) for v in sorted(_VERBS, key=len, reverse=True))
    + r")(?P<rest>.*)$", re.IGNORECASE | re.DOTALL)
_PREFIX_RE = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|tr|返信|転送)\s*[:：]\s*)+", re.IGNORECASE)
_THREAD_WORDS = frozenset({"thread", "スレッド", "スレッドごと"})
_TARGETED_RE = re.compile(r"^\s*:?\s*(?P<handle>#?[Ee]\d{1,12})(?:\s+(?P<target>.*))?$",
                          re.DOTALL)
# "privte E12": a word, then a handle. Such a line is reported as not understood, where
# prose (even quoting handles later on the line) is not a command at all.
_SHAPE_RE = re.compile(r"^\S{1,20}\s*:?\s+#?[Ee]\d{1,12}\b")

@dataclass(frozen=True)
class Command:
    """One command line: ``verb`` is one of the keys of :data:`KEYWORDS`' values, or
    ``not_understood`` (``raw`` says which line)."""

    verb: str
    numbers: tuple[int, ...] = ()
    thread: bool = False
    target: str = ""
    raw: str = ""


def _normal(line: str) -> str:
    text = unicodedata.normalize("NFKC", line).strip()
    return " ".join(_PREFIX_RE.sub("", text).split())


def parse_command(line: str) -> Command | None:
    """The command on ``line``, or None when the line is not one."""
    text = _normal(line)
    found = _VERB_RE.match(text)
    if found is None:
        return None
    word, rest = found.group("verb"), found.group("rest")
    if word.isascii() and rest[:1].isascii() and rest[:1].isalnum():
        return None  # "shared", "deals", "forgetful": not a keyword
    verb = _VERBS[word.lower()]
    if verb in ("deal", "person"):
        targeted = _TARGETED_RE.match(rest)
        number = parse_handle(targeted.group("handle")) if targeted else None
        if targeted is None or number is None:
            return None  # "deal 42", "person Carl": questions, not commands
        return Command(verb, (number,), target=(targeted.group("target") or "").strip(),
                       raw=text)
    tokens = rest.replace(",", " ").replace("、", " ").lstrip(":").split()
    if verb in ("ignore", "track"):
        if len(tokens) == 1 and "@" in tokens[0]:
            return Command(verb, target=tokens[0], raw=text)
        return None
    thread = any(t.lower() in _THREAD_WORDS for t in tokens)
    handles = [t for t in tokens if t.lower() not in _THREAD_WORDS]
    numbers = [parse_handle(t) for t in handles]
    if not numbers or any(n is None for n in numbers):
        return None
    if thread and verb not in ("private", "share"):
        return None
    return Command(verb, tuple(n for n in numbers if n is not None), thread=thread, raw=text)


def looks_like_command(line: str) -> bool:
    """A line shaped like a command (a word, then a handle) that may be a misspelt one."""
    text = _normal(line)
    return len(text) <= 120 and _SHAPE_RE.match(text) is not None


def tidy(commands: Sequence[Command]) -> list[Command]:
    """A command repeated on the next line runs once (a mailto link puts it in the subject,
    the user may type it again in the body); a ``deal E12`` without a deal is dropped when the
    mail names one elsewhere. The order written is kept (``private``, ``share``, ``private``
    is three changes)."""
    named = {(c.verb, c.numbers) for c in commands if c.target}
    out: list[Command] = []
    for c in commands:
        if c.verb in ("deal", "person") and not c.target and (c.verb, c.numbers) in named:
            continue
        if out and out[-1].verb != "not_understood" and (
                out[-1].verb, out[-1].numbers, out[-1].thread, out[-1].target.casefold()) == (
                c.verb, c.numbers, c.thread, c.target.casefold()):
            continue
        out.append(c)
    return out


# --------------------------------------------------------------------------- applying


def actor_for(config: Config, user_address: str, now: datetime, via: str,
              queue_id: str = "") -> inbox.Actor:
    company, user = find_user_config(config, user_address)
    row = m.User.get_or_none((m.User.address == user.address) & m.User.active)
    if row is None:  # in the config, not (yet) mirrored into the database
        raise LookupError(f"unknown user {user_address!r}")
    return inbox.Actor(user=row, via=via, now=now, is_internal=internal_checker(config, company),
                       freemail=frozenset(config.policy.freemail_domains), queue_id=queue_id)


def run_one(config: Config, actor: inbox.Actor, command: Command) -> list[inbox.Result]:
    """Apply one command (one result per handle it names)."""
    verb = command.verb
    if verb == "not_understood":
        return [inbox.Result("?", command.raw, "refused", "not_understood")]
    if verb in ("ignore", "track"):
        op = inbox.ignore if verb == "ignore" else inbox.track
        return [op(actor, command.target)]
    results = []
    for number in command.numbers:
        if verb in ("private", "share"):
            results.append(inbox.set_visibility(
                actor, number, "private" if verb == "private" else "shared", command.thread))
        elif verb == "deal":
            results.append(inbox.move_deal(actor, number, command.target))
        elif verb == "unlink":
            results.append(inbox.unlink(actor, number))
        elif verb == "person":
            results.append(inbox.add_person(actor, number, command.target))
        elif verb == "forget":
            result = inbox.forget(actor, number)
            if result.values.get("_batches"):
                redraw_questions(config, result.values["_batches"], actor.now)
            results.append(result)
        else:  # parse_command makes no other verb
            raise ValueError(f"unknown command verb {verb!r}")
    return results


def run_commands(config: Config, user_address: str, commands: Sequence[Command],
                 now: datetime, via: str = "mail", queue_id: str = "") -> list[inbox.Result]:
    """Apply the commands of one mail in order (inside the caller's transaction)."""
    actor = actor_for(config, user_address, now, via, queue_id)
    return [r for c in tidy(commands) for r in run_one(config, actor, c)]


# --------------------------------------------------------------------------- saying it

_SAY: dict[str, dict[str, str]] = {
    "en": {
        "private.done": "{h} {subj}: your copy is now private (only you see it).",
        "private.thread": "{h} {subj}: your {count} email(s) in this thread are now private, "
                          "and so will be your later ones in it.",
        "private.unchanged": "{h} {subj}: already private.",
        "share.done": "{h} {subj}: your copy is now shared with your colleagues.",
        "share.thread": "{h} {subj}: your {count} email(s) in this thread are now shared, "
                        "and so will be your later ones in it.",
        "share.unchanged": "{h} {subj}: already shared.",
        "deal.done": "{h} {subj}: the thread is now on deal #{id} “{title}”{status}.",
        "deal.unchanged": "{h} {subj}: the thread was already on deal #{id} “{title}”.",
        "unlink.done": "{h} {subj}: the thread is on no deal now, and its later emails will "
                       "not be linked to one.",
        "unlink.unchanged": "{h} {subj}: the thread was already on no deal.",
        "person.done": "{h} {subj}: linked to person “{name}”{new}.",
        "person.unchanged": "{h} {subj}: already linked to person “{name}”.",
        "forget.done": "{h}: your copy is forgotten. It is no longer tracked for you.",
        "ignore.done": "{t}: not tracked for you any more (emails already stored stay; "
                       "forget them one by one).",
        "ignore.unchanged": "{t}: already not tracked for you.",
        "track.done": "{t}: tracked again.",
        "track.unchanged": "{t}: was not on your ignore list.",
        "refused.unknown": "{h}: unknown, or not your email.",
        "refused.no_deal": "{h} {subj}: no deal matches “{ref}”.{options}",
        "refused.ambiguous_deal": "{h} {subj}: several deals match “{ref}”; write the deal's "
                                  "number.{options}",
        "refused.no_target.deal": "{h} {subj}: which deal? Write the handle, then the deal's "
                                  "number or title, e.g. “deal {h} 4”.",
        "refused.no_target.person": "{h} {subj}: which person? Write the handle, then an "
                                    "address, e.g. “person {h} ann@customer.test”.",
        "refused.bad_address": "“{t}”: not an email address or @domain.",
        "refused.internal": "“{t}”: your company's own address, never a customer.",
        "refused.internal.person": "{h} {subj}: “{ref}” is your company's own address, never a "
                                   "customer.",
        "refused.not_participant": "{h} {subj}: no person has the address {ref}, and it is not a "
                                   "participant of this email.",
        "refused.no_person": "{h} {subj}: no person matches “{ref}”; write an address.",
        "refused.ambiguous_person": "{h} {subj}: several persons match “{ref}”; write an "
                                    "address.{options}",
        "refused.not_understood": "“{t}”: not understood.",
        "refused.extra_query": "“{t}”: one question per mail; send it in a mail of its own.",
        "options": " Candidates: {list}.",
        "new": " (new person)",
        "closed": " ({status})",
    },
    "ja": {
        "private.done": "{h} {subj}: あなたのコピーを非公開にしました (あなただけが閲覧できます)。",
        "private.thread": "{h} {subj}: このスレッドのあなたのメール {count} 件を非公開にしました。"
                          "今後のメールも非公開になります。",
        "private.unchanged": "{h} {subj}: すでに非公開です。",
        "share.done": "{h} {subj}: あなたのコピーを同僚と共有しました。",
        "share.thread": "{h} {subj}: このスレッドのあなたのメール {count} 件を共有しました。"
                        "今後のメールも共有されます。",
        "share.unchanged": "{h} {subj}: すでに共有されています。",
        "deal.done": "{h} {subj}: スレッドを案件 #{id}「{title}」{status}に紐付けました。",
        "deal.unchanged": "{h} {subj}: スレッドはすでに案件 #{id}「{title}」に紐付いています。",
        "unlink.done": "{h} {subj}: スレッドを案件から外しました。今後のメールも案件に"
                       "紐付けません。",
        "unlink.unchanged": "{h} {subj}: スレッドはすでに案件に紐付いていません。",
        "person.done": "{h} {subj}: 人物「{name}」{new}に紐付けました。",
        "person.unchanged": "{h} {subj}: すでに人物「{name}」に紐付いています。",
        "forget.done": "{h}: あなたのコピーを削除しました。今後あなたの記録には残りません。",
        "ignore.done": "{t}: 今後あなたのメールとして記録しません (記録済みのメールは残ります。"
                       "個別に削除してください)。",
        "ignore.unchanged": "{t}: すでに記録しない設定です。",
        "track.done": "{t}: 再び記録します。",
        "track.unchanged": "{t}: 無視リストにありません。",
        "refused.unknown": "{h}: 不明、またはあなたのメールではありません。",
        "refused.no_deal": "{h} {subj}: 「{ref}」に一致する案件はありません。{options}",
        "refused.ambiguous_deal": "{h} {subj}: 「{ref}」に一致する案件が複数あります。案件の番号で"
                                  "指定してください。{options}",
        "refused.no_target.deal": "{h} {subj}: どの案件ですか？ 「案件 {h} 4」のように番号または"
                                  "案件名を続けて書いてください。",
        "refused.no_target.person": "{h} {subj}: どの人物ですか？ 「人物 {h} ann@customer.test」の"
                                    "ようにアドレスを続けて書いてください。",
        "refused.bad_address": "「{t}」: メールアドレスまたは @ドメイン ではありません。",
        "refused.internal": "「{t}」: 自社のアドレスです (顧客ではありません)。",
        "refused.internal.person": "{h} {subj}: 「{ref}」は自社のアドレスです"
                                   " (顧客ではありません)。",
        "refused.not_participant": "{h} {subj}: {ref} の人物はなく、このメールの参加者でも"
                                   "ありません。",
        "refused.no_person": "{h} {subj}: 「{ref}」に一致する人物はありません。アドレスで指定して"
                             "ください。",
        "refused.ambiguous_person": "{h} {subj}: 「{ref}」に一致する人物が複数あります。アドレスで"
                                    "指定してください。{options}",
        "refused.not_understood": "「{t}」: 理解できませんでした。",
        "refused.extra_query": "「{t}」: 問い合わせは1通に1件です。別のメールで送ってください。",
        "options": " 候補: {list}。",
        "new": " (新規)",
        "closed": " ({status})",
    },
}


def _quote(subject: str, lang: str) -> str:
    text = " ".join((subject or "(no subject)").split())[:80]
    return f"「{text}」" if lang == "ja" else f"“{text}”"


def result_line(result: inbox.Result, language: str) -> str:
    """What became of one command, in one line of the user's language."""
    lang = "ja" if language == "ja" else "en"
    say = _SAY[lang]
    v: dict[str, Any] = result.values
    fill: dict[str, Any] = {"h": result.target, "t": result.target,
                            "subj": _quote(str(v.get("subject", "")), lang),
                            "ref": v.get("ref", ""), "count": v.get("count", 0),
                            "options": "", "new": "", "status": ""}
    options = v.get("options") or []
    if options:
        listed = ", ".join(f"#{o['id']} {o.get('title') or o.get('name')}" for o in options)
        fill["options"] = say["options"].format(list=listed)
    if result.status == "refused":
        key = f"refused.{result.reason}"
        if f"{key}.{result.command}" in say:
            key = f"{key}.{result.command}"
        return say[key].format(**fill)
    if result.command == "deal":
        deal = v["deal"]
        fill.update(id=deal["id"], title=deal["title"])
        if deal["status"] != "open":
            fill["status"] = say["closed"].format(status=deal["status"])
    if result.command == "person":
        person = v["person"]
        fill["name"] = person["name"]
        if person.get("created"):
            fill["new"] = say["new"]
    key = f"{result.command}.{result.status}"
    if result.status == "done" and v.get("thread"):
        key = f"{result.command}.thread"
    return say[key].format(**fill)
