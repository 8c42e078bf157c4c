"""Unit tests of ``linking.capture``: the one capture rig, called directly with a real store
(SQLite and PostgreSQL), the example config, a fake clock and a fake sender verifier.

Proves: ``Capture.prepare`` answers with a :class:`Disposition` and writes nothing for an
unreadable message (refused, 5.6.0), an automatic one (ignored), a sender who is not a user or
is not believed (refused, 5.7.1), a verifier's temporary error (deferred, 4.7.5); a quarantine
verdict is stored as quarantined; otherwise it returns a Commit that, run in the store's
transaction, stores the copy with the verdict as evidence and runs the hooks once per newly
recorded copy (not for a repeat, which is answered REPEAT and writes nothing but a replay
audit entry when it came from elsewhere). The relay, MTA and IMAP channels ignore mail with no
customer among its participants (envelope recipients included), the Smart BCC address never
does. ``Trust.LOGIN`` refuses a From, Sender or Resent-From that is not the user's and never
asks the verifier; ``Trust.MAILBOX`` accepts any From. A forward to the company address with
an empty To becomes channel ``forward``, stored with the original's participants.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from support.crm import DemoCrm, add_demo_crm, row_counts
from support.mail import message, wire

from crmstore import models as m
from crmstore.db import Store
from dealmail.clock import FakeClock
from dealmail.config import Company, Config, User
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
from linking.parse import ParsedMessage, parse_message
from linking.record import Directory, RecordResult

NOW = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
AR_HEADER = "Authentication-Results: dealmail.localhost; iprev=pass (trusted network)"
ACCEPTED = Verification("trusted-network", "client in a trusted network", True,
                        evidence={"method": "trusted-network"}, header=AR_HEADER)


@dataclass
class FakeVerifier:
    """A :data:`linking.capture.Verifier` answering ``verdict`` and noting whom it was asked
    about."""

    verdict: Verification = field(default_factory=lambda: ACCEPTED)
    calls: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, raw: bytes, parsed: ParsedMessage, evidence: Evidence, company: Company,
                 user: User) -> Verification:
        self.calls.append((user.address, parsed.from_.address))
        return self.verdict


@dataclass
class Rig:
    store: Store
    config: Config
    crm: DemoCrm
    verifier: FakeVerifier
    capture: Capture
    hooked: list[tuple[int, str, str]]

    @property
    def company(self) -> Company:
        company = self.config.company("example")
        assert company is not None
        return company

    def user(self, address: str) -> User:
        return next(u for u in self.company.users if u.address == address)

    def request(self, raw: bytes, *, channel: str = "bcc", trust: Trust = Trust.VERIFY,
                user: str | None = None, deal_id: int | None = None,
                recipients: tuple[str, ...] = (), client_ip: str = "127.0.0.1",
                details: dict[str, Any] | None = None) -> CaptureRequest:
        evidence = Evidence(client_ip=client_ip, helo="client.test",
                            envelope_from=user or "alice@example.com",
                            authenticated_as=user if trust is Trust.LOGIN else None,
                            tls=trust is Trust.LOGIN, details=details or {})
        return CaptureRequest(raw=raw, channel=channel, company=self.company, queue_id="QID1",
                              evidence=evidence, trust=trust,
                              user=self.user(user) if user else None, deal_id=deal_id,
                              recipients=recipients)

    def run(self, request: CaptureRequest) -> Disposition:
        """prepare, then the commit in the store's transaction (as the committer runs it)."""
        prepared = self.capture.prepare(request)
        if isinstance(prepared, Disposition):
            return prepared
        with self.store.transaction():
            return prepared()

    def send(self, raw: bytes, **kw: Any) -> Disposition:
        return self.run(self.request(raw, **kw))


@pytest.fixture
def rig(store: Store, tmp_path: Path) -> Iterator[Rig]:
    config = make_config(tmp_path)
    crm = add_demo_crm(store)
    directory = Directory(config)
    verifier = FakeVerifier()
    clock = FakeClock(NOW)
    capture = Capture(lambda: config, lambda: directory, clock.now,
                      SenderGate(lambda: config, verifier))
    hooked: list[tuple[int, str, str]] = []

    def hook(result: RecordResult, user: User, company: Company) -> None:
        hooked.append((result.email_id, user.address, company.slug))

    capture.add_hook(hook)
    yield Rig(store, config, crm, verifier, capture, hooked)


def mail(frm: str = "Alice Admin <alice@example.com>", to: str = "Carl <carl@other.test>",
         **kw: Any) -> bytes:
    return wire(message(frm=frm, to=to, **kw))


