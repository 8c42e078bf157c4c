"""Test messages as a mail client writes them (imported as ``support.mail``; tests/ is on
sys.path through the root conftest)."""

from __future__ import annotations

import re
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from pathlib import Path


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


# Deeply nested structures (linking.parse.check_structure).
STRUCTURE_HEAD = (b"From: Alice <alice@example.com>\r\nTo: Carl <carl@other.test>\r\n"
                  b"Subject: nested\r\nMIME-Version: 1.0\r\n")
LEAF = b"Content-Type: text/plain\r\n\r\nhello\r\n"


def nested_multipart(depth: int, head: bytes = STRUCTURE_HEAD) -> bytes:
    """Multiparts nested ``depth`` deep around one text part."""
    body = LEAF
    for i in range(depth, 0, -1):
        body = (b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                + body + b"\r\n--b%d--\r\n" % i)
    return head + body


def nested_rfc822(depth: int, head: bytes = STRUCTURE_HEAD) -> bytes:
    """message/rfc822 entities nested ``depth`` deep around one text part."""
    body = LEAF
    for _ in range(depth):
        body = (b"Content-Type: message/rfc822\r\n\r\nFrom: x@y.test\r\nSubject: n\r\n"
                + body)
    return head + body


def long_line_corpus() -> list[Path]:
    """The corpus messages with a line longer than RFC 5322's 998 octets (CRLF counted as
    a line end, as a client sends them)."""
    from conftest import corpus_dir

    from mta.relay.longlines import has_long_line

    return [p for p in sorted(corpus_dir().rglob("*")) if p.is_file()
            and p.suffix in (".eml", ".txt", "") and "LICENSE" not in p.name.upper()
            and has_long_line(re.sub(rb"\r?\n", b"\r\n", p.read_bytes()))]
