"""A user's control over their own copies (crmstore/inbox.py), on the store directly: only the
user's own copy is ever touched, what each operation changes (and writes to the audit log),
and that forgetting the last copy removes the email and everything hanging on it — on SQLite
and PostgreSQL, with their foreign keys on."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from support.crm import add_demo_crm, empty_store

from crmstore import inbox
from crmstore import models as m
from crmstore.db import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "digest"))
from digest_world import World, after

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.fixture
def world(store: Store, tmp_path: Path) -> World:
    """The demo CRM on the session's store of each backend (emptied for each test)."""
    add_demo_crm(store)
    return World(make_config(tmp_path), store)


@pytest.fixture
def sqlite_world(backend_stores: Callable[[str], Store], tmp_path: Path) -> World:
    config = make_config(tmp_path)
    store = empty_store(backend_stores("sqlite"), config)
    add_demo_crm(store)
    return World(config, store)


def actor(w: World, address: str) -> inbox.Actor:
    domains = w.config.companies[0].internal_domains
    return inbox.Actor(user=m.User.get(m.User.address == address), via="test", now=NOW,
                       is_internal=lambda a: a.rpartition("@")[2] in domains,
                       freemail=frozenset(w.config.policy.freemail_domains))


def audit(action: str) -> list[dict[str, Any]]:
    return [json.loads(a.detail_json) for a in
            m.AuditEntry.select().where(m.AuditEntry.action == action).order_by(m.AuditEntry.id)]


def test_only_the_owner_s_own_copy(sqlite_world: World) -> None:
    w = sqlite_world
    ann = w.person("ann@customer.test")
    bob_private = w.email("p", sightings=[(BOB, "private")], person=ann)
    bob_shared = w.email("s", sightings=[(BOB, "shared")], person=ann)
    alice_forged = w.email("q", sightings=[(ALICE, "quarantined")], person=ann)
    alice = actor(w, ALICE)  # an admin
    for e in (bob_private, bob_shared, alice_forged):
        results = [inbox.set_visibility(alice, e.number, "shared"),
                   inbox.set_visibility(alice, e.number, "private", thread=True),
                   inbox.move_deal(alice, e.number, "Pilot"), inbox.unlink(alice, e.number),
                   inbox.add_person(alice, e.number, "dora@customer.test"),
                   inbox.forget(alice, e.number)]
        assert {(r.status, r.reason) for r in results} == {("refused", "unknown")}
        assert all(r.values == {} for r in results)  # nothing about the email itself
    assert inbox.describe(m.User.get(m.User.address == ALICE), bob_private.number) is None
    assert m.Sighting.select().count() == 3 and m.AuditEntry.select().count() == 0
    assert [s.visibility for s in m.Sighting.select().order_by(m.Sighting.id)] == [
        "private", "shared", "quarantined"]


def test_visibility_of_a_copy_and_of_a_thread(sqlite_world: World) -> None:
    w = sqlite_world
    thread = w.thread("plan")
    one = w.email("one", sightings=[(ALICE, "shared"), (BOB, "shared")], thread=thread)
    two = w.email("two", sightings=[(ALICE, "shared")], thread=thread)
    alice = actor(w, ALICE)
    assert inbox.set_visibility(alice, one.number, "private").status == "done"
    assert inbox.set_visibility(alice, one.number, "private").status == "unchanged"
    mine = {s.email_id: s.visibility for s in m.Sighting.select().where(
        m.Sighting.user == m.User.get(m.User.address == ALICE).id)}
    assert mine == {one.id: "private", two.id: "shared"}
    bob_copy = m.Sighting.get((m.Sighting.email == one.id)
                              & (m.Sighting.user == m.User.get(m.User.address == BOB).id))
    assert bob_copy.visibility == "shared"  # a colleague's copy is theirs
    result = inbox.set_visibility(alice, two.number, "private", thread=True)
    assert (result.status, result.values["count"]) == ("done", 2)
    [rule] = m.ThreadVisibility.select()
    assert (rule.thread_id, rule.visibility) == (thread.id, "private")
    assert [(d["handle"], d["before"], d["after"]) for d in audit("visibility")] == [
        (f"E{one.number}", "shared", "private")]
    assert [(d["before"], d["before_rule"], d["after"]) for d in audit("thread_visibility")] == [
        ({f"E{two.number}": "shared"}, None, "private")]


