"""Sender verification over SMTP: a client outside the trusted networks (bound to 127.0.0.2
while only 127.0.0.1 is trusted) must prove alice's From with an aligned DKIM signature.

DNS is the injected stub of tests/conftest.py; keys are generated at test start.
"""

from __future__ import annotations

import smtplib
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from crmstore import models as m
from dealmail.clock import FakeClock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from senderauth_support import message, rsa_key, sign

BCC = "example@dealmail.localhost"
UNTRUSTED = "127.0.0.2"


@pytest.fixture
def clock() -> FakeClock:
    """dkimpy stamps t= with the real time; a signature from the future is refused."""
    return FakeClock(datetime.now(UTC))


@pytest.fixture(scope="module")
def key() -> Any:
    return rsa_key(2048)


@pytest.fixture
def server(server_factory: Any, dns: Any, key: Any) -> Any:
    dns.txt["sel._domainkey.example.com"] = [key.txt]
    return server_factory("policy.trusted_networks=['127.0.0.1/32']")


def to_customer(raw: bytes) -> bytes:
    return raw.replace(b"To: Bob <bob@customer.test>", b"To: Carl <carl@other.test>")


def send(port: int, raw: bytes, mail_from: str = "alice@example.com") -> Any:
    with smtplib.SMTP("127.0.0.1", port, source_address=(UNTRUSTED, 0), timeout=30) as s:
        return s.sendmail(mail_from, [BCC], raw)


def refused(port: int, raw: bytes, **kw: Any) -> tuple[int, str]:
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(port, raw, **kw)
    return info.value.smtp_code, info.value.smtp_error.decode()


def test_signed_message_from_untrusted_network_is_strong(server: Any, key: Any) -> None:
    raw = sign(to_customer(message()), "example.com", key)
    send(server.port, raw)
    [sighting] = list(m.Sighting.select())
    assert sighting.verification == "strong"
    from crmstore.queries import stored_copy

    stored = stored_copy(sighting)
    assert stored.startswith(b"Authentication-Results: dealmail.localhost;")
    assert stored.endswith(raw)  # the message itself exactly as received
    assert b"dkim=pass" in stored.split(b"\r\n\r\n")[0]


def test_changed_body_refused(server: Any, key: Any) -> None:
    raw = sign(to_customer(message()), "example.com", key)
    tampered = raw.replace(b"the quote is attached", b"the quote is attachez")
    code, text = refused(server.port, tampered)
    assert code == 550 and text.startswith("5.7.1")
    assert m.Email.select().count() == 0


def test_unaligned_signature_refused_with_reason(server: Any, key: Any, dns: Any) -> None:
    dns.txt["sel._domainkey.evil.test"] = [key.txt]
    raw = sign(to_customer(message()), "evil.test", key)
    code, text = refused(server.port, raw)
    assert code == 550 and "not aligned" in text
    assert m.Email.select().count() == 0


def test_unsigned_refused(server: Any) -> None:
    code, text = refused(server.port, to_customer(message()))
    assert code == 550 and text.startswith("5.7.1")


def test_dns_timeout_defers(server: Any, key: Any, dns: Any) -> None:
    dns.fail.add("sel._domainkey.example.com")
    code, text = refused(server.port, sign(to_customer(message()), "example.com", key))
    assert code == 451 and text.startswith("4.7.5")
    assert m.Email.select().count() == 0


def test_replay_from_elsewhere_is_one_email_and_audited(server: Any, key: Any) -> None:
    raw = sign(to_customer(message()), "example.com", key)
    send(server.port, raw)
    send(server.port, raw, mail_from="attacker@evil.test")  # verbatim replay
    assert m.Email.select().count() == 1 and m.Sighting.select().count() == 1
    [audit] = list(m.AuditEntry.select().where(m.AuditEntry.action == "replay"))
    assert "attacker@evil.test" in audit.detail_json


