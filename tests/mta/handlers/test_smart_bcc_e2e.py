"""Smart BCC end to end: real dealmail listener on a loopback port, real smtplib and swaks.

Each test starts the server with the example config and the demo CRM (Ann with two open
deals, Carl with one open and one won deal, Dora with none) in a fresh SQLite file.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from email.header import Header
from email.message import EmailMessage
from typing import Any

import pytest
from support.mail import message, wire

from crmstore import models as m
from crmstore import queries

BCC = "example@dealmail.localhost"


msg = message


def send(port: int, message: EmailMessage | bytes, rcpts: list[str] | None = None,
         mail_from: str = "alice@example.com", source: str | None = None) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=30,
                      source_address=(source, 0) if source else None) as s:
        raw = message if isinstance(message, bytes) else wire(message)
        return s.sendmail(mail_from, rcpts or [BCC], raw)


def smtp_error(port: int, message: EmailMessage | bytes, rcpts: list[str] | None = None,
               **kw: Any) -> tuple[int, str]:
    with pytest.raises((smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused)) as info:
        send(port, message, rcpts, **kw)
    exc = info.value
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, text = next(iter(exc.recipients.values()))
    else:
        code, text = exc.smtp_code, exc.smtp_error
    return code, text.decode() if isinstance(text, bytes) else str(text)


def convs(as_user: str, person: str | None = None, deal: int | None = None) -> dict[str, Any]:
    user = queries.find_user(as_user)
    p = queries.find_person(user.company_id, person) if person else None
    d = queries.find_deal(user.company_id, deal) if deal else None
    return queries.conversations(user, person=p, deal=d)


def deal_id(title: str) -> int:
    return int(m.Deal.get(m.Deal.title == title).id)


def test_ehlo_advertises_extensions(server: Any) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        code, text = s.ehlo("client.test")
    assert code == 250
    for ext in (b"8BITMIME", b"SMTPUTF8", b"SIZE", b"PIPELINING", b"ENHANCEDSTATUSCODES"):
        assert ext in text
    assert b"AUTH" not in text  # never on the inbound listener without TLS


def test_bcc_to_ann_links_person_and_needs_choice(server: Any) -> None:
    send(server.port, msg())
    result = convs("alice@example.com", person="ann@customer.test")
    [thread] = result["threads"]
    assert thread["deal"] is None and thread["needs_choice"] is True
    [email] = thread["emails"]
    assert email["channel"] == "bcc" and email["owner"] == "alice@example.com"
    assert email["visibility"] == "shared"
    assert any("needs choice" in d for d in email["decisions"]), email
    # The question about it is queued in the same transaction (state "asked").
    assert m.PendingChoice.select().where(
        m.PendingChoice.state.in_(["pending", "asked"])).count() == 1


def test_bcc_to_carl_links_only_open_deal(server: Any) -> None:
    send(server.port, msg(to="Carl <carl@other.test>", subject="Pilot plan"))
    [thread] = convs("alice@example.com", person="carl@other.test")["threads"]
    assert thread["deal"] == {"id": deal_id("Pilot"), "title": "Pilot"}
    # Won deals are never chosen automatically.
    assert convs("alice@example.com", deal=deal_id("Old order"))["threads"] == []


def test_plus_deal_address_links_that_deal_and_replies_follow(server: Any) -> None:
    upsell = deal_id("Upsell seats")
    first = msg(subject="Seats")
    send(server.port, first, [f"example+deal{upsell}@dealmail.localhost"])
    reply = msg(frm="Bob <bob@example.com>", subject="Re: Seats",
                In_Reply_To=first["Message-ID"], References=first["Message-ID"])
    send(server.port, reply, mail_from="bob@example.com")
    threads = convs("bob@example.com", deal=upsell)["threads"]
    assert len(threads) == 1 and len(threads[0]["emails"]) == 2
    assert threads[0]["deal"]["title"] == "Upsell seats"
    assert m.PendingChoice.select().count() == 0  # the thread's deal decided it


def test_unknown_deal_address_refused(server: Any) -> None:
    code, text = smtp_error(server.port, msg(), ["example+deal999999@dealmail.localhost"])
    assert code == 550 and text.startswith("5.1.1")


def test_private_email_invisible_to_colleague_even_admin(server: Any) -> None:
    send(server.port, msg(frm="Bob <bob@example.com>", subject="Private"),
         mail_from="bob@example.com")
    assert convs("alice@example.com", person="ann@customer.test") == {"threads": []}
    [thread] = convs("bob@example.com", person="ann@customer.test")["threads"]
    assert thread["emails"][0]["visibility"] == "private"


def test_unknown_sender_refused_and_nothing_stored(server: Any) -> None:
    code, text = smtp_error(server.port, msg(frm="Eve <eve@evil.test>"),
                            mail_from="eve@evil.test")
    assert code == 550 and text.startswith("5.7.1") and "not allowed" in text
    assert m.Email.select().count() == 0


@pytest.mark.parametrize("rcpt", ["nobody@dealmail.localhost", "ann@customer.test",
                                  "example@other.test", "example+unknown@dealmail.localhost",
                                  "example+choice-AAAAAAAAAAAAAAAAAAAAAA@dealmail.localhost"])
def test_unknown_recipients_and_relay_refused(server: Any, rcpt: str) -> None:
    code, text = smtp_error(server.port, msg(), [rcpt])
    assert code == 550 and text.startswith("5.1.1")


@pytest.mark.parametrize("from_value, code", [
    ('"alice@example.com" <x@evil.test>', 550),  # the real address is x@evil.test
    ("alice@example.com <x@evil.test>", 554),  # ambiguous: refused outright
    ("<alice@example.com>, <x@evil.test>", 554),
])
def test_spoofed_display_names_refused(server: Any, from_value: str, code: int) -> None:
    raw = (f"From: {from_value}\r\nTo: ann@customer.test\r\nSubject: hi\r\n"
           "Message-ID: <spoof@evil.test>\r\n\r\nhi\r\n").encode()
    got, text = smtp_error(server.port, raw)
    assert got == code
    assert text.startswith("5.7.1" if code == 550 else "5.6.0")
    assert m.Email.select().count() == 0


def test_duplicate_from_header_refused(server: Any) -> None:
    raw = (b"From: x@evil.test\r\nFrom: alice@example.com\r\nTo: ann@customer.test\r\n"
           b"Subject: hi\r\n\r\nhi\r\n")
    code, text = smtp_error(server.port, raw)
    assert code == 554 and "more than one From" in text


def test_iso_2022_jp_subject_readable(server: Any) -> None:
    subject = "お見積りの件"
    body = "アン様\nお世話になっております。\n".encode("iso2022_jp")
    raw = (b"From: Alice <alice@example.com>\r\nTo: ann@customer.test\r\n"
           b"Subject: " + Header(subject, "iso-2022-jp").encode().encode() + b"\r\n"
           b"Message-ID: <jp1@example.com>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=ISO-2022-JP\r\n"
           b"Content-Transfer-Encoding: 7bit\r\n\r\n" + body.replace(b"\n", b"\r\n"))
    send(server.port, raw)
    [thread] = convs("alice@example.com", person="ann@customer.test")["threads"]
    assert thread["emails"][0]["subject"] == subject
    assert "お世話になっております" in thread["emails"][0]["snippet"]


def test_same_message_twice_is_one_email_and_colleague_adds_sighting(server: Any) -> None:
    one = msg(to="Carl <carl@other.test>, Bob <bob@example.com>")
    send(server.port, one)
    send(server.port, one)  # the client retried after a lost reply
    assert m.Email.select().count() == 1 and m.Sighting.select().count() == 1
    # Bob BCCs his copy of the same message (same Message-ID): one email, two sightings.
    e2 = msg(frm="Bob <bob@example.com>", to="Carl <carl@other.test>",
             message_id=one["Message-ID"])
    send(server.port, e2, mail_from="bob@example.com")
    assert m.Email.select().count() == 1
    assert sorted(s.user.address for s in m.Sighting.select()) == [
        "alice@example.com", "bob@example.com"]


def test_auto_replies_accepted_and_ignored(server: Any) -> None:
    for extra in ({"Auto_Submitted": "auto-replied"}, {"Precedence": "bulk"},
                  {"X_Dealmail_Auto": "question"}):
        send(server.port, msg(**extra))
    assert m.Email.select().count() == 0


def test_untrusted_network_refused(server_factory: Any) -> None:
    running = server_factory("policy.trusted_networks=['127.0.0.1/32']")
    code, text = smtp_error(running.port, msg(), source="127.0.0.2")
    assert code == 550 and text.startswith("5.7.1") and "alternate addresses" in text
    assert m.Email.select().count() == 0


def test_too_many_recipients(server_factory: Any) -> None:
    running = server_factory("limits.max_recipients=2")
    with smtplib.SMTP("127.0.0.1", running.port) as s:
        s.ehlo()
        s.mail("alice@example.com")
        assert s.rcpt(BCC)[0] == 250
        assert s.rcpt(f"example+deal{deal_id('Pilot')}@dealmail.localhost")[0] == 250
        code, text = s.rcpt(BCC)
        assert code == 452 and text.startswith(b"4.5.3")


def test_message_over_size_limit(server_factory: Any) -> None:
    running = server_factory("limits.message_size=2048")
    # Declared with SIZE (RFC 1870): refused at MAIL.
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        send(running.port, msg(body=("x" * 70 + "\n") * 80))
    assert info.value.smtp_code == 552 and info.value.smtp_error.startswith(b"5.3.4")
    # Not declared: the data is drained, then refused (docs/reliability.md A.15).
    with smtplib.SMTP("127.0.0.1", running.port) as s:
        s.ehlo()
        s.mail("alice@example.com")
        s.rcpt(BCC)
        code, text = s.data(wire(msg(body=("x" * 70 + "\n") * 80)))
        assert code == 552 and text.startswith(b"5.3.4")
        assert s.noop()[0] == 250  # the session stays usable
    assert m.Email.select().count() == 0


def test_commit_failure_answers_451_then_recovers(server: Any) -> None:
    committer = server.app.committer
    calls = {"n": 0}

    def fail_once() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error (injected)")

    committer.before_commit = fail_once
    code, text = smtp_error(server.port, msg(subject="first"))
    assert code == 451 and text.startswith("4.3.0") and "injected" not in text
    assert m.Email.select().count() == 0 and m.Participant.select().count() == 0
    send(server.port, msg(subject="second"))
    assert m.Email.select().count() == 1


def test_handler_exception_answers_451_not_500(server: Any, monkeypatch: Any) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("secret internal detail")

    capture = server.app.capture
    monkeypatch.setattr(capture, "directory_of", boom)
    code, text = smtp_error(server.port, msg())
    assert code == 451 and "secret" not in text
    assert m.Email.select().count() == 0
    monkeypatch.undo()
    send(server.port, msg())  # the server goes on serving
    assert m.Email.select().count() == 1


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_first_message(server: Any) -> None:
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--from", "alice@example.com",
         "--to", BCC, "--header", "To: Carl <carl@other.test>",
         "--header", "From: Alice <alice@example.com>", "--header", "Subject: via swaks",
         "--body", "Hello Carl"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: stored as" in out.stdout
    [thread] = convs("alice@example.com", person="carl@other.test")["threads"]
    assert thread["subject"] == "via swaks" and thread["deal"]["title"] == "Pilot"


def test_smart_bcc_on_postgresql(server_factory: Any, pg_url: str) -> None:
    """The same path on PostgreSQL (the hot path's SQL has dialect differences)."""
    running = server_factory(f"database.url={pg_url}")
    first = msg(to="Carl <carl@other.test>", subject="Pilot on PG")
    send(running.port, first)
    send(running.port, first)  # a retry: one email
    reply = msg(to="Carl <carl@other.test>", subject="Re: Pilot on PG",
                In_Reply_To=first["Message-ID"], References=first["Message-ID"])
    send(running.port, reply)
    send(running.port, msg(subject="Offer on PG"))  # Ann: two open deals
    [thread] = convs("alice@example.com", person="carl@other.test")["threads"]
    assert thread["deal"]["title"] == "Pilot" and len(thread["emails"]) == 2
    [ann] = convs("alice@example.com", person="ann@customer.test")["threads"]
    assert ann["needs_choice"] is True
    assert m.Email.select().count() == 3