def test_move_and_unlink_a_thread(sqlite_world: World) -> None:
    w = sqlite_world
    ann = w.person("ann@customer.test")
    renewal, upsell, old = w.deal("Renewal 2027"), w.deal("Upsell seats"), w.deal("Old order")
    thread = w.thread("offer")
    first = w.email("offer", sightings=[(ALICE, "shared")], person=ann, thread=thread)
    second = w.email("re: offer", sightings=[(BOB, "private")], person=ann, thread=thread,
                     deal=renewal)
    m.PendingChoice.create(user=w.users[ALICE], email=first, thread=thread, person=ann,
                           candidates_json="[1, 2]", state="asked", created_at=after(1))
    alice = actor(w, ALICE)
    assert inbox.move_deal(alice, first.number, "seats").status == "done"
    thread = m.Thread.get_by_id(thread.id)
    assert thread.deal_id == upsell.id
    deal_links = {(lk.email_id, lk.thread_id, lk.deal_id, lk.source) for lk in
                  m.Link.select().where(m.Link.deal.is_null(False))}
    assert deal_links == {(None, thread.id, upsell.id, "user"),
                          (first.id, None, upsell.id, "user"),
                          (second.id, None, upsell.id, "user")}
    assert m.PendingChoice.get().state == "void"  # nothing left to ask
    # A closed deal may be chosen by hand (it never is automatically).
    assert inbox.move_deal(alice, first.number, str(old.id)).values["deal"]["status"] == "won"
    assert inbox.move_deal(alice, first.number, "#999").reason == "no_deal"
    assert inbox.move_deal(alice, first.number, "").reason == "no_target"
    assert inbox.unlink(alice, first.number).status == "done"
    assert m.Thread.get_by_id(thread.id).deal_id is None
    assert not m.Link.select().where(m.Link.deal.is_null(False)).exists()
    assert m.ThreadUnlinked.select().where(m.ThreadUnlinked.thread == thread.id).exists()
    assert inbox.unlink(alice, first.number).status == "unchanged"
    assert [(d["before"], d["after"]) for d in audit("deal")] == [
        ([renewal.id], upsell.id), ([upsell.id], old.id)]
    assert [(d["before"], d["after"]) for d in audit("unlink")] == [([old.id], None)]
    # Naming a deal again ends the unlinked state.
    inbox.move_deal(alice, first.number, "Pilot")
    assert not m.ThreadUnlinked.select().exists()


def test_add_a_person(sqlite_world: World) -> None:
    w = sqlite_world
    e = w.email("hello", sightings=[(ALICE, "shared")],
                to=[("Zoe New", "zoe@newco.test"), ("Ann", "ann@customer.test")])
    secret = w.new_person("Secret Contact", "secret@hidden.test")
    w.email("private intro", sightings=[(BOB, "private")], frm=("Bob", BOB),
            to=[("Secret Contact", "secret@hidden.test")], person=secret)
    alice = actor(w, ALICE)
    done = inbox.add_person(alice, e.number, "<zoe@newco.test>")
    assert (done.status, done.values["person"]["name"], done.values["person"]["created"]) == (
        "done", "Zoe New", True)
    zoe = m.Person.get(m.Person.name == "Zoe New")
    assert not zoe.auto_created
    assert m.Participant.get(m.Participant.address == "zoe@newco.test").person_id == zoe.id
    assert inbox.add_person(alice, e.number, "zoe@newco.test").status == "unchanged"
    # An existing person by address or by name, even one not among the participants.
    assert inbox.add_person(alice, e.number, "carl@other.test").status == "done"
    assert inbox.add_person(alice, e.number, "Dora").values["person"]["name"] == "Dora Customer"
    # A person only a colleague's private mail knows answers as an unknown address would.
    hidden = inbox.add_person(alice, e.number, "secret@hidden.test")
    stranger = inbox.add_person(alice, e.number, "nobody@hidden.test")
    assert (hidden.reason, stranger.reason) == ("not_participant", "not_participant")
    assert "Secret" not in json.dumps(hidden.values)
    assert inbox.add_person(alice, e.number, "Secret").reason == "no_person"
    assert inbox.add_person(alice, e.number, "bob@example.com").reason == "internal"
    assert inbox.add_person(alice, e.number, "Customer").reason == "ambiguous_person"
    linked = {lk.person_id for lk in m.Link.select().where(
        (m.Link.email == e.id) & m.Link.person.is_null(False))}
    assert linked == {zoe.id, w.person("carl@other.test").id, w.person("dora@customer.test").id}


