"""Tests for mta.relay.dsn: every DSN is parsed back and checked field by field.

docs/reliability.md D.6.1 (give-up DSN: Action failed, Status 4.4.7, last Diagnostic-Code,
original headers), D.6.2 (a DSN only for the failed recipient), D.6.7 (no DSN about a
null-sender message, size bounded: headers only), A.23.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser

from mta.relay.delivery import NO_REPLY, Outcome, RecipientResult
from mta.relay.dsn import MAX_HEADERS_BYTES, build_dsn, dsn_status

ORIGINAL = (
    b"From: Alice <alice@company.test>\r\n"
    b"To: bob@customer.test, carol@customer.test\r\n"
    b"Subject: Proposal\r\n"
    b"Message-ID: <p1@company.test>\r\n"
    b"\r\n"
    b"SECRET BODY that must not be echoed back\r\n"
)
ARRIVAL = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 6, 9, 0, tzinfo=UTC)
FROM = "Mail Delivery System <MAILER-DAEMON@dealmail.localhost>"


def parse(msg: EmailMessage) -> EmailMessage:
    parsed = BytesParser(policy=policy.default).parsebytes(msg.as_bytes(policy=policy.SMTP))
    assert isinstance(parsed, EmailMessage)
    return parsed


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    blocks = parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def build(failed: list[RecipientResult], **kw: object) -> EmailMessage:
    dsn = build_dsn(ORIGINAL, "alice@company.test", failed, "relay.company.test", FROM,
                    ARRIVAL, NOW, **kw)  # type: ignore[arg-type]
    assert dsn is not None
    return parse(dsn)


def test_failed_dsn_structure() -> None:
    failed = [RecipientResult("bob@customer.test", Outcome.PERMANENT, 550,
                              "5.1.1 <bob@customer.test>: user unknown", "mx.customer.test")]
    msg = build(failed)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert msg["From"] == FROM
    assert msg["To"] == "alice@company.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Dealmail-Auto"] == "dsn"
    assert msg["Message-ID"].endswith("@relay.company.test>")
    assert "Undelivered" in msg["Subject"]
    assert msg["Date"].datetime == NOW

    per_message, per_rcpt = status_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; relay.company.test"
    assert per_message["Arrival-Date"] == "Sun, 01 Mar 2026 09:00:00 +0000"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@customer.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.customer.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@customer.test>: user unknown"

    human = parts(msg)[0]
    assert isinstance(human, EmailMessage)
    text = human.get_content()
    assert "bob@customer.test" in text and "550 5.1.1" in text

    headers = parts(msg)[2]
    assert isinstance(headers, EmailMessage)
    attached = headers.get_content()
    assert "Subject: Proposal" in attached and "Message-ID: <p1@company.test>" in attached
    assert b"SECRET BODY" not in msg.as_bytes()


def test_one_block_per_recipient_mixed_reasons() -> None:
    failed = [
        RecipientResult("bob@customer.test", Outcome.PERMANENT, 554, "rejected", "mx"),
        RecipientResult("carol@customer.test", Outcome.TEMPORARY, 451,
                        "4.2.2 mailbox full", "mx"),
        RecipientResult("dan@customer.test", Outcome.TEMPORARY, NO_REPLY,
                        "cannot connect to mx:25: refused"),
    ]
    blocks = status_blocks(build(failed))[1:]
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; bob@customer.test", "rfc822; carol@customer.test", "rfc822; dan@customer.test"]
    assert [b["Action"] for b in blocks] == ["failed"] * 3
    # No enhanced code: 5.0.0; given up after temporary failures: 4.4.7 (D.6.1).
    assert [b["Status"] for b in blocks] == ["5.0.0", "4.4.7", "4.4.7"]
    assert blocks[1]["Diagnostic-Code"] == "smtp; 451 4.2.2 mailbox full"
    assert blocks[2]["Diagnostic-Code"] == "X-Dealmail; cannot connect to mx:25: refused"
    assert blocks[2]["Remote-MTA"] is None


def test_delayed_dsn() -> None:
    failed = [RecipientResult("carol@customer.test", Outcome.TEMPORARY, 450,
                              "4.7.1 greylisted", "mx.customer.test"),
              RecipientResult("dan@customer.test", Outcome.TEMPORARY, NO_REPLY, "timeout")]
    until = ARRIVAL + timedelta(days=5)
    msg = build(failed, delayed=True, retry_until=until)
    assert "Delayed" in msg["Subject"]
    blocks = status_blocks(msg)[1:]
    assert [b["Action"] for b in blocks] == ["delayed", "delayed"]
    assert [b["Status"] for b in blocks] == ["4.7.1", "4.4.1"]
    assert blocks[0]["Will-Retry-Until"] == "Fri, 06 Mar 2026 09:00:00 +0000"


def test_no_dsn_for_null_sender_or_nothing_failed() -> None:
    failed = [RecipientResult("bob@customer.test", Outcome.PERMANENT, 550, "5.1.1 no")]
    for sender in ("", "<>", "  "):
        assert build_dsn(ORIGINAL, sender, failed, "relay.test", FROM, ARRIVAL, NOW) is None
    assert build_dsn(ORIGINAL, "alice@company.test", [], "relay.test", FROM, ARRIVAL,
                     NOW) is None


def test_hostile_reply_text_cannot_inject_fields() -> None:
    failed = [RecipientResult("bob@customer.test", Outcome.PERMANENT, 550,
                              "5.1.1 no\r\nAction: delivered\r\nStatus: 2.0.0", "mx\r\nX: y")]
    msg = build(failed)
    block = status_blocks(msg)[1]
    assert block.get_all("Action") == ["failed"]
    assert block.get_all("Status") == ["5.1.1"]
    assert block["X"] is None
    assert "\n" not in block["Diagnostic-Code"]


def test_status_ignores_enhanced_code_of_the_wrong_class() -> None:
    wrong = RecipientResult("b@c.test", Outcome.PERMANENT, 550, "4.2.2 odd server")
    assert dsn_status(wrong, delayed=False) == "5.0.0"
    assert dsn_status(RecipientResult("b@c.test", Outcome.PERMANENT, 550, "5.7.1x"),
                      delayed=False) == "5.0.0"
    assert dsn_status(RecipientResult("b@c.test", Outcome.TEMPORARY, 451, "5.1.1 odd"),
                      delayed=True) == "4.0.0"


def test_original_headers_are_bounded_and_body_dropped() -> None:
    huge = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"a" * 60) for i in range(3000))
    original = b"Subject: big\r\n" + huge + b"\r\n" + b"body\r\n" * 1000
    dsn = build_dsn(original, "alice@company.test",
                    [RecipientResult("b@c.test", Outcome.PERMANENT, 550, "5.1.1 no")],
                    "relay.test", FROM, ARRIVAL, NOW)
    assert dsn is not None
    raw = dsn.as_bytes()
    assert len(raw) < MAX_HEADERS_BYTES + 8 * 1024
    attached = parts(parse(dsn))[2]
    assert isinstance(attached, EmailMessage)
    content = attached.get_content()
    assert content.startswith("Subject: big")
    assert content.rstrip("\n").splitlines()[-1].startswith("X-Filler-")  # cut at a line end


def test_non_ascii_headers_keep_the_dsn_7bit() -> None:
    original = "From: José <jose@company.test>\r\nSubject: Café\r\n\r\nx\r\n".encode()
    dsn = build_dsn(original, "jose@company.test",
                    [RecipientResult("b@c.test", Outcome.PERMANENT, 550, "5.1.1 no")],
                    "relay.test", FROM, ARRIVAL, NOW)
    assert dsn is not None
    assert dsn.as_bytes().isascii()
    attached = parts(parse(dsn))[2]
    assert isinstance(attached, EmailMessage)
    assert "Subject: Café" in attached.get_content()


def test_naive_and_offset_datetimes() -> None:
    naive = datetime(2026, 3, 1, 9, 0)
    tokyo = datetime(2026, 3, 6, 18, 0, tzinfo=timezone(timedelta(hours=9)))
    dsn = build_dsn(ORIGINAL, "alice@company.test",
                    [RecipientResult("b@c.test", Outcome.PERMANENT, 550, "5.1.1 no")],
                    "relay.test", FROM, naive, tokyo)
    assert dsn is not None
    msg = parse(dsn)
    assert status_blocks(msg)[0]["Arrival-Date"] == "Sun, 01 Mar 2026 09:00:00 +0000"
    assert msg["Date"].datetime == tokyo