def nothing_written(rig: Rig, before: dict[str, int],
                    run: Callable[[], Disposition]) -> Disposition:
    done = run()
    assert row_counts() == before
    assert rig.hooked == []
    return done


# --------------------------------------------------------------------------- prepare's answers


def test_unreadable_message_is_refused_before_the_gate(rig: Rig) -> None:
    raw = b"To: carl@other.test\r\nSubject: no sender\r\n\r\nHello\r\n"
    done = nothing_written(rig, row_counts(), lambda: rig.send(raw))
    assert (done.outcome, done.status, done.final, done.accepted) == (
        Outcome.REFUSED_CONTENT, "5.6.0", True, False)
    assert done.reason == "no From header" and done.user is None
    assert rig.verifier.calls == []


def test_automatic_message_is_accepted_and_ignored(rig: Rig) -> None:
    raw = mail(Auto_Submitted="auto-replied")
    done = nothing_written(rig, row_counts(), lambda: rig.send(raw))
    assert (done.outcome, done.accepted, done.final) == (Outcome.IGNORED, True, True)
    assert "automatic message" in done.reason
    assert rig.verifier.calls == []


def test_sender_who_is_not_a_user_is_refused(rig: Rig) -> None:
    raw = mail(frm="Carl <carl@other.test>", to="alice@example.com")
    done = nothing_written(rig, row_counts(), lambda: rig.send(raw))
    assert (done.outcome, done.status, done.user) == (Outcome.REFUSED_SENDER, "5.7.1", None)
    assert "<carl@other.test> is not allowed" in done.reason
    assert rig.verifier.calls == []


def test_user_who_is_not_believed_is_refused(rig: Rig) -> None:
    rig.verifier.verdict = Verification("none", "no aligned DKIM signature", False)
    done = nothing_written(rig, row_counts(), lambda: rig.send(mail()))
    assert (done.outcome, done.status, done.final) == (Outcome.REFUSED_SENDER, "5.7.1", True)
    assert done.user is not None and done.user.address == "alice@example.com"
    assert "no aligned DKIM signature" in done.reason
    assert rig.verifier.calls == [("alice@example.com", "alice@example.com")]


def test_alternate_address_asks_the_verifier_about_its_user(rig: Rig) -> None:
    done = rig.send(mail(frm="Alice <alice.personal@mail.test>"))
    assert done.outcome is Outcome.STORED
    assert rig.verifier.calls == [("alice@example.com", "alice.personal@mail.test")]


def test_verifier_temporary_error_defers(rig: Rig) -> None:
    rig.verifier.verdict = Verification("none", "DNS timeout", False, temp_error=True)
    done = nothing_written(rig, row_counts(), lambda: rig.send(mail()))
    assert (done.outcome, done.status, done.final, done.accepted) == (
        Outcome.DEFERRED, "4.7.5", False, False)
    assert "DNS timeout" in done.reason


def test_quarantine_verdict_stores_the_copy_quarantined(rig: Rig) -> None:
    rig.verifier.verdict = Verification("spf", "SPF only", False, quarantine=True)
    done = rig.send(mail())
    assert (done.outcome, done.quarantined, done.accepted) == (Outcome.STORED, True, True)
    [sighting] = m.Sighting.select()
    assert (sighting.visibility, sighting.verification) == ("quarantined", "spf")
    # A handler that cannot use a quarantined copy (+ask) is refused instead.
    parsed = parse_message(mail())
    refused = rig.capture.gate.admit(parsed, rig.request(mail()), allow_quarantine=False)
    assert isinstance(refused, Disposition) and refused.outcome is Outcome.REFUSED_SENDER


# --------------------------------------------------------------------------- the commit


def test_prepare_writes_nothing_and_its_commit_stores_and_runs_the_hooks(rig: Rig) -> None:
    before = row_counts()
    prepared = rig.capture.prepare(rig.request(mail(), deal_id=None))
    assert not isinstance(prepared, Disposition)
    assert row_counts() == before and rig.hooked == []
    with rig.store.transaction():
        done = prepared()
    assert (done.outcome, done.accepted, done.quarantined) == (Outcome.STORED, True, False)
    assert done.user is not None and done.user.address == "alice@example.com"
    [result] = done.results
    assert done.email_ids == [result.email_id]
    assert (result.persons, result.deal_id) == ([rig.crm.carl], rig.crm.pilot)
    assert rig.hooked == [(result.email_id, "alice@example.com", "example")]
    sighting = m.Sighting.get(m.Sighting.email == result.email_id)
    assert (sighting.channel, sighting.verification, sighting.queue_id, sighting.client_ip,
            sighting.envelope_from) == ("bcc", "trusted-network", "QID1", "127.0.0.1",
                                        "alice@example.com")
    assert sighting.received_at == NOW.replace(tzinfo=None)  # the capture's clock
    evidence = json.loads(sighting.evidence_json)
    assert evidence == {"method": "trusted-network", "authentication_results": AR_HEADER}


