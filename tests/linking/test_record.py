"""Unit tests of ``linking.record.record_email``: which rows one received copy writes, on SQLite
and PostgreSQL.

Each test calls ``record_email`` directly, inside the store's transaction, with the example
config, the demo CRM (Ann: two open deals; Carl: "Pilot" open and "Old order" won; Dora: no
deal) and a message read by ``parse_message``. It proves: a customer is matched to a person by
any of the person's addresses and to an organization by domain; unknown correspondents become
persons (of no organization at a free-mail domain; none when ``create_unknown_persons`` is
off); the one open deal is linked, several open deals leave one pending choice per thread and
user, a ``+deal`` address wins (even another customer's deal, noted as a mismatch) and the
thread's deal is followed; a message joins a thread by References, by
Outlook's Thread-Index, or by subject and a shared participant within the window; the same
Message-ID from a second user is one email with two sightings, from the same user a
duplicate that writes nothing; mail among colleagues links no customer; the sighting's
visibility is the user's default, or quarantined.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from conftest import make_config
from support.crm import DemoCrm, add_demo_crm, row_counts
from support.mail import message, wire

from crmstore import models as m
from crmstore.db import Store
from dealmail.config import Config, User
from linking.originals import plain_original
from linking.parse import parse_message
from linking.record import Arrival, Directory, RecordResult, record_email

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def mail(frm: str = "Alice Admin <alice@example.com>", to: str = "Carl Other <carl@other.test>",
         subject: str = "Pilot plan", *, date: datetime = T0, **headers: str) -> bytes:
    e = message(frm=frm, to=to, subject=subject, **headers)
    e.replace_header("Date", format_datetime(date))
    return wire(e)


@dataclass
class World:
    store: Store
    config: Config
    crm: DemoCrm
    directory: Directory
    tmp_path: Path

    def user(self, address: str) -> User:
        found = self.config.find_user(address)
        assert found is not None
        return found[1]

    def record(self, raw: bytes, user: str | User = "alice@example.com", *,
               deal_id: int | None = None, quarantined: bool = False,
               config: Config | None = None) -> RecordResult:
        config = config or self.config
        directory = self.directory if config is self.config else Directory(config)
        who = self.user(user) if isinstance(user, str) else user
        company = config.company("example")
        assert company is not None
        parsed = parse_message(raw)
        arrival = Arrival(user=who, company=company, channel="bcc", queue_id="Q1",
                          received_at=T0, envelope_from=who.address, client_ip="127.0.0.1",
                          verification="trusted-network", deal_id=deal_id,
                          quarantined=quarantined)
        with self.store.transaction():
            return record_email(config, directory, plain_original(parsed, T0), raw, arrival)


@pytest.fixture
def world(store: Store, tmp_path: Path) -> Iterator[World]:
    config = make_config(tmp_path)
    crm = add_demo_crm(store)
    yield World(store, config, crm, Directory(config), tmp_path)


def links(email_id: int) -> set[tuple[int | None, int | None, int | None, str]]:
    return {(link.person_id, link.deal_id, link.organization_id, link.source)
            for link in m.Link.select().where(m.Link.email == email_id)}


def thread_deal(thread_id: int) -> int | None:
    deal: int | None = m.Thread.get_by_id(thread_id).deal_id
    return deal


# --------------------------------------------------------------------------- persons, deals


def test_one_open_deal_links_person_organization_and_deal(world: World) -> None:
    raw = mail()
    r = world.record(raw)
    crm = world.crm
    assert (r.new_email, r.duplicate, r.needs_choice) == (True, False, False)
    assert r.persons == [crm.carl]
    assert r.deal_id == crm.pilot  # not "Old order": won deals are never chosen
    assert links(r.email_id) == {(crm.carl, None, None, "auto"),
                                 (None, None, crm.other_ltd, "auto"),
                                 (None, crm.pilot, None, "auto")}
    assert thread_deal(r.thread_id) == crm.pilot
    email = m.Email.get_by_id(r.email_id)
    assert (email.from_address, email.subject, email.kind, email.size, bytes(email.raw)) == (
        "alice@example.com", "Pilot plan", "bcc", len(raw), raw)
    assert email.message_id == parse_message(raw).message_id
    assert email.date == T0.replace(tzinfo=None)
    assert sorted((p.address, p.role, p.person_id) for p in email.participants) == [
        ("alice@example.com", "from", None), ("carl@other.test", "to", crm.carl)]
    [sighting] = m.Sighting.select().where(m.Sighting.email == r.email_id)
    assert sighting.id == r.sighting_id
    assert (sighting.user.address, sighting.channel, sighting.visibility, sighting.queue_id) == (
        "alice@example.com", "bcc", "shared", "Q1")
    assert json.loads(sighting.decisions_json) == r.decisions
    assert any("only open deal" in d for d in r.decisions)


def test_person_matched_by_any_of_its_addresses(world: World) -> None:
    m.PersonAddress.create(person=world.crm.carl, company=world.crm.company,
                           address="carl.private@mail.test")
    persons_before = m.Person.select().count()
    r = world.record(mail(to="Carl <carl.private@mail.test>"))
    assert r.persons == [world.crm.carl] and r.deal_id == world.crm.pilot
    assert m.Person.select().count() == persons_before


def test_unknown_customer_becomes_a_person_of_the_organization_of_its_domain(
        world: World) -> None:
    r = world.record(mail(to="Eve Newcomer <eve@customer.test>"))
    [pid] = r.persons
    eve = m.Person.get_by_id(pid)
    assert (eve.name, eve.organization_id, eve.auto_created) == (
        "Eve Newcomer", world.crm.customer_inc, True)
    assert [a.address for a in eve.addresses] == ["eve@customer.test"]
    assert links(r.email_id) == {(pid, None, None, "auto"),
                                 (None, None, world.crm.customer_inc, "auto")}
    assert r.deal_id is None and not r.needs_choice
    assert any("no open deal" in d for d in r.decisions)


def test_unknown_correspondent_at_a_freemail_domain_is_a_person_of_no_organization(
        world: World) -> None:
    m.OrgDomain.create(organization=world.crm.other_ltd, company=world.crm.company,
                       domain="gmail.com")  # even a (wrongly) stored free-mail domain
    r = world.record(mail(to="Gina <gina@gmail.com>"))
    [pid] = r.persons
    gina = m.Person.get_by_id(pid)
    assert (gina.name, gina.organization_id, gina.auto_created) == ("Gina", None, True)
    assert links(r.email_id) == {(pid, None, None, "auto")}


def test_no_person_is_created_when_create_unknown_persons_is_off(world: World) -> None:
    config = make_config(world.tmp_path, "policy.create_unknown_persons=false")
    before = m.Person.select().count()
    r = world.record(mail(to="Eve <eve@customer.test>, Ann <ann@customer.test>"),
                     config=config)
    assert m.Person.select().count() == before
    assert r.persons == [world.crm.ann]  # a known person is still matched
    # The unknown address still names its organization by domain.
    assert (None, None, world.crm.customer_inc, "auto") in links(r.email_id)
    assert any("persons are not created" in d for d in r.decisions)


def test_several_open_deals_leave_one_pending_choice_per_thread_and_user(world: World) -> None:
    crm = world.crm
    first_raw = mail(to="Ann <ann@customer.test>", subject="Seats")
    first = world.record(first_raw)
    assert first.needs_choice and first.deal_id is None
    assert first.pending_choice_id is not None
    pending = m.PendingChoice.get_by_id(first.pending_choice_id)
    assert (pending.user.address, pending.email_id, pending.thread_id, pending.person_id,
            pending.state) == ("alice@example.com", first.email_id, first.thread_id, crm.ann,
                               "pending")
    assert json.loads(pending.candidates_json) == [crm.renewal, crm.upsell]
    assert not any(link[1] for link in links(first.email_id))  # no deal link yet

    first_id = parse_message(first_raw).message_id
    assert first_id is not None
    reply = world.record(mail(frm="Ann <ann@customer.test>", to="alice@example.com",
                              subject="Re: Seats", In_Reply_To=first_id))
    assert (reply.thread_id, reply.needs_choice) == (first.thread_id, True)
    assert reply.pending_choice_id == first.pending_choice_id
    assert m.PendingChoice.select().count() == 1

    bobs = world.record(mail(frm="Bob <bob@example.com>", to="ann@customer.test",
                             subject="Re: Seats", References=first_id), "bob@example.com")
    assert bobs.thread_id == first.thread_id and bobs.needs_choice
    assert bobs.pending_choice_id not in (None, first.pending_choice_id)
    assert sorted(p.user.address for p in m.PendingChoice.select()) == [
        "alice@example.com", "bob@example.com"]


def test_plus_deal_address_wins(world: World) -> None:
    crm = world.crm
    r = world.record(mail(to="Ann <ann@customer.test>"), deal_id=crm.upsell)
    assert (r.deal_id, r.needs_choice, r.pending_choice_id) == (crm.upsell, False, None)
    assert (None, crm.upsell, None, "address") in links(r.email_id)
    assert thread_deal(r.thread_id) == crm.upsell
    assert m.PendingChoice.select().count() == 0
    # Even a deal that is not the customer's own open deal: the sender named it.
    carl = world.record(mail(subject="Other topic"), deal_id=crm.renewal)
    assert carl.deal_id == crm.renewal
    assert carl.deal_mismatch is not None and carl.deal_mismatch.deal_id == crm.renewal
    assert r.deal_mismatch is None


def test_the_thread_deal_is_followed(world: World) -> None:
    crm = world.crm
    first_raw = mail()
    first = world.record(first_raw)
    assert first.deal_id == crm.pilot
    # Carl now has two open deals, but the thread already has its deal.
    m.Deal.create(company=crm.company, title="Extension", status="open", person=crm.carl)
    first_id = parse_message(first_raw).message_id
    assert first_id is not None
    reply = world.record(mail(frm="Carl <carl@other.test>", to="alice@example.com",
                              subject="Re: Pilot plan", In_Reply_To=first_id))
    assert (reply.thread_id, reply.deal_id, reply.needs_choice) == (
        first.thread_id, crm.pilot, False)
    assert (None, crm.pilot, None, "thread") in links(reply.email_id)


def test_automatic_deal_linking_off_for_the_user(world: World) -> None:
    alice = dataclasses.replace(world.user("alice@example.com"), auto_link_deals=False)
    r = world.record(mail(), alice)
    assert r.persons == [world.crm.carl] and r.deal_id is None and not r.needs_choice
    assert thread_deal(r.thread_id) is None
    assert any("automatic deal linking is off" in d for d in r.decisions)


# --------------------------------------------------------------------------- threads


def test_thread_by_references(world: World) -> None:
    first_raw = mail()
    first = world.record(first_raw)
    first_id = parse_message(first_raw).message_id
    assert first_id is not None
    # Another subject and another participant: only the reference ties them.
    other = world.record(mail(to="Dora <dora@customer.test>", subject="Something else",
                              References=f"<unknown@x.test> {first_id}"))
    assert other.thread_id == first.thread_id
    assert any("(references)" in d for d in other.decisions)
    by_reply = world.record(mail(to="dora@customer.test", subject="Third",
                                 In_Reply_To=first_id))
    assert by_reply.thread_id == first.thread_id


def test_thread_by_outlook_thread_index(world: World) -> None:
    conversation = bytes(range(22))
    first = world.record(mail(Thread_Index=base64.b64encode(conversation).decode()))
    child = base64.b64encode(conversation + b"\x01\x02\x03\x04\x05").decode()
    reply = world.record(mail(frm="Carl <carl@other.test>", to="alice@example.com",
                              subject="AW: Pilotplan", Thread_Index=child))
    assert reply.thread_id == first.thread_id
    assert any("(thread-index)" in d for d in reply.decisions)
    stranger = base64.b64encode(bytes(range(1, 23))).decode()
    assert world.record(mail(subject="AW: Pilotplan", Thread_Index=stranger)
                        ).thread_id != first.thread_id


def test_thread_by_subject_and_shared_participant_within_the_window(world: World) -> None:
    first = world.record(mail())
    later = T0 + timedelta(days=10)
    reply = world.record(mail(frm="Carl <carl@other.test>", to="alice@example.com",
                              subject="RE: Pilot plan", date=later))
    assert reply.thread_id == first.thread_id
    assert any("(subject and participant)" in d for d in reply.decisions)
    assert m.Thread.get_by_id(first.thread_id).last_at == later.replace(tzinfo=None)
    # Same subject, no shared customer: another conversation.
    dora = world.record(mail(to="dora@customer.test", subject="Re: Pilot plan", date=later))
    assert dora.thread_id != first.thread_id
    # Same subject and participant, but 31 days after the thread's last message.
    late = world.record(mail(frm="carl@other.test", to="alice@example.com",
                             subject="Re: Pilot plan", date=later + timedelta(days=31)))
    assert late.thread_id not in (first.thread_id, dora.thread_id)


# --------------------------------------------------------------------------- copies


def test_same_message_from_a_second_user_is_one_email_with_two_sightings(world: World) -> None:
    raw = mail(cc="Bob <bob@example.com>")
    alices = world.record(raw)
    after_first = row_counts()
    bobs = world.record(raw, "bob@example.com")
    assert (bobs.email_id, bobs.thread_id) == (alices.email_id, alices.thread_id)
    assert (bobs.new_email, bobs.duplicate) == (False, False)
    assert any("new sighting only" in d for d in bobs.decisions)
    assert m.Email.select().count() == after_first["Email"] == 1
    assert sorted((s.user.address, s.visibility) for s in m.Sighting.select()) == [
        ("alice@example.com", "shared"), ("bob@example.com", "private")]
    # The email's links and participants are not written twice.
    assert row_counts()["Link"] == after_first["Link"]
    assert row_counts()["Participant"] == after_first["Participant"]
    assert bobs.deal_id == world.crm.pilot


def test_same_message_from_the_same_user_again_writes_nothing(world: World) -> None:
    raw = mail()
    first = world.record(raw)
    before = row_counts()
    again = world.record(raw)
    assert (again.duplicate, again.new_email, again.sighting_id) == (True, False, None)
    assert (again.email_id, again.thread_id) == (first.email_id, first.thread_id)
    assert row_counts() == before


def test_mail_among_colleagues_links_no_customer(world: World) -> None:
    r = world.record(mail(to="Bob <bob@example.com>",
                          cc="alice.personal@mail.test, example@dealmail.localhost"))
    assert r.persons == [] and r.deal_id is None and not r.needs_choice
    assert links(r.email_id) == set()
    assert any("internal only" in d for d in r.decisions)
    assert m.Person.select().count() == 3  # nobody created for colleagues
    assert m.Sighting.select().count() == 1  # still the user's stored copy


def test_visibility_is_the_users_default_or_quarantined(world: World) -> None:
    bobs = world.record(mail(frm="bob@example.com", subject="Bob's"), "bob@example.com")
    quarantined = world.record(mail(subject="Suspicious"), quarantined=True)
    visibility = {s.email_id: s.visibility for s in m.Sighting.select()}
    assert visibility == {bobs.email_id: "private", quarantined.email_id: "quarantined"}
