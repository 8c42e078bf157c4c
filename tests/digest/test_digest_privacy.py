"""The privacy property of digests, answers and listings, over many generated situations
(hypothesis).

For any set of emails with sightings (owner, shared/private/quarantined), links to persons and
deals (direct or through the thread), deal owners, automatically created persons and replay
audit entries, after any sequence of commands by any users on any handles (private, share,
thread-wide or not, deal, unlink, person, forget — the code path of command mails): nothing
in a digest, an answer or a listing (``conversations``, ``emails show|list``) for user U
mentions an email U may not see (its subject or text), nor a person created only from mail U
may not see; and a forgotten email (no copy left) is nowhere: no output mentions it and no row
of any table holds its subject, text or raw bytes. Every email's subject, text and raw bytes
carry unique markers (``S<n>Z``, ``B<n>Z``, ``R<k>Z``), every generated person's name
``N<n>Z``, and the rendered text and HTML are searched for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from digest_world import T0, World, naive, open_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmstore import models as m
from crmstore import queries
from crmstore.inbox import describe, list_own
from crmstore.visibility import can_see
from digest.ask import answer_request, parse_request, render_answer
from digest.commands import Command, actor_for, run_one
from digest.digests import compose_digest, render_digest

USERS = ("alice@example.com", "bob@example.com")
SINCE = T0 - timedelta(days=1)
UNTIL = T0 + timedelta(days=2)
TABLES = (m.AuditEntry, m.PendingChoice, m.Sighting, m.Participant, m.Link, m.ThreadVisibility,
          m.ThreadUnlinked, m.Email, m.Thread)

sighting = st.tuples(st.sampled_from(USERS), st.sampled_from(["shared", "private",
                                                              "quarantined"]))
email_spec = st.fixed_dictionaries({
    "sightings": st.lists(sighting, min_size=1, max_size=2, unique_by=lambda s: s[0]),
    "person": st.one_of(st.none(), st.integers(0, 3)),  # 0..2 generated, 3 = Ann (imported)
    "link_person": st.booleans(),
    "deal": st.one_of(st.none(), st.integers(0, 3)),
    "deal_via_thread": st.booleans(),
    "thread": st.integers(0, 3),
    "hours": st.integers(0, 30),
    "pending": st.booleans(),
    "replay": st.booleans(),
})
command = st.tuples(
    st.sampled_from(USERS),
    st.sampled_from(["private", "share", "private_thread", "share_thread", "deal", "unlink",
                     "person", "forget"]),
    st.integers(0, 7),  # an email of the situation, or (past its end) a number never given
    st.sampled_from(["1", "3", "Pilot", "ann@customer.test", "p0@gen.test",
                     "new@fresh.test"]))
situation = st.fixed_dictionaries({
    "emails": st.lists(email_spec, min_size=1, max_size=7),
    "owners": st.lists(st.sampled_from([None, *USERS]), min_size=4, max_size=4),
    "commands": st.lists(command, max_size=6),
})


@pytest.fixture(scope="module")
def shared_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder: Path = tmp_path_factory.mktemp("privacy")
    config, store = open_store(folder)
    try:
        yield World(config, store)
    finally:
        store.close()


def build(w: World, sit: dict[str, Any]) -> tuple[list[m.Email], list[m.Person]]:
    for model in TABLES:
        model.delete().execute()
    m.PersonAddress.delete().where(m.PersonAddress.address.endswith("@gen.test")).execute()
    m.Person.delete().where(m.Person.name.startswith("N")).execute()
    deals = list(m.Deal.select().order_by(m.Deal.id))
    for deal, owner in zip(deals, sit["owners"], strict=True):
        deal.owner = w.users[owner] if owner else None
        deal.save()
    persons = [w.new_person(f"N{i}Z", f"p{i}@gen.test", at=T0) for i in range(3)]
    persons.append(w.person("ann@customer.test"))
    threads = [w.thread(f"t{i}") for i in range(4)]
    emails = []
    for n, spec in enumerate(sit["emails"]):
        person = persons[spec["person"]] if spec["person"] is not None else None
        deal = deals[spec["deal"]] if spec["deal"] is not None else None
        thread = threads[spec["thread"]]
        if deal is not None and spec["deal_via_thread"]:
            thread.deal = deal
            thread.save()
        to = ([(person.name, m.PersonAddress.get(m.PersonAddress.person == person).address)]
              if person is not None else [("", "stranger@mail.test")])
        when = T0 + timedelta(hours=spec["hours"])
        e = w.email(f"S{n}Z", sightings=spec["sightings"], to=to, date=when,
                    person=person if spec["link_person"] else None,
                    deal=None if (deal is None or spec["deal_via_thread"]) else deal,
                    thread=thread, snippet=f"B{n}Z")
        emails.append(e)
        owner = spec["sightings"][0][0]
        if spec["pending"]:
            m.PendingChoice.create(user=w.users[owner], email=e, thread=thread, person=person,
                                   candidates_json=json.dumps([d.id for d in deals[:2]]),
                                   state="asked", created_at=naive(when))
        if spec["replay"]:
            m.AuditEntry.create(at=naive(when), company=w.company_id, actor=owner,
                                action="replay", email=e,
                                detail_json=json.dumps({"client_ip": "192.0.2.1"}))
    return emails, persons[:3]


def run_commands(w: World, emails: list[m.Email], commands: list[Any]) -> None:
    """Apply the generated commands through the code path of command mails."""
    for user, verb, index, arg in commands:
        number = emails[index].number if index < len(emails) else 9000 + index
        thread = verb.endswith("_thread")
        cmd = Command(verb.removesuffix("_thread"), (number,), thread=thread,
                      target=arg if verb in ("deal", "person") else "")
        run_one(w.config, actor_for(w.config, user, UNTIL, "test"), cmd)


def outputs_for(w: World, user: str, persons: list[m.Person],
                numbers: Sequence[int] = ()) -> str:
    parts = list(render_digest(compose_digest(w.config, user, SINCE, UNTIL, UNTIL)))
    row = m.User.get(m.User.address == user)
    listings: list[Any] = [list_own(row, 100)]
    listings += [describe(row, n) for n in numbers]
    listings += [queries.conversations(row, person=p) for p in m.Person.select()]
    listings += [queries.conversations(row, deal=d) for d in m.Deal.select()]
    parts.append(json.dumps(listings, ensure_ascii=False, default=str))
    parts += [render_answer(answer_request(w.config, user, parse_request(f"show E{n}"),
                                           UNTIL))[1] for n in numbers]
    requests = ["inbox", "org Customer Inc", "person N"]
    requests += [f"deal {d.id}" for d in m.Deal.select()]
    requests += [f"person p{i}@gen.test" for i in range(len(persons))]
    requests += ["person ann@customer.test"]
    for request in requests:
        answer = answer_request(w.config, user, parse_request(request), UNTIL)
        parts.extend(render_answer(answer))
    return "\n".join(parts)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(sit=situation)
def test_no_digest_or_answer_mentions_what_the_reader_may_not_see(
        shared_world: World, sit: dict[str, Any]) -> None:
    w = shared_world
    with w.store.db.atomic() as txn:
        emails, persons = build(w, sit)
        raws = [bytes(e.raw).split()[-1].decode() for e in emails]  # "R<k>Z"
        run_commands(w, emails, sit["commands"])
        gone = [n for n, e in enumerate(emails)
                if not m.Email.select().where(m.Email.id == e.id).exists()]
        for n in gone:
            markers = (f"S{n}Z", f"B{n}Z", raws[n])
            for model in m.ALL_MODELS:
                for stored in model.select().tuples():
                    for value in stored:
                        if isinstance(value, (bytes, memoryview)):
                            value = bytes(value).decode("utf-8", "replace")
                        if isinstance(value, str):
                            assert not any(x in value for x in markers), (model, n)
        for user in USERS:
            row = m.User.get(m.User.address == user)
            text = outputs_for(w, user, persons, [e.number for e in emails])
            for n, e in enumerate(emails):
                if n in gone or not can_see(row, e.id):
                    assert f"S{n}Z" not in text, (user, n)
                    assert f"B{n}Z" not in text, (user, n)
            for i, p in enumerate(persons):
                # A person is part of an email as a participant or by a link (a user's
                # "person E12 ..." links one to their own email: then it is theirs to show).
                holders = ([part.email_id for part in m.Participant.select().where(
                    m.Participant.person == p.id)] + [lk.email_id for lk in m.Link.select()
                    .where((m.Link.person == p.id) & m.Link.email.is_null(False))])
                visible_mail = any(can_see(row, email_id) for email_id in holders)
                if not visible_mail:
                    assert f"N{i}Z" not in text, (user, i)
        txn.rollback()


def test_the_property_sees_something(shared_world: World) -> None:
    """Guard against a vacuous property: visible markers do appear in the outputs."""
    w = shared_world
    with w.store.db.atomic() as txn:
        sit = {"emails": [{"sightings": [("alice@example.com", "shared")], "person": 0,
                           "link_person": True, "deal": 0, "deal_via_thread": False,
                           "thread": 0, "hours": 1, "pending": False, "replay": False},
                          {"sightings": [("bob@example.com", "private")], "person": 0,
                           "link_person": True, "deal": 0, "deal_via_thread": False,
                           "thread": 1, "hours": 2, "pending": False, "replay": False}],
               "owners": ["alice@example.com", None, None, None], "commands": []}
        _emails, persons = build(w, sit)
        alice = outputs_for(w, "alice@example.com", persons)
        bob = outputs_for(w, "bob@example.com", persons)
        assert "S0Z" in alice and "B0Z" in alice and "N0Z" in alice and "S1Z" not in alice
        assert "S1Z" in bob and "S0Z" in bob
        txn.rollback()


def test_the_commands_change_what_is_seen(shared_world: World) -> None:
    """Guard against vacuous commands: a copy made private disappears from a colleague's
    outputs, a forgotten last copy from its owner's and from the database."""
    w = shared_world
    with w.store.db.atomic() as txn:
        spec = {"person": 0, "link_person": True, "deal": 0, "deal_via_thread": False,
                "hours": 1, "pending": False, "replay": False}
        sit = {"emails": [{**spec, "sightings": [("alice@example.com", "shared")],
                           "thread": 0},
                          {**spec, "sightings": [("bob@example.com", "private")],
                           "thread": 1}],
               "owners": ["alice@example.com", None, None, None],
               "commands": [("alice@example.com", "private", 0, ""),
                            ("bob@example.com", "forget", 1, ""),
                            ("bob@example.com", "share", 0, "")]}  # not his: refused
        emails, persons = build(w, sit)
        assert "S0Z" in outputs_for(w, "bob@example.com", persons)
        run_commands(w, emails, sit["commands"])
        bob = outputs_for(w, "bob@example.com", persons)
        assert "S0Z" not in bob and "S1Z" not in bob
        assert "S0Z" in outputs_for(w, "alice@example.com", persons)
        assert not m.Email.select().where(m.Email.id == emails[1].id).exists()
        txn.rollback()
