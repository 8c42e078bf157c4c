"""Test messages as a mail client writes them (imported as ``support.mail``; tests/ is on
sys.path through the root conftest)."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid


def message(frm: str = "Alice <alice@example.com>", to: str = "Ann <ann@customer.test>",
            subject: str = "Proposal", body: str = "Hello,\nhere is our offer.\n",
            **headers: str) -> EmailMessage:
    """A plain message; keyword headers use ``_`` for ``-`` (``In_Reply_To=...``) and
    ``message_id`` sets the Message-ID (a fresh one otherwise)."""
    e = EmailMessage()
    e["From"] = frm
    e["To"] = to
    e["Subject"] = subject
    e["Date"] = "Thu, 26 Nov 2026 10:00:00 +0100"
    e["Message-ID"] = headers.pop("message_id", None) or make_msgid(domain="example.com")
    for k, v in headers.items():
        e[k.replace("_", "-")] = v
    e.set_content(body)
    return e


def wire(msg: EmailMessage) -> bytes:
    """The message as a mail client puts it on the wire: CRLF line ends (RFC 5321 §2.3.8)."""
    return msg.as_bytes(policy=SMTP)
