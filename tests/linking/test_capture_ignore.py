"""The capture path and a user's ignore list, for every kind of source: a relayed copy
(trust ``login``), a copy from the user's own mailbox (trust ``mailbox``, as mailbox sync and
the LMTP listener hand them over) and a Smart BCC copy (trust ``verify``) go through the same
check. A message whose customers the user all ignores is accepted and not tracked; in a
message with other customers the ignored one is neither linked nor made a person; the list is
the user's own. When the CRM learns the address later (linking/relink.py), an email every
holder of which ignores it stays unlinked from it, and a thread a user unlinked gets no deal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support.mail import message, wire

from crmstore import models as m
from crmstore.db import Store
from dealmail.config import Config
from linking.capture import (
    Capture,
    CaptureRequest,
    Disposition,
    Evidence,
    Outcome,
    SenderGate,
    Trust,
    Verification,
)
from linking.record import Directory
from linking.relink import relink_addresses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "digest"))
from digest_world import open_store

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
ALICE, BOB = "alice@example.com", "bob@example.com"


def believe(*_args: Any) -> Verification:
    return Verification(level="trusted-network", reason="test", accepted=True)


@pytest.fixture
def capture(tmp_path: Path) -> Iterator[tuple[Capture, Config, Store]]:
    config, store = open_store(tmp_path)
    directory = Directory(config)
    try:
        yield (Capture(lambda: config, lambda: directory, lambda: NOW,
                       SenderGate(lambda: config, believe)), config, store)
    finally:
        store.close()


def take(env: tuple[Capture, Config, Store], user: str, to: str, subject: str,
         trust: Trust, channel: str) -> Disposition:
    capture, config, store = env
    company = config.companies[0]
    found = config.find_user(user)
    assert found is not None
    raw = wire(message(frm=f"U <{user}>", to=to, subject=subject))
    request = CaptureRequest(raw=raw, channel=channel, company=company, queue_id="Q",
                             evidence=Evidence(client_ip="127.0.0.1"), trust=trust,
                             user=None if trust is Trust.VERIFY else found[1])
    prepared = capture.prepare(request)
    if isinstance(prepared, Disposition):
        return prepared
    with store.transaction():
        return prepared()


def ignore(user: str, pattern: str) -> None:
    m.IgnoredCorrespondent.create(user=m.User.get(m.User.address == user), pattern=pattern,
                                  created_at=NOW.replace(tzinfo=None))


@pytest.mark.parametrize("trust,channel", [(Trust.LOGIN, "relay"), (Trust.MAILBOX, "imap"),
                                           (Trust.VERIFY, "bcc")])
def test_every_source_applies_the_ignore_list(capture: Any, trust: Trust, channel: str) -> None:
    ignore(ALICE, "@other.test")
    ignore(ALICE, "ann@customer.test")
    done = take(capture, ALICE, "Carl <carl@other.test>, Ann <ann@customer.test>",
                "only ignored", trust, channel)
    assert (done.outcome, done.reason) == (Outcome.IGNORED,
                                           "only correspondents this user does not track")
    assert m.Email.select().count() == 0
    done = take(capture, ALICE, "Carl <carl@other.test>, Dora <dora@customer.test>, "
                "Zed <zed@newco.test>", "mixed", trust, channel)
    assert done.outcome is Outcome.STORED
    [result] = done.results
    email = m.Email.get_by_id(result.email_id)
    persons = {m.Person.get_by_id(lk.person_id).name for lk in m.Link.select().where(
        (m.Link.email == email.id) & m.Link.person.is_null(False))}
    assert persons == {"Dora Customer", "Zed"}  # Carl ignored; Zed (new) created
    assert not m.Link.select().where(m.Link.deal.is_null(False)).exists()  # not Carl's Pilot
    assert any("carl@other.test: a correspondent this user does not track" in d
               for d in result.decisions)
    # The participants are the email's own data and stay; Carl's has no person.
    carl = m.Participant.get((m.Participant.email == email.id)
                             & (m.Participant.address == "carl@other.test"))
    assert carl.person_id is None
    # Bob's list is his own: his copy to Carl is tracked and linked to Carl's deal.
    done = take(capture, BOB, "Carl <carl@other.test>", "bob's", trust, channel)
    assert done.outcome is Outcome.STORED
    assert m.Link.select().where(m.Link.deal.is_null(False)).exists()


def test_internal_mail_to_the_company_address_is_not_affected(capture: Any) -> None:
    ignore(ALICE, "@other.test")
    done = take(capture, ALICE, "Bob <bob@example.com>", "lunch", Trust.VERIFY, "bcc")
    assert done.outcome is Outcome.STORED


def test_relink_respects_ignore_lists_and_unlinked_threads(capture: Any) -> None:
    _capture, config, store = capture
    ignore(ALICE, "eve@newco.test")
    take(capture, ALICE, "Eve <eve@newco.test>, Dora <dora@customer.test>", "ignored eve",
         Trust.VERIFY, "bcc")
    take(capture, BOB, "Eve <eve@newco.test>", "bob's eve", Trust.VERIFY, "bcc")
    bobs = m.Email.get(m.Email.subject == "bob's eve")
    alices = m.Email.get(m.Email.subject == "ignored eve")
    eve = m.Person.get(m.Person.name == "Eve")  # made from Bob's copy
    assert m.Participant.get((m.Participant.email == alices.id)
                             & (m.Participant.address == "eve@newco.test")).person_id is None
    # Eve gets a deal; Bob's thread is taken off any deal by hand, then the CRM relinks.
    company = m.Company.get()
    m.Deal.create(company=company, title="Eve's", status="open", person=eve)
    m.ThreadUnlinked.create(thread=bobs.thread_id, user=m.User.get(m.User.address == BOB))
    m.Participant.update(person=None).where(m.Participant.email == bobs.id).execute()
    m.Link.delete().where(m.Link.email == bobs.id).execute()
    with store.transaction():
        report = relink_addresses(config, config.companies[0], company.id,
                                  ["eve@newco.test"], NOW)
    assert report.emails == 1  # Bob's; Alice ignores Eve and is the only one with hers
    assert m.Link.select().where((m.Link.email == bobs.id) & (m.Link.person == eve.id)).exists()
    assert not m.Link.select().where((m.Link.email == alices.id)
                                     & (m.Link.person == eve.id)).exists()
    assert m.Thread.get_by_id(bobs.thread_id).deal_id is None
    assert not m.PendingChoice.select().exists()