def test_forget_removes_the_last_copy_and_all_that_hangs_on_it(world: World) -> None:
    w = world
    zed = w.new_person("Zed", "zed@newco.test")  # created automatically from this mail
    ann = w.person("ann@customer.test")
    thread = w.thread("intro")
    shared = w.email("both", sightings=[(ALICE, "shared"), (BOB, "private")], person=ann,
                     thread=thread)
    lonely = w.email("intro", sightings=[(ALICE, "shared")], to=[("Zed", "zed@newco.test")],
                     person=zed, deal=w.deal("Pilot"), thread=thread)
    m.PendingChoice.create(user=w.users[ALICE], email=lonely, thread=thread, person=zed,
                           candidates_json="[3]", state="asked", created_at=after(1))
    m.AuditEntry.create(at=after(1), company=w.company_id, actor=ALICE, action="replay",
                        email=lonely, detail_json="{}")
    alice = actor(w, ALICE)
    inbox.set_visibility(alice, lonely.number, "private", thread=True)
    # A copy a colleague also has: only Alice's copy goes.
    assert inbox.forget(alice, shared.number).values["deleted"] is False
    assert [s.user_id for s in m.Sighting.select().where(m.Sighting.email == shared.id)] == [
        w.users[BOB]]
    # The last copy: the email, its participants, links, questions and raw bytes.
    done = inbox.forget(alice, lonely.number)
    assert done.values["deleted"] is True and done.as_dict() == {
        "command": "forget", "target": f"E{lonely.number}", "status": "done", "reason": ""}
    assert not m.Email.select().where(m.Email.id == lonely.id).exists()
    for model, field in ((m.Participant, m.Participant.email), (m.Link, m.Link.email),
                         (m.PendingChoice, m.PendingChoice.email),
                         (m.Sighting, m.Sighting.email), (m.AuditEntry, m.AuditEntry.email)):
        assert not model.select().where(field == lonely.id).exists(), model
    assert not m.Person.select().where(m.Person.id == zed.id).exists()  # made from it alone
    assert m.Person.select().where(m.Person.id == ann.id).exists()  # imported: stays
    assert m.Thread.select().where(m.Thread.id == thread.id).exists()  # Bob's email is in it
    # Bob forgets his copy too: the thread is empty and goes, with its rules.
    assert inbox.forget(actor(w, BOB), shared.number).values["deleted"] is True
    assert not m.Thread.select().where(m.Thread.id == thread.id).exists()
    assert not m.ThreadVisibility.select().exists()
    assert m.Email.select().count() == 0
    assert [(d["handle"], d["email_deleted"]) for d in audit("forget")] == [
        (f"E{shared.number}", False), (f"E{lonely.number}", True),
        (f"E{shared.number}", True)]
    assert inbox.forget(alice, lonely.number).reason == "unknown"


def test_ignore_and_track(sqlite_world: World) -> None:
    w = sqlite_world
    alice = actor(w, ALICE)
    assert inbox.ignore(alice, "Ann@Customer.test").target == "ann@customer.test"
    assert inbox.ignore(alice, "@OTHER.test").status == "done"
    assert inbox.ignore(alice, "@other.test").status == "unchanged"
    assert inbox.ignore(alice, "@example.com").reason == "internal"
    assert inbox.ignore(alice, "bob@example.com").reason == "internal"
    assert inbox.ignore(alice, "not an address").reason == "bad_address"
    patterns = inbox.ignored_patterns(w.users[ALICE])
    assert patterns == {"ann@customer.test", "@other.test"}
    assert inbox.is_ignored("carl@other.test", patterns)
    assert inbox.is_ignored("ANN@customer.test", patterns)
    assert not inbox.is_ignored("dora@customer.test", patterns)
    assert not inbox.is_ignored("carl@sub.other.test", patterns)
    assert inbox.ignored_patterns(w.users[BOB]) == frozenset()
    assert inbox.track(alice, "@other.test").status == "done"
    assert inbox.track(alice, "@other.test").status == "unchanged"
    assert [(a.action, json.loads(a.detail_json)["pattern"]) for a in
            m.AuditEntry.select().order_by(m.AuditEntry.id)] == [
        ("ignore", "ann@customer.test"), ("ignore", "@other.test"), ("track", "@other.test")]
