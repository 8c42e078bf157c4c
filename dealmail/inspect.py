"""``dealmail inspect``: how dealmail reads a message, without storing anything.

An admin's tool (and the basis of the forward tests): the kind of message, the sender, the
forwarded chain and the original, the participants, the text the sender wrote (reply_text),
the thread keys and, with a company and its database, the persons and deals that would be
linked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from crmstore import models as m
from linking.forwards import find_forwards
from linking.originals import is_forward_candidate, originals_for
from linking.parse import (
    NESTED_TOO_DEEPLY,
    MessageRejected,
    ParsedMessage,
    normalize_subject,
    parse_message,
)
from linking.replytext import extract_reply_from_message
from linking.threads import thread_index_key

from .config import Config


def _kind(parsed: ParsedMessage, config: Config, forwarded: bool) -> str:
    if parsed.is_auto:
        return "auto-reply"
    targets = [b.address for b in parsed.to + parsed.cc]
    if any("+choice-" in a for a in targets):
        return "choice-reply"
    if any(a.split("@")[0].endswith("+ask") for a in targets):
        return "ask"
    return "forward" if forwarded else "bcc"


def inspect_message(raw: bytes, config: Config, company_slug: str | None = None,
                    with_db: bool = False) -> dict[str, Any]:
    """How dealmail reads ``raw``; raises :class:`MessageRejected` with the reason the
    listener would give for a message it refuses (554 5.6.0)."""
    parsed = parse_message(raw, config.limits)
    try:
        return _inspect(parsed, config, company_slug, with_db)
    except RecursionError as exc:
        # check_structure caps the nesting first; this is the last guard, never a traceback.
        raise MessageRejected(NESTED_TOO_DEEPLY) from exc


def _inspect(parsed: ParsedMessage, config: Config, company_slug: str | None,
             with_db: bool) -> dict[str, Any]:
    found = config.find_user(parsed.from_.address)
    user = found[1] if found else None
    tz = ZoneInfo(user.timezone) if user else UTC
    chains = find_forwards(parsed.full, tz) if is_forward_candidate(parsed, config) else []
    forwarded = any(c and c[-1].from_ for c in chains)
    chain = [f.as_dict() for f in chains[0]] if chains else []
    original = None
    if chains:
        inner = chains[0][-1]
        original = inner.as_dict() | {"note": chains[0][0].note}
    participants = []
    boxes = ([(parsed.from_, "from")] + [(b, "to") for b in parsed.to]
             + [(b, "cc") for b in parsed.cc])
    if forwarded:
        inner = chains[0][-1]
        boxes = ([(inner.from_, "from")] if inner.from_ else []) + \
            [(b, "to") for b in inner.to] + [(b, "cc") for b in inner.cc]
    participants = [{"address": b.address, "name": b.name, "role": r} for b, r in boxes if b]
    result: dict[str, Any] = {
        "kind": _kind(parsed, config, forwarded),
        "sender": parsed.from_.as_dict(),
        "sender_is_user": user.address if user else None,
        "auto_reason": parsed.auto_reason,
        "forwarded": forwarded,
        "original": original,
        "chain": chain,
        "forwards": len(chains),
        "participants": participants,
        "reply_text": extract_reply_from_message(parsed.full),
        "subject": parsed.subject,
        "thread_keys": {
            "message_id": parsed.message_id,
            "in_reply_to": parsed.in_reply_to,
            "references": parsed.references,
            "thread_index": thread_index_key(parsed.thread_index),
            "subject": normalize_subject(parsed.subject),
        },
        "defects": parsed.defects,
    }
    if with_db and company_slug and user is not None:
        result["would_link"] = _would_link(parsed, user, config, company_slug)
    return result


def _would_link(parsed: ParsedMessage, user: Any, config: Config,
                slug: str) -> dict[str, Any]:
    company = m.Company.get_or_none(m.Company.slug == slug)
    if company is None:
        return {"error": f"unknown company {slug!r}"}
    _channel, originals, _ = originals_for(parsed, user, config, datetime.now(UTC))
    persons: list[dict[str, Any]] = []
    deals: list[dict[str, Any]] = []
    for original in originals:
        for box in [original.from_, *original.to, *original.cc]:
            row = (m.PersonAddress.select(m.PersonAddress.person)
                   .where((m.PersonAddress.company == company.id)
                          & (m.PersonAddress.address == box.address)).first())
            if row is None:
                continue
            person = m.Person.get_by_id(row.person_id)
            persons.append({"id": person.id, "name": person.name, "address": box.address})
            for d in m.Deal.select().where((m.Deal.person == person.id)
                                           & (m.Deal.status == "open")):
                deals.append({"id": d.id, "title": d.title, "person": person.id})
    return {"persons": persons, "open_deals": deals,
            "needs_choice": len({d["id"] for d in deals}) > 1}
