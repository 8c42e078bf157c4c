"""Tests for mta.relay.delivery: real aiosmtplib sessions against the local scriptable sink.

Covers docs/reliability.md D.6.2 (mixed recipients), D.6.3 (drop after '.'), D.6.4 (stall ->
deferred), D.6.6 (TLS policy, no AUTH in cleartext), D.6.15/A.25 (bare LF normalised, outbound
smuggling impossible), D.6.16 (CRLF in an address refused before anything is written).
Per-stage RFC 5321 timeouts (D.6.4) are not modelled: deliver() takes one per-command timeout.
All servers listen on 127.0.0.1 with OS-assigned ports; nothing sleeps in the test process.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))

from smtpsink import SmtpSink

from dealmail.schedules import parse_schedule
from mta.relay.delivery import (
    NO_REPLY,
    DeliveryResult,
    NextHop,
    Outcome,
    classify,
    deliver,
    has_bare_cr_or_lf,
    normalize_line_endings,
)
from mta.relay.dsn import build_dsn

MESSAGE = (
    b"From: Alice <alice@company.test>\r\n"
    b"To: Bob <bob@customer.test>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@company.test>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".leading dot line\r\n"
)


def run(coro: Coroutine[Any, Any, DeliveryResult]) -> DeliveryResult:
    return asyncio.run(coro)


def send(
    sink_port: int,
    recipients: list[str],
    *,
    message: bytes = MESSAGE,
    mail_from: str = "alice@company.test",
    tls: str = "opportunistic",
    timeout: float = 10,
    **route_kwargs: Any,
) -> DeliveryResult:
    route = NextHop("127.0.0.1", sink_port, tls=tls, **route_kwargs)
    return run(deliver(message, mail_from, recipients, [route], "relay.company.test", timeout))


@contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections.

    The socket stays bound (but never listens) for the whole block, so the OS cannot hand
    the same port to a sink started inside it: a released port was once given straight
    back to the test's own sink, and the "dead" route then delivered.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def ehlo_lines(port: int) -> list[bytes]:
    """What the server advertises in answer to EHLO (raw socket, no TLS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rwb")
        f.readline()
        f.write(b"EHLO probe.test\r\n")
        f.flush()
        lines = [f.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(f.readline())
        f.write(b"QUIT\r\n")
        f.flush()
        f.readline()
    return lines


def outcomes(result: DeliveryResult) -> dict[str, tuple[Outcome, int]]:
    return {r.address: (r.outcome, r.code) for r in result.recipients}


# -- classify ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (250, Outcome.DELIVERED), (251, Outcome.DELIVERED),
        (421, Outcome.TEMPORARY), (450, Outcome.TEMPORARY), (451, Outcome.TEMPORARY),
        (452, Outcome.TEMPORARY), (552, Outcome.TEMPORARY),
        (550, Outcome.PERMANENT), (553, Outcome.PERMANENT), (554, Outcome.PERMANENT),
        (NO_REPLY, Outcome.TEMPORARY), (354, Outcome.TEMPORARY), (999, Outcome.TEMPORARY),
    ],
)
def test_classify_single_rule(code: int, expected: Outcome) -> None:
    assert classify(code) is expected


# -- line endings --------------------------------------------------------------------------