def test_quarantine_policy_stores_invisible(server_factory: Any, dns: Any, key: Any) -> None:
    running = server_factory(
        "policy.trusted_networks=['127.0.0.1/32']", "server.demo_data=''",
        "companies=[{slug='example', name='Example', internal_domains=['example.com'], "
        "sender_verification={minimum='strong', on_unverified='quarantine'}, "
        "users=[{address='alice@example.com'}]}]")
    send(running.port, to_customer(message()))
    [sighting] = list(m.Sighting.select())
    assert sighting.visibility == "quarantined" and sighting.verification == "none"
    from crmstore.visibility import can_see

    alice = m.User.get(m.User.address == "alice@example.com")
    assert not can_see(alice, sighting.email_id)


def test_attached_original_signature_is_recorded(server_factory: Any, dns: Any,
                                                 key: Any) -> None:
    """A forwarded original attached as message/rfc822 keeps its own DKIM evidence."""
    import json

    dns.txt["sel._domainkey.customer.test"] = [key.txt]
    original = sign(message(from_value="Bob <bob@customer.test>")
                    .replace(b"To: Bob <bob@customer.test>", b"To: Alice <alice@example.com>"),
                    "customer.test", key)
    fwd = (b"From: Alice <alice@example.com>\r\nSubject: Fwd: Quote\r\n"
           b"Message-ID: <fwd-att@example.com>\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
           b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
           b"--b1\r\nContent-Type: message/rfc822\r\n\r\n" + original +
           b"\r\n--b1--\r\n")
    running = server_factory()  # trusted network: alice herself needs no signature here
    with smtplib.SMTP("127.0.0.1", running.port) as s:
        s.sendmail("alice@example.com", [BCC], fwd)
    stored = m.Email.get(m.Email.from_address == "bob@customer.test")
    forward = json.loads(stored.forward_json)
    assert [sig["valid"] for sig in forward["dkim"]] == [True]
    assert forward["dkim"][0]["domain"] == "customer.test"


def test_replay_with_an_added_cc_creates_nobody(server: Any, key: Any) -> None:
    """Anyone who received alice's signed mail once re-sends it with a Cc and a Reply-To
    inserted: the signature covers neither, so it is not alice's at level strong (refused
    from an untrusted network), and no person is made of the added address."""
    raw = sign(to_customer(message(message_id="<replayed@example.com>")), "example.com", key)
    replay = raw.replace(b"Subject: Quote", b"Cc: Victim <victim@evil.test>\r\n"
                         b"Reply-To: victim@evil.test\r\nSubject: Quote")
    code, text = refused(server.port, replay, mail_from="attacker@evil.test")
    assert code == 550 and "h= does not cover every cc header" in text
    assert m.Email.select().count() == 0
    assert m.PersonAddress.select().where(
        m.PersonAddress.address == "victim@evil.test").count() == 0
    send(server.port, raw)  # the message as signed is still alice's
    assert m.Sighting.get().verification == "strong"


def test_linking_reads_only_the_headers_the_signature_covers(server: Any,
                                                             monkeypatch: Any) -> None:
    """When a level rests on a signature (DKIM, ARC), linking ignores an address header it
    does not wholly cover: no participant, no person; the stored raw message keeps it."""
    from linking.capture import Verification

    gate = server.app.capture.gate
    real = gate.verifier

    def covered_without_cc(*args: Any) -> Verification:
        verdict = real(*args)
        verdict.level, verdict.accepted = "strong", True
        verdict.covered = frozenset({"from", "to", "subject", "date", "message-id"})
        return verdict

    monkeypatch.setattr(gate, "verifier", covered_without_cc)
    raw = to_customer(message(message_id="<cover@example.com>")).replace(
        b"Subject: Quote", b"Cc: Victim <victim@evil.test>\r\nSubject: Quote")
    send(server.port, raw)
    email = m.Email.get(m.Email.message_id == "<cover@example.com>")
    assert b"Cc: Victim <victim@evil.test>" in bytes(email.raw)
    assert [p.address for p in email.participants] == ["alice@example.com",
                                                       "carl@other.test"]
    assert email.cc_json == "[]"
    assert m.PersonAddress.select().where(
        m.PersonAddress.address == "victim@evil.test").count() == 0
