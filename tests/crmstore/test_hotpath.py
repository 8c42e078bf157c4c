"""Unit tests of ``crmstore.hotpath.HotPath``: every prepared statement of the ingestion path,
against rows written by the ORM, on SQLite and PostgreSQL.

Proves that each query finds exactly what the ORM wrote and nothing of another company
(``person_of_address``, ``org_of_domain``, ``thread_of_message_ids`` newest first,
``thread_of_index``, ``thread_candidates`` within the window, newest first, at most five,
``thread_shares_participant``, ``open_deals`` open only, ``pending_for_thread`` unanswered
only, ``email_by_key``, ``has_sighting``, ``links_of_email``, ``thread_row``); that the updates
only move a thread forward and never replace its deal; and that ``insert``/``insert_many``
return and write the ids and values the ORM reads back on both backends (datetimes included).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from crmstore import models as m
from crmstore.db import Store
from crmstore.hotpath import HotPath

T = datetime(2026, 11, 26, 9, 0)  # naive UTC, as stored


@dataclass
class Rows:
    hot: HotPath
    cid: int  # company "example"
    other: int  # company "othercorp"
    alice: int
    bob: int
    acme: int
    acme_other: int
    p1: int
    p2: int
    d_open1: int
    d_open2: int
    d_p2: int
    t1: int
    t2: int
    t_old: int
    t_other: int
    e1: int
    e2: int


@pytest.fixture
def rows(store: Store) -> Rows:
    with store.transaction():  # one commit (fsync) instead of one per row
        return _write_rows(store)


def _write_rows(store: Store) -> Rows:
    cid = store.company_id("example")
    other = m.Company.create(slug="othercorp", name="Other Corp").id
    alice = m.User.get(m.User.address == "alice@example.com").id
    bob = m.User.get(m.User.address == "bob@example.com").id
    acme = m.Organization.create(company=cid, name="Acme").id
    m.OrgDomain.create(organization=acme, company=cid, domain="acme.test")
    acme_other = m.Organization.create(company=other, name="Acme (theirs)").id
    m.OrgDomain.create(organization=acme_other, company=other, domain="acme.test")
    p1 = m.Person.create(company=cid, name="Pat", organization=acme).id
    m.PersonAddress.create(person=p1, company=cid, address="pat@acme.test")
    m.PersonAddress.create(person=p1, company=cid, address="pat.home@mail.test")
    p2 = m.Person.create(company=cid, name="Quinn").id
    m.PersonAddress.create(person=p2, company=cid, address="quinn@mail.test")
    theirs = m.Person.create(company=other, name="Pat elsewhere").id
    m.PersonAddress.create(person=theirs, company=other, address="pat@acme.test")

    def deal(title: str, status: str, person: int, company: int = cid) -> int:
        return int(m.Deal.create(company=company, title=title, status=status, person=person).id)

    d_open1, d_open2 = deal("First", "open", p1), deal("Second", "open", p1)
    deal("Won", "won", p1)
    deal("Lost", "lost", p1)
    d_p2 = deal("Quinn's", "open", p2)
    deal("Theirs", "open", theirs, other)

    def thread(subject: str, last: datetime, company: int = cid) -> int:
        return int(m.Thread.create(company=company, subject_key=subject, created_at=last,
                                   last_at=last).id)

    t1, t2 = thread("pilot", T), thread("pilot", T - timedelta(days=10))
    t_old = thread("pilot", T - timedelta(days=40))
    t_other = thread("pilot", T, other)

    def email(thread_id: int, key: str, date: datetime, company: int = cid,
              message_id: str | None = None, thread_index: str | None = None) -> int:
        return int(m.Email.create(company=company, dedupe_key=key, message_id=message_id,
                                  content_hash="h", thread=thread_id, date=date, raw=b"raw",
                                  thread_index=thread_index).id)

    e1 = email(t1, "<m1@x>", T, message_id="<m1@x>", thread_index="AQID")
    e2 = email(t2, "<m2@x>", T - timedelta(days=10), message_id="<m2@x>")
    email(t_other, "<m9@x>", T, other, message_id="<m9@x>", thread_index="OTHER")
    m.Participant.create(email=e1, address="pat@acme.test", role="from", person=p1)
    m.Participant.create(email=e1, address="alice@example.com", role="to")
    m.Sighting.create(email=e1, user=alice, channel="bcc", visibility="shared", queue_id="Q",
                      received_at=T)
    m.Link.create(email=e1, person=p1, source="auto")
    m.Link.create(email=e1, deal=d_open1, source="address")
    return Rows(HotPath(store.db), cid, other, alice, bob, acme, acme_other, p1, p2, d_open1,
                d_open2, d_p2, t1, t2, t_old, t_other, e1, e2)


# --------------------------------------------------------------------------- persons, orgs


def test_person_of_address(rows: Rows) -> None:
    hot = rows.hot
    assert hot.person_of_address(rows.cid, "pat@acme.test") == (rows.p1, rows.acme)
    assert hot.person_of_address(rows.cid, "pat.home@mail.test") == (rows.p1, rows.acme)
    assert hot.person_of_address(rows.cid, "quinn@mail.test") == (rows.p2, None)
    assert hot.person_of_address(rows.cid, "nobody@acme.test") is None
    theirs = hot.person_of_address(rows.other, "pat@acme.test")
    assert theirs is not None and theirs[0] != rows.p1


def test_persons_and_orgs_in_one_statement(rows: Rows) -> None:
    hot = rows.hot
    assert hot.persons_and_orgs(rows.cid, ["pat@acme.test", "quinn@mail.test",
                                           "nobody@acme.test"],
                                ["acme.test", "mail.test", "unknown.test"]) == (
        {"pat@acme.test": (rows.p1, rows.acme), "quinn@mail.test": (rows.p2, None)},
        {"acme.test": rows.acme})
    assert hot.persons_and_orgs(rows.cid, ["pat.home@mail.test"], []) == (
        {"pat.home@mail.test": (rows.p1, rows.acme)}, {})
    assert hot.persons_and_orgs(rows.cid, [], ["acme.test"]) == ({}, {"acme.test": rows.acme})
    assert hot.persons_and_orgs(rows.cid, [], []) == ({}, {})
    theirs, orgs = hot.persons_and_orgs(rows.other, ["pat@acme.test"], ["acme.test"])
    assert theirs["pat@acme.test"][0] != rows.p1 and orgs == {"acme.test": rows.acme_other}


def test_org_of_domain(rows: Rows) -> None:
    assert rows.hot.org_of_domain(rows.cid, "acme.test") == rows.acme
    assert rows.hot.org_of_domain(rows.other, "acme.test") == rows.acme_other
    assert rows.hot.org_of_domain(rows.cid, "unknown.test") is None


# --------------------------------------------------------------------------- threads


def test_thread_of_message_ids_prefers_the_newest_email(rows: Rows) -> None:
    hot = rows.hot
    assert hot.thread_of_message_ids(rows.cid, ["<m2@x>"]) == rows.t2
    assert hot.thread_of_message_ids(rows.cid, ["<nope@x>", "<m2@x>", "<m1@x>"]) == rows.t1
    assert hot.thread_of_message_ids(rows.cid, []) is None
    assert hot.thread_of_message_ids(rows.cid, ["<m9@x>"]) is None  # another company's
    assert hot.thread_of_message_ids(rows.other, ["<m9@x>"]) == rows.t_other


def test_thread_of_index(rows: Rows) -> None:
    assert rows.hot.thread_of_index(rows.cid, "AQID") == rows.t1
    assert rows.hot.thread_of_index(rows.cid, "OTHER") is None
    assert rows.hot.thread_of_index(rows.cid, "AQIDBA") is None


def test_thread_candidates_within_the_window_newest_first(rows: Rows) -> None:
    hot = rows.hot
    assert hot.thread_candidates(rows.cid, "pilot", T - timedelta(days=30)) == [rows.t1, rows.t2]
    assert hot.thread_candidates(rows.cid, "pilot", T - timedelta(days=10)) == [rows.t1, rows.t2]
    assert hot.thread_candidates(rows.cid, "pilot", T - timedelta(days=9)) == [rows.t1]
    assert hot.thread_candidates(rows.cid, "pilot", T - timedelta(days=50)) == [
        rows.t1, rows.t2, rows.t_old]
    assert hot.thread_candidates(rows.cid, "other subject", T - timedelta(days=50)) == []
    for i in range(6):
        m.Thread.create(company=rows.cid, subject_key="busy", created_at=T,
                        last_at=T - timedelta(hours=i))
    busy = hot.thread_candidates(rows.cid, "busy", T - timedelta(days=1))
    assert len(busy) == 5 and busy == sorted(busy)  # the five most recent


def test_thread_shares_participant(rows: Rows) -> None:
    hot = rows.hot
    assert hot.thread_shares_participant(rows.t1, ["pat@acme.test"])
    assert hot.thread_shares_participant(rows.t1, ["x@y.test", "alice@example.com"])
    assert not hot.thread_shares_participant(rows.t1, ["quinn@mail.test"])
    assert not hot.thread_shares_participant(rows.t2, ["pat@acme.test"])
    assert not hot.thread_shares_participant(rows.t1, [])


def test_thread_row_and_deal(rows: Rows) -> None:
    hot = rows.hot
    assert hot.thread_row(rows.t1) == (rows.t1, None)
    hot.set_thread_deal(rows.t1, rows.d_open1)
    hot.set_thread_deal(rows.t1, rows.d_open2)  # a thread's deal is never replaced
    assert hot.thread_row(rows.t1) == (rows.t1, rows.d_open1)


def test_join_thread_moves_forward_and_tells_the_deal(rows: Rows) -> None:
    hot = rows.hot
    assert hot.join_thread(rows.t1, T - timedelta(days=1)) is None  # older: last_at stays
    assert m.Thread.get_by_id(rows.t1).last_at == T
    hot.set_thread_deal(rows.t1, rows.d_open1)
    assert hot.join_thread(rows.t1, T + timedelta(hours=3)) == rows.d_open1
    assert m.Thread.get_by_id(rows.t1).last_at == T + timedelta(hours=3)
    assert m.Thread.get_by_id(rows.t2).last_at == T - timedelta(days=10)  # only its row


# --------------------------------------------------------------------------- emails, deals


def test_email_by_key_sighting_and_links(rows: Rows) -> None:
    hot = rows.hot
    assert hot.email_by_key(rows.cid, "<m1@x>") == (rows.e1, rows.t1)
    assert hot.email_by_key(rows.cid, "<m9@x>") is None
    assert hot.email_by_key(rows.other, "<m9@x>") is not None
    assert hot.has_sighting(rows.e1, rows.alice)
    assert not hot.has_sighting(rows.e1, rows.bob)
    assert hot.links_of_email(rows.e1) == {(rows.p1, None, None), (None, rows.d_open1, None)}
    assert hot.links_of_email(rows.e2) == set()


def test_open_deals_of_the_persons(rows: Rows) -> None:
    hot = rows.hot
    assert hot.open_deals(rows.cid, [rows.p1]) == [(rows.d_open1, "First"),
                                                   (rows.d_open2, "Second")]
    assert hot.open_deals(rows.cid, [rows.p2, rows.p1]) == [
        (rows.d_open1, "First"), (rows.d_open2, "Second"), (rows.d_p2, "Quinn's")]
    assert hot.open_deals(rows.other, [rows.p1]) == []


@pytest.mark.parametrize(("state", "found"), [
    ("pending", True), ("asked", True), ("answered", False), ("void", False)])
def test_pending_for_thread(rows: Rows, state: str, found: bool) -> None:
    pc = m.PendingChoice.create(user=rows.alice, email=rows.e1, thread=rows.t1, person=rows.p1,
                                candidates_json="[]", state=state, created_at=T)
    assert rows.hot.pending_for_thread(rows.t1, rows.alice) == (pc.id if found else None)
    assert rows.hot.pending_for_thread(rows.t1, rows.bob) is None
    assert rows.hot.pending_for_thread(rows.t2, rows.alice) is None


# --------------------------------------------------------------------------- inserts


def test_insert_returns_the_id_the_orm_reads(rows: Rows) -> None:
    hot = rows.hot
    last = m.Thread.select().order_by(m.Thread.id.desc()).first().id
    when = datetime(2026, 11, 27, 8, 30, 15, 123456)
    tid = hot.insert(m.Thread, {"company": rows.cid, "subject_key": "fresh", "deal": None,
                                "created_at": when, "last_at": when})
    assert tid == last + 1
    row = m.Thread.get_by_id(tid)
    assert (row.subject_key, row.deal_id, row.created_at, row.last_at) == (
        "fresh", None, when, when)
    assert hot.insert(m.Thread, {"company": rows.cid, "subject_key": "next", "deal": None,
                                 "created_at": when, "last_at": when}) == tid + 1
    # And the ORM's own next insert does not collide with what the hot path wrote.
    assert m.Thread.create(company=rows.cid, subject_key="orm").id == tid + 2
    assert hot.thread_candidates(rows.cid, "fresh", when) == [tid]


def test_insert_many_writes_every_row(rows: Rows) -> None:
    hot = rows.hot
    hot.insert_many(m.Participant, [
        {"email": rows.e2, "address": f"p{i}@x.test", "name": f"P{i}", "role": "to",
         "person": rows.p2 if i == 0 else None} for i in range(3)])
    hot.insert_many(m.Participant, [])  # nothing to do
    assert sorted((p.address, p.name, p.role, p.person_id) for p in
                  m.Participant.select().where(m.Participant.email == rows.e2)) == [
        ("p0@x.test", "P0", "to", rows.p2), ("p1@x.test", "P1", "to", None),
        ("p2@x.test", "P2", "to", None)]
    assert rows.hot.thread_shares_participant(rows.t2, ["p2@x.test"])


def test_blobs_and_text_round_trip(rows: Rows) -> None:
    raw = bytes(range(256)) * 4
    # Every column, as record_email writes it: the hot path applies no model defaults.
    eid = rows.hot.insert(m.Email, {
        "company": rows.cid, "dedupe_key": "<blob@x>", "message_id": "<blob@x>",
        "content_hash": "h", "thread": rows.t2, "subject": "Grüße 👋 'quoted' \"text\"",
        "date": T, "from_address": "pat@acme.test", "from_name": "Pat", "to_json": "[]",
        "cc_json": "[]", "in_reply_to": None, "references": "", "thread_index": None,
        "snippet": "", "attachments_json": "[]", "size": len(raw), "raw": raw, "kind": "bcc",
        "forward_json": None, "created_at": T})
    email = m.Email.get_by_id(eid)
    assert (bytes(email.raw), email.subject, email.date) == (
        raw, "Grüße 👋 'quoted' \"text\"", T)
    assert rows.hot.email_by_key(rows.cid, "<blob@x>") == (eid, rows.t2)