def test_normalize_line_endings() -> None:
    assert normalize_line_endings(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert normalize_line_endings(b"a\r\r\nb\r\n") == b"a\r\n\r\nb\r\n"
    assert normalize_line_endings(b"x\n.\r\nMAIL") == b"x\r\n.\r\nMAIL\r\n"
    assert normalize_line_endings(b"") == b""
    out = normalize_line_endings(b"\n\r\n\r\r\n\n")
    assert not has_bare_cr_or_lf(out)


def test_has_bare_cr_or_lf() -> None:
    assert has_bare_cr_or_lf(b"a\nb")
    assert has_bare_cr_or_lf(b"a\rb")
    assert has_bare_cr_or_lf(b"a\r\r\n")
    assert has_bare_cr_or_lf(b"end\r")
    assert not has_bare_cr_or_lf(b"a\r\nb\r\n")
    assert not has_bare_cr_or_lf(b"")


# -- plain delivery and per-recipient outcomes ---------------------------------------------

def test_delivered_byte_exact() -> None:
    with SmtpSink() as sink:
        result = send(sink.port, ["bob@customer.test"])
        msgs = sink.messages
    assert outcomes(result) == {"bob@customer.test": (Outcome.DELIVERED, 250)}
    assert result.transcript_error is None
    assert result.route is not None and result.route.port == sink.port
    assert len(msgs) == 1
    assert msgs[0].mail_from == "alice@company.test"
    assert msgs[0].rcpt_tos == ["bob@customer.test"]
    # Dot-stuffed on the wire, unstuffed by the sink: the content arrives unchanged.
    assert msgs[0].data == MESSAGE


def test_null_sender() -> None:
    with SmtpSink() as sink:
        result = send(sink.port, ["alice@company.test"], mail_from="")
        wire = sink.all_wire()
        msgs = sink.messages
    assert result.recipients[0].outcome is Outcome.DELIVERED
    assert b"MAIL FROM:<>" in wire
    assert msgs[0].mail_from == ""


def test_mixed_rcpt_outcomes_and_data_only_to_accepted() -> None:
    with SmtpSink() as sink:
        sink.script(rcpt={"bad@customer.test": "550 5.1.1 no such user",
                          "later@customer.test": "451 4.3.0 try later"})
        result = send(sink.port, ["ok@customer.test", "bad@customer.test",
                                  "later@customer.test"])
        msgs = sink.messages
    assert outcomes(result) == {
        "ok@customer.test": (Outcome.DELIVERED, 250),
        "bad@customer.test": (Outcome.PERMANENT, 550),
        "later@customer.test": (Outcome.TEMPORARY, 451),
    }
    assert [r.address for r in result.recipients] == [
        "ok@customer.test", "bad@customer.test", "later@customer.test"]
    bad = result.recipients[1]
    assert bad.message.startswith("5.1.1") and bad.remote_mta == "127.0.0.1"
    assert len(msgs) == 1 and msgs[0].rcpt_tos == ["ok@customer.test"]


def test_all_rcpt_refused_sends_no_data() -> None:
    with SmtpSink() as sink:
        sink.script(rcpt={"a@customer.test": "550 5.1.1 no"})
        result = send(sink.port, ["a@customer.test"])
        wire = sink.all_wire()
    assert outcomes(result) == {"a@customer.test": (Outcome.PERMANENT, 550)}
    assert b"DATA" not in wire
    assert b"RSET" in wire


@pytest.mark.parametrize(
    ("reply", "outcome", "code"),
    [
        ("451 4.3.0 local problem", Outcome.TEMPORARY, 451),
        ("552 5.3.4 message too big for now", Outcome.TEMPORARY, 552),
        ("554 5.7.1 rejected as spam", Outcome.PERMANENT, 554),
    ],
)
def test_data_reply_applies_to_every_accepted_recipient(
    reply: str, outcome: Outcome, code: int
) -> None:
    with SmtpSink() as sink:
        sink.script(data=reply, rcpt={"x@customer.test": "550 5.1.1 unknown"})
        result = send(sink.port, ["a@customer.test", "b@customer.test", "x@customer.test"])
        msgs = sink.messages
    assert outcomes(result) == {
        "a@customer.test": (outcome, code),
        "b@customer.test": (outcome, code),
        "x@customer.test": (Outcome.PERMANENT, 550),
    }
    assert result.recipients[0].message == reply[4:]
    assert msgs == []


def test_mail_from_refused_applies_to_all() -> None:
    with SmtpSink() as sink:
        sink.script(mail="553 5.7.1 sender not allowed")
        result = send(sink.port, ["a@customer.test", "b@customer.test"])
        wire = sink.all_wire()
    assert {r.outcome for r in result.recipients} == {Outcome.PERMANENT}
    assert {r.code for r in result.recipients} == {553}
    assert b"RCPT" not in wire


# -- connection trouble --------------------------------------------------------------------

def test_connection_refused_is_temporary() -> None:
    with closed_port() as port:
        result = send(port, ["a@customer.test", "b@customer.test"])
    assert outcomes(result) == {
        "a@customer.test": (Outcome.TEMPORARY, NO_REPLY),
        "b@customer.test": (Outcome.TEMPORARY, NO_REPLY),
    }
    assert result.transcript_error is not None and str(port) in result.transcript_error
    assert result.route is None


def test_next_route_after_refused_one() -> None:
    with closed_port() as dead_port, SmtpSink() as sink:
        dead = NextHop("127.0.0.1", dead_port)
        live = NextHop("127.0.0.1", sink.port)
        result = run(deliver(MESSAGE, "alice@company.test", ["b@customer.test"],
                             [dead, live], "relay.company.test", 10))
        msgs = sink.messages
    assert result.recipients[0].outcome is Outcome.DELIVERED
    assert result.route is live
    assert len(msgs) == 1


def test_no_routes_is_temporary() -> None:
    result = run(deliver(MESSAGE, "a@company.test", ["b@customer.test"], [], "relay.test"))
    assert result.recipients[0].outcome is Outcome.TEMPORARY
    assert result.transcript_error == "no route to the destination"


def test_drop_after_final_dot_is_temporary_and_sink_has_the_copy() -> None:
    """D.6.3: the reply to '.' never comes; deferred; the sink's copy shows at-least-once."""
    with SmtpSink() as sink:
        sink.script(drop_after_data=True, rcpt={"x@customer.test": "550 5.1.1 unknown"})
        result = send(sink.port, ["a@customer.test", "x@customer.test"])
        msgs = sink.messages
    assert outcomes(result) == {
        "a@customer.test": (Outcome.TEMPORARY, NO_REPLY),
        "x@customer.test": (Outcome.PERMANENT, 550),  # its final answer is kept
    }
    assert result.transcript_error is not None
    assert "DATA" in result.transcript_error and "duplicate" in result.transcript_error
    assert len(msgs) == 1  # the retry will make a second copy: documented at-least-once


def test_stall_at_data_times_out_as_temporary() -> None:
    with SmtpSink() as sink:
        sink.script(stall_data=30)  # the sink would answer after 30 s; we wait 0.3 s
        result = send(sink.port, ["a@customer.test"], timeout=0.3)
    assert outcomes(result) == {"a@customer.test": (Outcome.TEMPORARY, NO_REPLY)}
    assert result.transcript_error is not None and "DATA" in result.transcript_error


# -- input hygiene -------------------------------------------------------------------------

def test_bare_lf_smuggling_cannot_reach_a_lenient_sink() -> None:
    """A.25: a body with bare LF dot lines is one message downstream, never two."""
    smuggle = (
        b"From: a@company.test\nSubject: s\n\nhello\n.\r\n"
        b"MAIL FROM:<ceo@company.test>\r\nRCPT TO:<victim@customer.test>\r\nDATA\r\n"
        b"From: ceo@company.test\r\n\r\nsmuggled\r\n"
        b"\n.\n"
        b"MAIL FROM:<ceo@company.test>\nRCPT TO:<victim@customer.test>\nDATA\n"
        b"From: ceo@company.test\n\nsmuggled again\n"
    )
    with SmtpSink(lenient=True) as sink:
        result = send(sink.port, ["bob@customer.test"], message=smuggle)
        msgs = sink.messages
        wire = sink.all_wire()
    assert result.recipients[0].outcome is Outcome.DELIVERED
    assert len(msgs) == 1, msgs
    assert not msgs[0].smuggled and msgs[0].rcpt_tos == ["bob@customer.test"]
    assert not has_bare_cr_or_lf(msgs[0].data)
    assert b"smuggled again" in msgs[0].data
    assert b"\r\n..\r\n" in wire  # the fake end-of-data line went out dot-stuffed


def test_lenient_sink_really_splits_raw_bare_lf() -> None:
    """Control for the test above: without normalisation the lenient sink yields two."""
    with SmtpSink(lenient=True) as sink, socket.create_connection(
        ("127.0.0.1", sink.port), timeout=5
    ) as s:
        f = s.makefile("rwb")

        def cmd(line: bytes) -> bytes:
            f.write(line)
            f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply

        f.readline()
        assert cmd(b"EHLO raw.test\r\n").startswith(b"250")
        assert cmd(b"MAIL FROM:<a@company.test>\r\n").startswith(b"250")
        assert cmd(b"RCPT TO:<bob@customer.test>\r\n").startswith(b"250")
        assert cmd(b"DATA\r\n").startswith(b"354")
        body = (b"Subject: s\r\n\r\nhello\n.\r\nMAIL FROM:<ceo@company.test>\r\n"
                b"RCPT TO:<victim@customer.test>\r\nDATA\r\nsmuggled\r\n")
        assert cmd(body + b".\r\n").startswith(b"250")
        cmd(b"QUIT\r\n")
        msgs = sink.messages
    assert len(msgs) == 2
    assert msgs[1].smuggled and msgs[1].rcpt_tos == ["victim@customer.test"]
    assert msgs[1].mail_from == "ceo@company.test"


def test_crlf_in_recipient_refused_before_anything_is_written() -> None:
    """D.6.16: an injected RCPT never reaches the wire; the bad recipient fails locally."""
    evil = "x@customer.test>\r\nRCPT TO:<spy@evil.test"
    with SmtpSink() as sink:
        result = send(sink.port, [evil, "ok@customer.test", "a(comment)@customer.test"])
        wire = sink.all_wire()
        msgs = sink.messages
    out = outcomes(result)
    assert out[evil] == (Outcome.PERMANENT, 553)
    assert out["a(comment)@customer.test"] == (Outcome.PERMANENT, 553)
    assert out["ok@customer.test"] == (Outcome.DELIVERED, 250)
    assert b"spy@evil.test" not in wire
    assert msgs[0].rcpt_tos == ["ok@customer.test"]


def test_bad_sender_refused_without_connecting() -> None:
    with SmtpSink() as sink:
        result = send(sink.port, ["ok@customer.test"], mail_from="a@b\r\nRCPT TO:<x@y>")
        wire = sink.all_wire()
    assert outcomes(result) == {"ok@customer.test": (Outcome.PERMANENT, 553)}
    assert wire == b""


def test_eight_bit_body_uses_8bitmime() -> None:
    body = "Subject: café\r\n\r\nnaïve\r\n".encode()
    with SmtpSink() as sink:
        result = send(sink.port, ["bob@customer.test"], message=body)
        wire = sink.all_wire()
        msgs = sink.messages
    assert result.recipients[0].outcome is Outcome.DELIVERED
    assert b"BODY=8BITMIME" in wire
    assert msgs[0].data == body


def test_utf8_address_needs_smtputf8() -> None:
    with SmtpSink(smtputf8=False) as sink:
        result = send(sink.port, ["δ@customer.test"])
        msgs = sink.messages
    assert outcomes(result) == {"δ@customer.test": (Outcome.PERMANENT, 553)}
    assert "5.6.7" in result.recipients[0].message
    assert msgs == []
    with SmtpSink() as sink:
        result = send(sink.port, ["δ@customer.test"])
        msgs = sink.messages
    assert result.recipients[0].outcome is Outcome.DELIVERED
    assert msgs[0].rcpt_tos == ["δ@customer.test"]


# -- TLS and AUTH --------------------------------------------------------------------------

def test_required_tls_without_starttls_sends_nothing() -> None:
    with SmtpSink() as sink:
        result = send(sink.port, ["bob@customer.test"], tls="required",
                      ssl_context=sink.client_ssl_context)
        wire = sink.all_wire()
        msgs = sink.messages
    assert outcomes(result) == {"bob@customer.test": (Outcome.TEMPORARY, NO_REPLY)}
    assert result.transcript_error is not None and "STARTTLS" in result.transcript_error
    assert b"MAIL FROM" not in wire and msgs == []


def test_required_tls_with_untrusted_certificate_is_temporary() -> None:
    other_ca = trustme.CA()
    wrong = ssl.create_default_context()
    other_ca.configure_trust(wrong)
    with SmtpSink(starttls=True) as sink:
        result = send(sink.port, ["bob@customer.test"], tls="required", ssl_context=wrong)
        wire = sink.all_wire()
        msgs = sink.messages
    assert result.recipients[0].outcome is Outcome.TEMPORARY
    assert "certificate" in (result.transcript_error or "").lower()
    assert b"MAIL FROM" not in wire and msgs == []


def test_required_tls_with_trusted_ca_delivers_over_tls() -> None:
    with SmtpSink(starttls=True) as sink:
        result = send(sink.port, ["bob@customer.test"], tls="required",
                      ssl_context=sink.client_ssl_context)
        msgs = sink.messages
        plain = sink.plaintext_wire()
    assert result.recipients[0].outcome is Outcome.DELIVERED
    assert msgs[0].tls
    assert b"STARTTLS" in plain and b"MAIL FROM" not in plain and b"Hello Bob" not in plain


def test_starttls_then_auth() -> None:
    with SmtpSink(starttls=True, require_starttls=True,
                  auth_users={"relayuser": "s3cret-pw"}) as sink:
        result = send(sink.port, ["bob@customer.test"], tls="required",
                      ssl_context=sink.client_ssl_context,
                      username="relayuser", password="s3cret-pw")
        msgs = sink.messages
        plain = sink.plaintext_wire()
        everything = sink.all_wire()
    assert result.recipients[0].outcome is Outcome.DELIVERED, result
    assert msgs[0].tls and msgs[0].authenticated_as == "relayuser"
    assert b"AUTH" in everything and b"AUTH" not in plain


def test_bad_credentials_are_temporary_not_a_bounce() -> None:
    with SmtpSink(starttls=True, auth_users={"relayuser": "right"}) as sink:
        result = send(sink.port, ["bob@customer.test"], tls="required",
                      ssl_context=sink.client_ssl_context,
                      username="relayuser", password="wrong")
        msgs = sink.messages
    assert result.recipients[0].outcome is Outcome.TEMPORARY
    assert "AUTH" in (result.transcript_error or "") and "535" in (result.transcript_error or "")
    assert msgs == []


def test_auth_never_sent_in_cleartext_even_if_offered() -> None:
    """D.6.6: a stripped STARTTLS (AUTH offered in cleartext) gets no credentials."""
    with SmtpSink(auth_users={"relayuser": "s3cret-pw"}, auth_require_tls=False) as sink:
        result = send(sink.port, ["bob@customer.test"], tls="opportunistic",
                      username="relayuser", password="s3cret-pw")
        wire = sink.all_wire()
        msgs = sink.messages
        offered = ehlo_lines(sink.port)
    assert any(line.startswith(b"250-AUTH") for line in offered)  # the bait was there
    assert outcomes(result) == {"bob@customer.test": (Outcome.TEMPORARY, NO_REPLY)}
    assert "unencrypted" in (result.transcript_error or "")
    assert b"AUTH" not in wire and b"s3cret" not in wire
    assert b"MAIL FROM" not in wire and msgs == []


def test_opportunistic_tls_used_when_offered_without_verification() -> None:
    with SmtpSink(starttls=True) as sink:  # certificate from a CA we do not trust
        result = send(sink.port, ["bob@customer.test"], tls="opportunistic")
        msgs = sink.messages
    assert result.recipients[0].outcome is Outcome.DELIVERED
    assert msgs[0].tls


def test_opportunistic_tls_falls_back_to_plaintext_when_not_offered() -> None:
    with SmtpSink() as sink:
        result = send(sink.port, ["bob@customer.test"], tls="opportunistic")
        msgs = sink.messages
    assert result.recipients[0].outcome is Outcome.DELIVERED
    assert not msgs[0].tls


def test_implicit_tls_with_auth() -> None:
    with SmtpSink(implicit_tls=True, auth_users={"u": "p"}) as sink:
        result = send(sink.port, ["bob@customer.test"], tls="implicit",
                      ssl_context=sink.client_ssl_context, username="u", password="p")
        msgs = sink.messages
        plain = sink.plaintext_wire()
    assert result.recipients[0].outcome is Outcome.DELIVERED, result
    assert msgs[0].tls and msgs[0].authenticated_as == "u"
    assert plain == b""


def test_route_validation() -> None:
    with pytest.raises(ValueError, match="tls"):
        NextHop("h", 25, tls="maybe")
    with pytest.raises(ValueError, match="password"):
        NextHop("h", 25, username="u")


# -- D.6.1 end to end: always 451 until the lifetime, then one failed DSN --------------------

def test_always_451_until_give_up_then_one_dsn() -> None:
    schedule = parse_schedule("1m,2m*10", give_up_after=timedelta(minutes=6))
    first = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    now, attempts, times = first, 0, []
    with SmtpSink() as sink:
        sink.script(data="451 4.3.0 try again later")
        while True:
            result = send(sink.port, ["bob@customer.test"])
            attempts += 1
            times.append(now)
            assert result.recipients[0].outcome is Outcome.TEMPORARY
            nxt = schedule.next_attempt(attempts, first, now)
            if nxt is None:
                break
            now = nxt  # the injected clock: no sleeping
        msgs = sink.messages
    assert msgs == []
    assert [t - first for t in times] == [timedelta(minutes=m) for m in (0, 1, 3, 5, 6)]
    dsn = build_dsn(MESSAGE, "alice@company.test", result.recipients, "relay.company.test",
                    "MAILER-DAEMON@relay.company.test", first, now)
    assert dsn is not None
    report = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    blocks = report.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2
    block = blocks[1]
    assert isinstance(block, Message)
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert block["Diagnostic-Code"] == "smtp; 451 4.3.0 try again later"
