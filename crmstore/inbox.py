"""A user's control over their own copies: sharing, the deal, persons, forgetting, ignoring.

Every operation here acts for one user on an email named by its handle (``E123``,
``crmstore.handles``) and only through that user's own copy: a sighting of theirs that is not
quarantined. Anything else — an unknown number, a colleague's email, shared or private, a
quarantined copy — is refused with the same reason (``unknown``), so a handle reveals nothing;
admins get no power over colleagues' copies. The callers (the ``+ask`` command mails in
``digest/commands.py``, ``dealmail emails`` in the CLI) run each command mail or command in one
transaction; every change writes an audit entry (who, what, before and after).

* ``private``/``share``: the user's own copy, or with ``thread`` every copy of theirs in the
  thread and their later ones (``ThreadVisibility``, read by ``linking/record.py``);
* ``deal``: the thread and all its emails move to another deal of the company (open or not);
  ``unlink``: no deal, and the thread's later emails are neither linked nor asked about
  (``ThreadUnlinked``) until a deal is named again; waiting "which deal?" questions are void;
* ``person``: links the email to a person (by address or name); a participant's address that
  no person has becomes a new person;
* ``forget``: the user's copy is deleted; when no copy of the email is left, the email itself
  goes with everything that hangs on it (participants, links, questions, its raw bytes), an
  emptied thread, and persons created automatically that nothing refers to any more;
* ``ignore``/``track``: correspondents (an address or ``@domain``) the user does not track;
  ``linking/capture.py`` leaves them out of the user's copies (:func:`ignored_patterns`).

Who may *see* an email is still decided by ``crmstore.visibility`` alone.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dealmail.addresses import AddressError, domain_of, normalize_address, normalize_domain
from dealmail.clock import naive_utc

from . import models as m
from .handles import email_of, handle
from .hotpath import column_sql, table_sql
from .quarantine import prune_auto_persons
from .visibility import can_see, known_persons

__all__ = [
    "Actor",
    "Result",
    "add_person",
    "describe",
    "forget",
    "ignore",
    "ignored_patterns",
    "is_ignored",
    "list_own",
    "move_deal",
    "own_copy",
    "set_visibility",
    "track",
    "unlink",
]

_ACTIVE_QUESTIONS = ("pending", "asked")


@dataclass(frozen=True)
class Actor:
    """Who acts, from where, and the company facts the operations need."""

    user: m.User
    via: str  # mail | cli
    now: datetime
    #: Whether an address is the company's own (a user, an internal domain, dealmail).
    is_internal: Callable[[str], bool]
    freemail: frozenset[str] = frozenset()
    queue_id: str = ""


@dataclass(frozen=True)
class Result:
    """What one command did: ``done``, ``unchanged`` or ``refused`` (with ``reason``)."""

    command: str
    target: str
    status: str
    reason: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "refused"

    def as_dict(self) -> dict[str, Any]:
        # Whether a forgotten email itself went says whether a colleague has it: never shown
        # (nor the internal "_" values for the caller).
        shown = {k: v for k, v in self.values.items()
                 if k != "deleted" and not k.startswith("_")}
        return {"command": self.command, "target": self.target, "status": self.status,
                "reason": self.reason, **shown}


def _audit(actor: Actor, action: str, email_id: int | None, detail: dict[str, Any]) -> None:
    m.AuditEntry.create(
        at=naive_utc(actor.now), company=actor.user.company_id, actor=actor.user.address,
        action=action, email=email_id,
        detail_json=json.dumps({**detail, "via": actor.via, "queue_id": actor.queue_id},
                               ensure_ascii=False, default=str))


def own_copy(user: m.User, number: int) -> tuple[m.Email, m.Sighting] | None:
    """The email numbered ``number`` in the user's company and the user's own copy of it,
    or None (no such email, not the user's, or only a quarantined copy)."""
    email = email_of(user.company_id, number)
    if email is None:
        return None
    sighting = m.Sighting.get_or_none(
        (m.Sighting.email == email.id) & (m.Sighting.user == user.id)
        & (m.Sighting.visibility != "quarantined"))
    return (email, sighting) if sighting is not None else None


def _unknown(command: str, number: int) -> Result:
    return Result(command, handle(number), "refused", "unknown")


def _thread_email_ids(thread_id: int) -> list[int]:
    return [e.id for e in m.Email.select(m.Email.id).where(m.Email.thread == thread_id)]


def _void_questions(thread_id: int) -> int:
    return int(m.PendingChoice.update(state="void")
               .where((m.PendingChoice.thread == thread_id)
                      & m.PendingChoice.state.in_(_ACTIVE_QUESTIONS)).execute())


def _thread_deals(thread: m.Thread, email_ids: list[int]) -> list[int]:
    """The deals a thread and its emails are on now (the thread's own first)."""
    deals = [thread.deal_id] if thread.deal_id else []
    for lk in (m.Link.select(m.Link.deal)
               .where(m.Link.deal.is_null(False)
                      & ((m.Link.thread == thread.id) | m.Link.email.in_(email_ids or [0])))
               .order_by(m.Link.id)):
        if lk.deal_id not in deals:
            deals.append(lk.deal_id)
    return deals


def _drop_deal_links(thread_id: int, email_ids: list[int]) -> None:
    (m.Link.delete()
     .where(m.Link.deal.is_null(False)
            & ((m.Link.thread == thread_id) | m.Link.email.in_(email_ids or [0])))
     .execute())


# --------------------------------------------------------------------------- sharing


def set_visibility(actor: Actor, number: int, visibility: str,
                   thread: bool = False) -> Result:
    """``private``/``share`` the user's copy of the email, or (``thread``) all their copies in
    its thread, now and for the thread's later emails."""
    assert visibility in ("private", "shared")
    command = "private" if visibility == "private" else "share"
    user = actor.user
    found = own_copy(user, number)
    if found is None:
        return _unknown(command, number)
    email, sighting = found
    values: dict[str, Any] = {"visibility": visibility, "thread": thread,
                              "subject": email.subject}
    if not thread:
        if sighting.visibility == visibility:
            return Result(command, handle(number), "unchanged", values=values)
        before = sighting.visibility
        sighting.visibility = visibility
        sighting.save(only=[m.Sighting.visibility])
        _audit(actor, "visibility", email.id, {"handle": handle(number), "before": before,
                                               "after": visibility})
        return Result(command, handle(number), "done", values=values)
    mine = list(m.Sighting.select(m.Sighting, m.Email.number)
                .join(m.Email, on=(m.Sighting.email == m.Email.id))
                .where((m.Email.thread == email.thread_id) & (m.Sighting.user == user.id)
                       & (m.Sighting.visibility != "quarantined")).objects())
    changed = [s for s in mine if s.visibility != visibility]
    if changed:
        (m.Sighting.update(visibility=visibility)
         .where(m.Sighting.id.in_([s.id for s in changed])).execute())
    rule = m.ThreadVisibility.get_or_none((m.ThreadVisibility.thread == email.thread_id)
                                          & (m.ThreadVisibility.user == user.id))
    before_rule = rule.visibility if rule is not None else None
    if rule is None:
        m.ThreadVisibility.create(thread=email.thread_id, user=user.id, visibility=visibility,
                                  created_at=naive_utc(actor.now))
    elif rule.visibility != visibility:
        rule.visibility = visibility
        rule.save(only=[m.ThreadVisibility.visibility])
    values["count"] = len(mine)
    if not changed and before_rule == visibility:
        return Result(command, handle(number), "unchanged", values=values)
    _audit(actor, "thread_visibility", email.id, {
        "handle": handle(number), "thread": email.thread_id,
        "before": {handle(s.number): s.visibility for s in changed},
        "before_rule": before_rule, "after": visibility})
    return Result(command, handle(number), "done", values=values)


# --------------------------------------------------------------------------- the deal


def _deal_options(deals: Iterable[m.Deal]) -> list[dict[str, Any]]:
    return [{"id": d.id, "title": d.title, "status": d.status} for d in deals]


def find_deal(company_id: int, ref: str) -> tuple[m.Deal | None, list[m.Deal], bool]:
    """(the deal, candidates, whether ``ref`` was ambiguous): by number (``4``, ``#4``),
    else by title (a title may be a number too): exact (case-folded), else the one title
    containing ``ref``. Several titles containing it are ambiguous; none gives the closest
    titles as candidates."""
    text = " ".join(ref.split()).strip()
    number = text.lstrip("#")
    deals = list(m.Deal.select().where(m.Deal.company == company_id).order_by(m.Deal.id))
    if number.isdigit():
        by_id = [d for d in deals if d.id == int(number)]
        if by_id:
            return by_id[0], [], False
    want = text.casefold()
    exact = [d for d in deals if d.title.casefold() == want]
    part = exact or [d for d in deals if want and want in d.title.casefold()]
    if len(part) == 1:
        return part[0], [], False
    if part:
        return None, part, True
    titles = {d.title.casefold(): d for d in deals}
    close = difflib.get_close_matches(want, list(titles), n=5, cutoff=0.5)
    return None, [titles[c] for c in close], False


def move_deal(actor: Actor, number: int, ref: str) -> Result:
    """Put the email's thread (and every email of it) on the deal ``ref``."""
    found = own_copy(actor.user, number)
    if found is None:
        return _unknown("deal", number)
    email, _sighting = found
    if not ref.strip():
        return Result("deal", handle(number), "refused", "no_target",
                      {"subject": email.subject})
    deal, options, ambiguous = find_deal(actor.user.company_id, ref)
    if deal is None:
        return Result("deal", handle(number), "refused",
                      "ambiguous_deal" if ambiguous else "no_deal",
                      {"ref": " ".join(ref.split()), "options": _deal_options(options),
                       "subject": email.subject})
    thread = m.Thread.get_by_id(email.thread_id)
    email_ids = _thread_email_ids(thread.id)
    before = _thread_deals(thread, email_ids)
    unlinked = m.ThreadUnlinked.get_or_none(m.ThreadUnlinked.thread == thread.id)
    values = {"deal": {"id": deal.id, "title": deal.title, "status": deal.status},
              "subject": email.subject}
    all_linked = {lk.email_id for lk in m.Link.select(m.Link.email).where(
        m.Link.email.in_(email_ids) & (m.Link.deal == deal.id))}
    if before == [deal.id] and all_linked >= set(email_ids) and unlinked is None:
        return Result("deal", handle(number), "unchanged", values=values)
    now = naive_utc(actor.now)
    _drop_deal_links(thread.id, email_ids)
    thread.deal = deal.id
    thread.save(only=[m.Thread.deal])
    m.Link.insert_many(
        [{"thread": thread.id, "email": None, "deal": deal.id, "source": "user",
          "created_at": now}]
        + [{"thread": None, "email": eid, "deal": deal.id, "source": "user",
            "created_at": now} for eid in email_ids]).execute()
    if unlinked is not None:
        unlinked.delete_instance()
    voided = _void_questions(thread.id)
    _audit(actor, "deal", email.id, {"handle": handle(number), "thread": thread.id,
                                     "before": before, "after": deal.id,
                                     "questions_void": voided})
    return Result("deal", handle(number), "done", values=values)


def unlink(actor: Actor, number: int) -> Result:
    """No deal for the email's thread, now and for its later emails."""
    found = own_copy(actor.user, number)
    if found is None:
        return _unknown("unlink", number)
    email, _sighting = found
    thread = m.Thread.get_by_id(email.thread_id)
    email_ids = _thread_email_ids(thread.id)
    before = _thread_deals(thread, email_ids)
    unlinked = m.ThreadUnlinked.get_or_none(m.ThreadUnlinked.thread == thread.id)
    asked = (m.PendingChoice.select().where((m.PendingChoice.thread == thread.id)
                                            & m.PendingChoice.state.in_(_ACTIVE_QUESTIONS))
             .exists())
    values = {"subject": email.subject}
    if not before and unlinked is not None and not asked:
        return Result("unlink", handle(number), "unchanged", values=values)
    _drop_deal_links(thread.id, email_ids)
    if thread.deal_id is not None:
        thread.deal = None
        thread.save(only=[m.Thread.deal])
    if unlinked is None:
        m.ThreadUnlinked.create(thread=thread.id, user=actor.user.id,
                                created_at=naive_utc(actor.now))
    voided = _void_questions(thread.id)
    _audit(actor, "unlink", email.id, {"handle": handle(number), "thread": thread.id,
                                       "before": before, "after": None,
                                       "questions_void": voided})
    return Result("unlink", handle(number), "done", values=values)


# --------------------------------------------------------------------------- persons


def _known_persons(user: m.User) -> list[m.Person]:
    return list(m.Person.select().where(known_persons(user)).order_by(m.Person.id))


def add_person(actor: Actor, number: int, ref: str) -> Result:
    """Link the email to a person: by address (a participant's address no person has
    becomes a new person), or by a name the user may know."""
    found = own_copy(actor.user, number)
    if found is None:
        return _unknown("person", number)
    email, _sighting = found
    company_id = actor.user.company_id
    text = " ".join(ref.split()).strip().strip("<>")
    values: dict[str, Any] = {"ref": text, "subject": email.subject}
    if not text:
        return Result("person", handle(number), "refused", "no_target", values)
    person: m.Person | None
    created = False
    if "@" in text:
        try:
            address = normalize_address(text)
        except AddressError:
            return Result("person", handle(number), "refused", "bad_address", values)
        values["ref"] = address
        if actor.is_internal(address):
            return Result("person", handle(number), "refused", "internal", values)
        pa = m.PersonAddress.get_or_none((m.PersonAddress.company == company_id)
                                         & (m.PersonAddress.address == address))
        part = (m.Participant.select()
                .where((m.Participant.email == email.id)
                       & (m.Participant.address == address)).first())
        person = m.Person.get_by_id(pa.person_id) if pa is not None else None
        if person is not None and part is None and person.auto_created and person.id not in {
                p.id for p in _known_persons(actor.user)}:
            # A person made from a colleague's mail only: naming it (or even answering
            # differently) would tell that the colleague corresponds with this address.
            person = None
        if person is None:
            if part is None:
                return Result("person", handle(number), "refused", "not_participant", values)
            domain = domain_of(address)
            org = None
            if domain not in actor.freemail:
                od = m.OrgDomain.get_or_none((m.OrgDomain.company == company_id)
                                             & (m.OrgDomain.domain == domain))
                org = od.organization_id if od is not None else None
            person = m.Person.create(company=company_id,
                                     name=(part.name or address.split("@")[0])[:300],
                                     organization=org, auto_created=False,
                                     created_at=naive_utc(actor.now))
            m.PersonAddress.create(person=person, company=company_id, address=address)
            created = True
    else:
        known = _known_persons(actor.user)
        want = text.casefold()
        hits = ([p for p in known if p.name.casefold() == want]
                or [p for p in known if want in p.name.casefold()])
        if len(hits) != 1:
            values["options"] = [{"id": p.id, "name": p.name} for p in hits[:10]]
            return Result("person", handle(number), "refused",
                          "ambiguous_person" if hits else "no_person", values)
        person = hits[0]
    values["person"] = {"id": person.id, "name": person.name, "created": created}
    addresses = [a.address for a in m.PersonAddress.select(m.PersonAddress.address)
                 .where(m.PersonAddress.person == person.id)]
    linked = m.Link.select().where((m.Link.email == email.id)
                                   & (m.Link.person == person.id)).exists()
    if linked:
        return Result("person", handle(number), "unchanged", values=values)
    now = naive_utc(actor.now)
    m.Link.create(email=email.id, person=person.id, source="user", created_at=now)
    (m.Participant.update(person=person.id)
     .where((m.Participant.email == email.id) & m.Participant.person.is_null()
            & m.Participant.address.in_(addresses or [""])).execute())
    if person.organization_id and not m.Link.select().where(
            (m.Link.email == email.id)
            & (m.Link.organization == person.organization_id)).exists():
        m.Link.create(email=email.id, organization=person.organization_id, source="user",
                      created_at=now)
    _audit(actor, "person", email.id, {"handle": handle(number), "person": person.id,
                                       "created": created, "before": None,
                                       "after": person.id})
    return Result("person", handle(number), "done", values=values)


# --------------------------------------------------------------------------- forgetting


def forget(actor: Actor, number: int) -> Result:
    """Delete the user's copy; the email and what hangs on it go when no copy is left.

    ``values["deleted"]`` says whether the email itself went (the caller asks the store to
    scrub deleted content after the commit); it is never shown to the user, since it would
    tell whether a colleague has the same email. ``values["_batches"]`` names the question
    emails that asked about it, for the caller to draw again (``digest.questions``)."""
    found = own_copy(actor.user, number)
    if found is None:
        return _unknown("forget", number)
    email, sighting = found
    email_id = email.id
    sighting.delete_instance()
    mine = (m.PendingChoice.select().where((m.PendingChoice.email == email_id)
                                           & (m.PendingChoice.user == actor.user.id)))
    # The question emails that asked about it (``<digest>-NNN`` token hashes): one still
    # waiting in the outbox is drawn again without it (digest/questions.py).
    batches = sorted({str(p.token_hash).rsplit("-", 1)[0] for p in mine if p.token_hash})
    (m.PendingChoice.delete().where((m.PendingChoice.email == email_id)
                                    & (m.PendingChoice.user == actor.user.id)).execute())
    deleted = not m.Sighting.select().where(m.Sighting.email == email_id).exists()
    if deleted:
        _purge_email(email)
    _audit(actor, "forget", None if deleted else email_id,
           {"handle": handle(number), "email": email_id, "before": sighting.visibility,
            "after": None, "email_deleted": deleted})
    return Result("forget", handle(number), "done",
                  values={"deleted": deleted, "_batches": batches})


def _purge_email(email: m.Email) -> None:
    """Delete an email nobody has any more, with everything that hangs on it. Dependent rows
    are deleted explicitly (not left to ON DELETE clauses) so the order is the same on both
    backends and nothing depends on SQLite's foreign_keys pragma."""
    email_id, thread_id = email.id, email.thread_id
    persons = {p.person_id for p in m.Participant.select(m.Participant.person)
               .where((m.Participant.email == email_id) & m.Participant.person.is_null(False))}
    persons |= {lk.person_id for lk in m.Link.select(m.Link.person)
                .where((m.Link.email == email_id) & m.Link.person.is_null(False))}
    m.PendingChoice.delete().where(m.PendingChoice.email == email_id).execute()
    m.Link.delete().where(m.Link.email == email_id).execute()
    m.Participant.delete().where(m.Participant.email == email_id).execute()
    m.AuditEntry.update(email=None).where(m.AuditEntry.email == email_id).execute()
    m.Email.delete().where(m.Email.id == email_id).execute()
    if not m.Email.select().where(m.Email.thread == thread_id).exists():
        m.PendingChoice.delete().where(m.PendingChoice.thread == thread_id).execute()
        m.Link.delete().where(m.Link.thread == thread_id).execute()
        m.ThreadVisibility.delete().where(m.ThreadVisibility.thread == thread_id).execute()
        m.ThreadUnlinked.delete().where(m.ThreadUnlinked.thread == thread_id).execute()
        m.Thread.delete().where(m.Thread.id == thread_id).execute()
    # A person dealmail created from this email alone would keep its correspondent's name.
    prune_auto_persons(persons)


# --------------------------------------------------------------------------- ignoring


def _pattern(text: str) -> str | None:
    """``ann@customer.test`` or ``@customer.test``, normalised; None when malformed."""
    raw = text.strip().strip("<>")
    try:
        if raw.startswith("@"):
            return "@" + normalize_domain(raw[1:])
        return normalize_address(raw)
    except AddressError:
        return None


def ignore(actor: Actor, text: str) -> Result:
    """Never track this correspondent (or anyone at ``@domain``) for the user again."""
    pattern = _pattern(text)
    if pattern is None:
        return Result("ignore", text.strip(), "refused", "bad_address")
    probe = f"someone{pattern}" if pattern.startswith("@") else pattern
    if actor.is_internal(probe):
        return Result("ignore", pattern, "refused", "internal")
    if m.IgnoredCorrespondent.select().where(
            (m.IgnoredCorrespondent.user == actor.user.id)
            & (m.IgnoredCorrespondent.pattern == pattern)).exists():
        return Result("ignore", pattern, "unchanged")
    m.IgnoredCorrespondent.create(user=actor.user.id, pattern=pattern,
                                  created_at=naive_utc(actor.now))
    _audit(actor, "ignore", None, {"pattern": pattern, "before": "tracked",
                                   "after": "ignored"})
    return Result("ignore", pattern, "done")


def track(actor: Actor, text: str) -> Result:
    """Undo :func:`ignore`."""
    pattern = _pattern(text)
    if pattern is None:
        return Result("track", text.strip(), "refused", "bad_address")
    gone = (m.IgnoredCorrespondent.delete()
            .where((m.IgnoredCorrespondent.user == actor.user.id)
                   & (m.IgnoredCorrespondent.pattern == pattern)).execute())
    if not gone:
        return Result("track", pattern, "unchanged")
    _audit(actor, "track", None, {"pattern": pattern, "before": "ignored",
                                  "after": "tracked"})
    return Result("track", pattern, "done")


def ignored_patterns(user_id: int) -> frozenset[str]:
    """The addresses and ``@domains`` a user does not track."""
    # Read for every captured copy (linking/capture.py): the SQL text is written directly
    # instead of being built by the ORM each time (most of this lookup's cost).
    ic = m.IgnoredCorrespondent
    db = ic._meta.database
    cursor = db.execute_sql(
        f"SELECT {column_sql(ic, 'pattern')} FROM {table_sql(ic)} "
        f"WHERE {column_sql(ic, 'user')} = {db.param}", (user_id,))
    return frozenset(str(r[0]) for r in cursor.fetchall())


def is_ignored(address: str, patterns: frozenset[str]) -> bool:
    address = address.lower()
    return address in patterns or "@" + domain_of(address) in patterns


# --------------------------------------------------------------------------- showing


def list_own(user: m.User, limit: int = 50) -> list[dict[str, Any]]:
    """The user's own copies (not quarantined), newest first, with their handles."""
    rows = list(m.Email.select(m.Email, m.Sighting.visibility.alias("my_visibility"))
                .join(m.Sighting, on=(m.Sighting.email == m.Email.id))
                .where((m.Sighting.user == user.id) & (m.Sighting.visibility != "quarantined"))
                .order_by(m.Email.date.desc(), m.Email.id.desc()).limit(limit).objects())
    threads = {t.id: t.deal_id for t in m.Thread.select(m.Thread.id, m.Thread.deal)
               .where(m.Thread.id.in_([r.thread_id for r in rows] or [0]))}
    deals = {d.id: d.title for d in m.Deal.select(m.Deal.id, m.Deal.title)
             .where(m.Deal.id.in_([d for d in threads.values() if d] or [0]))}
    out = []
    for r in rows:
        deal_id = threads.get(r.thread_id)
        date = datetime.fromisoformat(r.date) if isinstance(r.date, str) else r.date
        out.append({"handle": handle(r.number), "id": r.id, "subject": r.subject,
                    "date": date.isoformat() + "Z", "visibility": r.my_visibility,
                    "thread": r.thread_id,
                    "deal": {"id": deal_id, "title": deals[deal_id]} if deal_id else None})
    return out


def describe(user: m.User, number: int) -> dict[str, Any] | None:
    """One email as the user may see it (``dealmail emails show``, ``show E12``), or None
    when there is no such email or the user may not see it (the same answer)."""
    email = email_of(user.company_id, number)
    if email is None or not can_see(user, email.id):
        return None
    mine = m.Sighting.get_or_none((m.Sighting.email == email.id) & (m.Sighting.user == user.id)
                                  & (m.Sighting.visibility != "quarantined"))
    thread = m.Thread.get_by_id(email.thread_id)
    deal_ids = _thread_deals(thread, [email.id])
    deal = m.Deal.get_or_none(m.Deal.id == deal_ids[0]) if deal_ids else None
    persons = [{"id": p.id, "name": p.name} for p in m.Person.select().where(
        m.Person.id.in_(m.Link.select(m.Link.person).where(
            (m.Link.email == email.id) & m.Link.person.is_null(False)))).order_by(m.Person.id)]
    rule = m.ThreadVisibility.get_or_none((m.ThreadVisibility.thread == thread.id)
                                          & (m.ThreadVisibility.user == user.id))
    date = email.date
    if isinstance(date, str):  # SQLite keeps peewee's text form
        date = datetime.fromisoformat(date)
    return {
        "handle": handle(email.number), "id": email.id, "subject": email.subject,
        "date": date.isoformat() + "Z",
        "from": {"address": email.from_address, "name": email.from_name},
        "to": json.loads(email.to_json), "cc": json.loads(email.cc_json),
        "snippet": email.snippet, "thread": thread.id,
        "deal": {"id": deal.id, "title": deal.title} if deal else None,
        "unlinked": m.ThreadUnlinked.select().where(
            m.ThreadUnlinked.thread == thread.id).exists(),
        "persons": persons, "yours": mine is not None,
        "visibility": mine.visibility if mine is not None else None,
        "thread_visibility": rule.visibility if rule is not None and mine else None,
    }
