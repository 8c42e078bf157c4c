"""Forwarded mail end to end: alice forwards Ann's reply to the company address with an empty
To line (the address in Bcc) — the email lands on Ann, in the thread of alice's earlier BCC'd
message, and needs a deal choice because Ann has two open deals."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

from crmstore import models as m
from crmstore import queries

BCC = "example@dealmail.localhost"


def _send(port: int, e: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail("alice@example.com", [BCC], e.as_bytes(policy=SMTP))


def test_forwarded_reply_lands_on_the_customer_in_the_thread(server: Any) -> None:
    first = EmailMessage()
    first["From"], first["To"] = "Alice <alice@example.com>", "Ann <ann@customer.test>"
    first["Subject"], first["Message-ID"] = "Proposal", "<p1@example.com>"
    first["Date"] = "Wed, 25 Nov 2026 09:00:00 +0100"
    first.set_content("Hello Ann, here is our proposal.")
    _send(server.port, first)

    fwd = EmailMessage()
    fwd["From"] = "Alice <alice@example.com>"
    fwd["Subject"] = "Fwd: Re: Proposal"
    fwd["Date"] = "Thu, 26 Nov 2026 11:00:00 +0100"
    fwd["Message-ID"] = "<f1@example.com>"
    fwd.set_content(
        "FYI, see Ann's answer below.\n\n"
        "---------- Forwarded message ---------\n"
        "From: Ann Customer <ann@customer.test>\n"
        "Date: Thu, Nov 26, 2026 at 10:03 AM\n"
        "Subject: Re: Proposal\n"
        "To: Alice <alice@example.com>\n\n"
        "Thanks Alice, we would like 20 more seats.\n")
    _send(server.port, fwd)

    alice = queries.find_user("alice@example.com")
    ann = queries.find_person(alice.company_id, "ann@customer.test")
    [thread] = queries.conversations(alice, person=ann)["threads"]
    assert len(thread["emails"]) == 2
    newest = thread["emails"][0]
    assert newest["from"] == {"address": "ann@customer.test", "name": "Ann Customer"}
    assert newest["channel"] == "forward" and newest["subject"] == "Re: Proposal"
    assert "20 more seats" in newest["snippet"]
    assert thread["needs_choice"] is True
    stored = m.Email.get(m.Email.from_address == "ann@customer.test")
    assert stored.kind == "forward" and "FYI" in stored.forward_json