def test_repeat_is_answered_repeat_runs_no_hook_and_notes_a_replay(rig: Rig) -> None:
    raw = mail()
    first = rig.send(raw)
    before = row_counts()
    again = rig.send(raw)
    assert (again.outcome, again.accepted) == (Outcome.REPEAT, True)
    assert again.email_ids == first.email_ids
    assert row_counts() == before
    assert len(rig.hooked) == 1
    # The same signed bytes from another network: still a repeat, and an audit entry.
    replay = rig.send(raw, client_ip="203.0.113.9")
    assert replay.outcome is Outcome.REPEAT and len(rig.hooked) == 1
    [audit] = m.AuditEntry.select()
    assert (audit.action, audit.actor, audit.email_id) == (
        "replay", "alice@example.com", first.email_ids[0])
    assert json.loads(audit.detail_json)["client_ip"] == "203.0.113.9"


def test_another_users_copy_of_the_same_message_runs_the_hooks_for_that_user(
        rig: Rig) -> None:
    raw = mail(cc="Bob <bob@example.com>")
    alices = rig.send(raw)
    bobs = rig.send(raw, channel="imap", trust=Trust.MAILBOX, user="bob@example.com")
    assert bobs.outcome is Outcome.STORED and bobs.email_ids == alices.email_ids
    assert not bobs.results[0].new_email
    assert [who for _e, who, _c in rig.hooked] == ["alice@example.com", "bob@example.com"]
    assert m.Email.select().count() == 1 and m.Sighting.select().count() == 2


def test_requested_deal_reaches_the_record(rig: Rig) -> None:
    done = rig.send(mail(to="Ann <ann@customer.test>"), deal_id=rig.crm.upsell)
    assert done.results[0].deal_id == rig.crm.upsell
    assert not done.results[0].needs_choice


# --------------------------------------------------------------------------- channels


@pytest.mark.parametrize(("channel", "trust"), [
    ("relay", Trust.LOGIN), ("mta", Trust.MAILBOX), ("imap", Trust.MAILBOX)])
def test_automatic_channels_ignore_mail_without_a_customer(rig: Rig, channel: str,
                                                           trust: Trust) -> None:
    internal = mail(to="Bob <bob@example.com>", cc="example@dealmail.localhost")
    done = nothing_written(rig, row_counts(), lambda: rig.send(
        internal, channel=channel, trust=trust, user="alice@example.com"))
    assert (done.outcome, done.accepted) == (Outcome.IGNORED, True)
    assert done.reason == "no customer among the participants"
    assert done.user is not None and done.user.address == "alice@example.com"
    stored = rig.send(mail(), channel=channel, trust=trust, user="alice@example.com")
    assert stored.outcome is Outcome.STORED
    assert m.Sighting.get(m.Sighting.email == stored.email_ids[0]).channel == channel


def test_a_customer_among_the_envelope_recipients_is_enough(rig: Rig) -> None:
    done = rig.send(mail(to="Bob <bob@example.com>"), channel="relay", trust=Trust.LOGIN,
                         user="alice@example.com", recipients=("bob@example.com",
                                                               "Carl@Other.test"))
    assert done.outcome is Outcome.STORED


def test_the_bcc_address_keeps_mail_among_colleagues(rig: Rig) -> None:
    done = rig.send(mail(to="Bob <bob@example.com>"))
    assert done.outcome is Outcome.STORED
    assert done.results[0].persons == []


# --------------------------------------------------------------------------- trust


@pytest.mark.parametrize("headers", [
    {"frm": "Bob <bob@example.com>"},
    {"Sender": "mallory@evil.test"},
    {"Resent_From": "Mallory <mallory@evil.test>"},
    {"Resent_Sender": "bob@example.com"},
])
def test_login_refuses_an_originator_that_is_not_the_users(rig: Rig,
                                                           headers: dict[str, str]) -> None:
    raw = mail(**headers)
    done = nothing_written(rig, row_counts(), lambda: rig.send(
        raw, channel="relay", trust=Trust.LOGIN, user="alice@example.com"))
    assert (done.outcome, done.status) == (Outcome.REFUSED_SENDER, "5.7.1")
    assert "not owned by user alice@example.com" in done.reason
    assert rig.verifier.calls == []


