"""Unit tests of ``linking.parse.parse_message``: what the capture path reads from a message.

Proves, without a server or a database: the refusals (no From, two From or Sender, an
unreadable From, a NUL in the header block, an oversized header block, too many fields) and
what is only noted as a defect; RFC 2047 decoding of Subject and display names; Message-ID,
In-Reply-To, References, Date and Thread-Index reading; which messages are automatic (RFC 3834
Auto-Submitted, Precedence bulk/junk/list, dealmail's own marker header, auto-responders);
that the content hash ignores line endings, trailing blanks and added trace headers but not
the content; and that the body (snippet, attachments) is read only when asked for, for small
and large (structure-only) messages alike.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP, compat32

import pytest
from support.mail import message, wire

from linking.parse import MARKER_HEADER, MessageRejected, ParsedMessage, parse_message


def raw_of(*headers: str, body: str = "Hello.\r\n") -> bytes:
    """A message written by hand (CRLF), for headers a builder would not let us write."""
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8")


BASE = ("From: Alice <alice@example.com>", "To: Ann <ann@customer.test>", "Subject: Offer",
        "Date: Thu, 26 Nov 2026 10:00:00 +0100", "Message-ID: <m1@example.com>")


def parsed_with(*extra: str, body: str = "Hello.\r\n") -> ParsedMessage:
    return parse_message(raw_of(*BASE, *extra, body=body))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("raw", "reason"), [
    (raw_of("To: ann@customer.test", "Subject: x"), "no From header"),
    (raw_of(*BASE, "From: Mallory <mallory@evil.test>"), "more than one From header"),
    (raw_of(*BASE, "Sender: a@example.com", "Sender: b@example.com"),
     "more than one Sender header"),
    (raw_of("From: not an address", "To: ann@customer.test"), "unreadable From header"),
    (raw_of("From: a@example.com, b@example.com"), "unreadable From header"),
    (raw_of('From: "ceo@example.com" <x@evil.test> <y@evil.test>'), "unreadable From header"),
    (raw_of("From: ceo@example.com <x@evil.test>"), "unreadable From header"),
    (raw_of("From: ", "To: ann@customer.test"), "unreadable From header"),
    (raw_of(*BASE, "X-Note: a\x00b"), "NUL byte in the header block"),
])
def test_refused_messages_name_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MessageRejected) as info:
        parse_message(raw)
    assert info.value.reason.startswith(reason), info.value.reason


def test_header_block_larger_than_256_kib_is_refused() -> None:
    filler = ["X-Filler: " + "x" * 990] * 270  # ~270 KB in fewer than 1000 fields
    with pytest.raises(MessageRejected, match="header block larger than 262144 bytes"):
        parse_message(raw_of(*BASE, *filler))
    # The same bytes in the body are no header block at all.
    big_body = "\r\n".join(filler) + "\r\n"
    assert parse_message(raw_of(*BASE, body=big_body)).from_.address == "alice@example.com"


def test_more_than_1000_header_fields_are_refused() -> None:
    many = [f"X-F{i}: v" for i in range(1000)]
    with pytest.raises(MessageRejected, match="more than 1000 header fields"):
        parse_message(raw_of(*BASE, *many))
    assert parse_message(raw_of(*BASE, *many[: 1000 - len(BASE)])).subject == "Offer"


def test_a_nul_in_the_body_is_not_a_header_problem() -> None:
    assert parse_message(raw_of(*BASE, body="a\x00b\r\n")).message_id == "<m1@example.com>"


def test_duplicate_non_identity_fields_are_defects_not_refusals() -> None:
    p = parsed_with("To: Carl <carl@other.test>", "Subject: Second")
    assert "duplicate to header" in p.defects and "duplicate subject header" in p.defects
    assert [b.address for b in p.to] == ["ann@customer.test", "carl@other.test"]
    assert p.subject == "Offer"  # the first one


# --------------------------------------------------------------------------- fields


def test_addresses_are_normalised_and_lists_deduplicated() -> None:
    p = parse_message(raw_of("From: Alice <Alice@EXAMPLE.com>",
                             "To: Ann <ann@customer.test>, ANN@customer.test, not-an-address",
                             "Cc: carl@other.test (Carl)", "Subject: x"))
    assert (p.from_.address, p.from_.name) == ("alice@example.com", "Alice")
    assert [b.address for b in p.to] == ["ann@customer.test"]
    assert [(b.address, b.name) for b in p.cc] == [("carl@other.test", "Carl")]


def test_rfc2047_subject_and_display_names_are_decoded() -> None:
    subject = "Angebot für Ihr Büro ✓"
    b64 = base64.b64encode(subject.encode()).decode()
    p = parse_message(raw_of(
        "From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.com>",
        "To: =?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <yamada@test.co.jp>",
        f"Subject: =?utf-8?b?{b64}?=", "Message-ID: <x@y>"))
    assert p.subject == subject
    assert p.from_.name == "Jürgen Müller"
    assert p.to[0].name == "山田"


def test_folded_subject_is_unfolded() -> None:
    p = parse_message(raw_of("From: a@example.com", "Subject: a long\r\n   subject line"))
    assert p.subject == "a long subject line"


def test_message_ids_in_reply_to_and_references() -> None:
    p = parsed_with("In-Reply-To: <r2@customer.test> (Ann's message)",
                    "References: <r1@customer.test>\r\n <r2@customer.test>",
                    "References: <r3@customer.test>")
    assert p.message_id == "<m1@example.com>"
    assert p.in_reply_to == "<r2@customer.test>"
    assert p.references == ["<r1@customer.test>", "<r2@customer.test>", "<r3@customer.test>"]
    assert p.dedupe_key == "<m1@example.com>"


def test_without_message_id_the_content_hash_is_the_key() -> None:
    p = parse_message(raw_of("From: a@example.com", "Subject: x"))
    assert p.message_id is None and p.in_reply_to is None and p.references == []
    assert p.dedupe_key == f"hash:{p.content_hash}"
    assert parse_message(raw_of("From: a@example.com", "Message-ID: garbage")).message_id is None


def test_date_with_zone_without_zone_and_unreadable() -> None:
    assert parsed_with().date == datetime(2026, 11, 26, 10, 0,
                                          tzinfo=timezone(timedelta(hours=1)))
    no_zone = parse_message(raw_of("From: a@example.com",
                                   "Date: Thu, 26 Nov 2026 10:00:00 -0000"))
    assert no_zone.date == datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    bad = parse_message(raw_of("From: a@example.com", "Date: yesterday at noon"))
    assert bad.date is None and "unparseable Date header" in bad.defects


def test_thread_index_is_kept_stripped() -> None:
    assert parsed_with("Thread-Index:   AQHZabcdef==  ").thread_index == "AQHZabcdef=="
    assert parsed_with().thread_index is None


def test_the_lf_only_message_reads_like_the_crlf_one() -> None:
    crlf = raw_of(*BASE)
    lf = crlf.replace(b"\r\n", b"\n")
    a, b = parse_message(crlf), parse_message(lf)
    assert (a.from_, a.to, a.subject, a.message_id) == (b.from_, b.to, b.subject, b.message_id)
    assert (crlf[a.header_bytes:], lf[b.header_bytes:]) == (b"Hello.\r\n", b"Hello.\n")


# --------------------------------------------------------------------------- automatic mail


@pytest.mark.parametrize("header", [
    "Auto-Submitted: auto-replied",
    "Auto-Submitted: auto-generated",
    "Auto-Submitted: Auto-Notified",
    "Precedence: bulk",
    "Precedence: junk",
    "Precedence: list",
    "Precedence: auto_reply",
    f"{MARKER_HEADER}: question",
    "X-Autoreply: yes",
    "X-Autorespond: on vacation",
    "X-Auto-Response-Suppress: OOF",
])
def test_automatic_messages_are_flagged(header: str) -> None:
    p = parsed_with(header)
    assert p.is_auto
    assert p.auto_reason


@pytest.mark.parametrize("header", [
    "Auto-Submitted: no", "Precedence: first-class", "X-Auto-Response-Suppress: DR",
    "X-Mailer: AutoReply Pro",
])
def test_personal_messages_are_not_automatic(header: str) -> None:
    p = parsed_with(header)
    assert not p.is_auto and p.auto_reason is None


def test_our_own_marker_names_itself() -> None:
    assert MARKER_HEADER in (parsed_with(f"{MARKER_HEADER}: digest").auto_reason or "")


# --------------------------------------------------------------------------- content hash


def test_content_hash_ignores_line_endings_and_trailing_blanks() -> None:
    body = "Hello Ann,\r\nhere is our offer.   \r\n\r\nAlice\r\n"
    crlf = raw_of(*BASE, body=body)
    variants = [
        crlf.replace(b"\r\n", b"\n"),
        crlf + b"\r\n\r\n   \r\n",
        crlf.rstrip(b"\r\n"),
        crlf.replace(b"offer.   \r\n", b"offer.\r\n"),
        b"Received: from relay.test by mx.test; Thu, 26 Nov 2026 10:00:01 +0100\r\n" + crlf,
        crlf.replace(b"Subject: Offer", b"Subject:   Offer"),
    ]
    expected = parse_message(crlf).content_hash
    assert [parse_message(v).content_hash for v in variants] == [expected] * len(variants)


@pytest.mark.parametrize(("old", "new"), [
    (b"here is our offer.", b"here is our offer!"),
    (b"Subject: Offer", b"Subject: Offer 2"),
    (b"Date: Thu, 26 Nov 2026 10:00:00", b"Date: Thu, 26 Nov 2026 10:00:01"),
    (b"To: Ann <ann@customer.test>", b"To: Ann <ann2@customer.test>"),
    (b"Alice\r\n", b"Alice\r\n\r\nP.S.\r\n"),
])
def test_content_hash_changes_with_the_content(old: bytes, new: bytes) -> None:
    raw = raw_of(*BASE, body="Hello Ann,\r\nhere is our offer.\r\n\r\nAlice\r\n")
    assert old in raw
    assert parse_message(raw.replace(old, new)).content_hash != parse_message(raw).content_hash


# --------------------------------------------------------------------------- body on demand


def test_the_body_is_read_only_when_asked_for() -> None:
    p = parse_message(wire(message(body="Hello Ann,\nhere is our offer.\n")))
    assert "body_summary" not in vars(p)  # the header parse did not touch the body
    assert p.snippet == "Hello Ann, here is our offer."
    assert "body_summary" in vars(p)
    assert p.attachments == []


def test_snippet_skips_quoted_lines_and_attachments_are_listed() -> None:
    e = message(body="Thanks!\n\n> On Monday Ann wrote:\n> old text\nAlice\n")
    e.add_attachment(b"%PDF-1.4 " + b"x" * 991, maintype="application", subtype="pdf",
                     filename="Angebot Nr. 1.pdf")
    e.add_attachment("a,b\n1,2\n", subtype="csv", filename="data.csv")
    p = parse_message(wire(e))
    assert p.snippet == "Thanks! Alice"
    assert p.attachments == [
        {"filename": "Angebot Nr. 1.pdf", "content_type": "application/pdf", "size": 1000},
        # A text attachment travels with CRLF line ends: "a,b\r\n1,2\r\n".
        {"filename": "data.csv", "content_type": "text/csv", "size": 10},
    ]


def test_html_only_message_gets_a_text_snippet() -> None:
    e = EmailMessage()
    e["From"], e["Subject"] = "alice@example.com", "x"
    e.set_content("<html><body><p>Hello <b>Ann</b></p><p>Our offer</p></body></html>",
                  subtype="html")
    snippet = parse_message(e.as_bytes(policy=SMTP)).snippet
    assert "Hello" in snippet and "Ann" in snippet and "Our offer" in snippet
    assert "<" not in snippet


def test_shift_jis_text_part_is_decoded() -> None:
    e = EmailMessage()
    e["From"], e["Subject"] = "yamada@test.co.jp", "見積"
    e.set_content("お世話になっております。\n見積書を送ります。\n", charset="shift_jis")
    assert parse_message(e.as_bytes(policy=SMTP)).snippet.startswith("お世話になっております。")


def test_large_message_is_summarised_from_its_structure() -> None:
    e = message(body="Please find the scans attached.\n")
    blob = bytes(range(256)) * 2400  # 614,400 bytes
    e.add_attachment(blob, maintype="image", subtype="png", filename="scan.png")
    p = parse_message(wire(e))
    assert p.snippet == "Please find the scans attached."
    # Measured from the base64 text without decoding it, to the byte.
    assert p.attachments == [{"filename": "scan.png", "content_type": "image/png",
                              "size": len(blob)}]


def test_attachment_sizes_follow_the_decoders_of_the_email_package() -> None:
    # Characters outside the base64 alphabet are skipped (RFC 2045 §6.8), padding is not
    # data, quoted-printable and uuencoded parts are measured decoded.
    raw = (b"From: alice@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
           b"--B\r\nContent-Type: audio/basic\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"TWFu TWFu\r\n*TWE=\r\n"
           b"--B\r\nContent-Type: application/octet-stream; name=a.bin\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\nab=3Dcd=\r\nef\r\n"
           b"--B\r\nContent-Type: application/octet-stream; name=u.bin\r\n"
           b"Content-Transfer-Encoding: x-uuencode\r\n\r\n"
           b"begin 644 u.bin\r\n#86)C\r\n`\r\nend\r\n--B--\r\n")
    p = parse_message(raw)
    full = BytesParser(policy=compat32).parsebytes(raw)
    expected = [len(part.get_payload(decode=True)) for part in full.walk()
                if not part.is_multipart() and part.get_content_type() != "text/plain"]
    assert [a["size"] for a in p.attachments] == expected
    assert p.snippet == "See attached."


def test_snippet_of_a_long_text_part_reads_only_its_beginning() -> None:
    body = "First line of a long report.\n" + "data " * 400_000 + "\n"
    p = parse_message(wire(message(body=body)))
    assert p.snippet.startswith("First line of a long report. data data")
    assert len(p.snippet) <= 400


def test_header_block_end_with_either_line_ending() -> None:
    # The body starts after the first empty line, whichever line ends the sender used
    # (RFC 5322 §2.1), also when the other kind appears later in the body.
    head = b"From: a@example.com\r\nSubject: a"
    assert parse_message(head + b"\r\n\r\nbody\n\nmore").header_bytes == len(head) + 4
    assert parse_message(head + b"\n\nbody\r\n\r\nmore").header_bytes == len(head) + 2
    assert parse_message(head + b"\r\nX: b").header_bytes == len(head) + 6  # no body