def test_login_refuses_an_unreadable_sender_header(rig: Rig) -> None:
    done = rig.send(mail(Sender="not an address"), channel="relay", trust=Trust.LOGIN,
                         user="alice@example.com")
    assert (done.outcome, done.status, done.reason) == (
        Outcome.REFUSED_CONTENT, "5.6.0", "unreadable Sender header")


def test_login_accepts_the_users_addresses_without_the_verifier(rig: Rig) -> None:
    done = rig.send(mail(frm="Alice <alice.personal@mail.test>",
                              Sender="alice@example.com"),
                         channel="relay", trust=Trust.LOGIN, user="alice@example.com")
    assert done.outcome is Outcome.STORED
    assert rig.verifier.calls == []
    sighting = m.Sighting.get(m.Sighting.email == done.email_ids[0])
    assert (sighting.channel, sighting.verification) == ("relay", "authenticated")
    evidence = json.loads(sighting.evidence_json)
    assert (evidence["method"], evidence["login"], evidence["tls"]) == (
        "smtp-auth", "alice@example.com", True)
    assert evidence["authentication_results"].endswith(
        "; auth=pass smtp.auth=alice@example.com")


def test_mailbox_accepts_any_from(rig: Rig) -> None:
    done = rig.send(mail(frm="Carl <carl@other.test>", to="Alice <alice@example.com>"),
                         channel="imap", trust=Trust.MAILBOX, user="alice@example.com",
                         details={"mailbox": "INBOX", "uid": 7})
    assert done.outcome is Outcome.STORED
    assert rig.verifier.calls == []
    [result] = done.results
    assert (result.persons, result.deal_id) == ([rig.crm.carl], rig.crm.pilot)
    sighting = m.Sighting.get(m.Sighting.email == result.email_id)
    assert (sighting.channel, sighting.verification) == ("imap", "mailbox")
    assert json.loads(sighting.evidence_json) == {"method": "mailbox", "mailbox": "INBOX",
                                                  "uid": 7}


@pytest.mark.parametrize("trust", [Trust.LOGIN, Trust.MAILBOX])
def test_trust_without_a_user_is_a_programming_error(rig: Rig, trust: Trust) -> None:
    with pytest.raises(ValueError, match="needs the request's user"):
        rig.capture.prepare(rig.request(mail(), channel="relay", trust=trust))


# --------------------------------------------------------------------------- forwards

FORWARD_BODY = (
    "FYI, see Ann's answer below.\n\n"
    "---------- Forwarded message ---------\n"
    "From: Ann Customer <ann@customer.test>\n"
    "Date: Thu, Nov 26, 2026 at 10:03 AM\n"
    "Subject: Re: Proposal\n"
    "To: Alice <alice@example.com>\n\n"
    "Thanks Alice, we would like 20 more seats.\n")


def forward(to: str | None) -> bytes:
    e = message(frm="Alice <alice@example.com>", to=to or "", subject="Fwd: Re: Proposal",
                body=FORWARD_BODY)
    if to is None:
        del e["To"]
    return wire(e)


def test_forward_to_the_bcc_address_is_stored_as_the_original(rig: Rig) -> None:
    done = rig.send(forward(to=None))
    assert done.outcome is Outcome.STORED
    [result] = done.results
    email = m.Email.get_by_id(result.email_id)
    assert (email.kind, email.from_address, email.subject) == (
        "forward", "ann@customer.test", "Re: Proposal")
    assert "20 more seats" in email.snippet
    assert json.loads(email.forward_json)["note"].startswith("FYI")
    assert sorted((p.address, p.role) for p in email.participants) == [
        ("alice@example.com", "to"), ("ann@customer.test", "from")]
    assert result.persons == [rig.crm.ann] and result.needs_choice
    assert m.Sighting.get(m.Sighting.email == email.id).channel == "forward"
    # The forward is alice's: the gate asked about alice, not about Ann.
    assert rig.verifier.calls == [("alice@example.com", "alice@example.com")]


def test_forward_text_in_a_mail_to_a_customer_is_a_bcc_copy(rig: Rig) -> None:
    done = rig.send(forward(to="Carl <carl@other.test>"))
    email = m.Email.get_by_id(done.email_ids[0])
    assert (email.kind, email.from_address) == ("bcc", "alice@example.com")
    assert m.Sighting.get(m.Sighting.email == email.id).channel == "bcc"
