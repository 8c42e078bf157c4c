"""Lines longer than RFC 5322's 998 octets are fitted before sending (mta.relay.longlines):
the part that has them is re-encoded, a long header is folded, every other byte stays, and
the decoded content is what it was."""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from email.message import Message

from support.mail import long_line_corpus

from mta.relay.longlines import fit_line_length, has_long_line

HTML = b"<html><body>" + b"<p>caf\xc3\xa9 <b>offer</b>\t</p>" * 300 + b"</body></html>"


def leaves(raw: bytes) -> list[Message]:
    return [p for p in message_from_bytes(raw, policy=policy.compat32).walk()
            if not p.is_multipart()]


def decoded(raw: bytes) -> list[bytes | None]:
    out = []
    for part in leaves(raw):
        payload = part.get_payload(decode=True)
        # Quoted-printable ends a text part with the line end it had; compare the text.
        out.append(payload.rstrip(b"\r\n") if isinstance(payload, bytes) else payload)
    return out


def test_a_message_that_fits_is_returned_as_it_is() -> None:
    raw = b"From: a@example.com\r\nSubject: s\r\n\r\n" + b"x" * 998 + b"\r\n"
    assert fit_line_length(raw) is raw


def test_single_line_html_becomes_quoted_printable() -> None:
    raw = (b"From: Alice <alice@example.com>\r\nTo: ann@customer.test\r\nSubject: offer\r\n"
           b"Content-Type: text/html; charset=utf-8\r\n\r\n" + HTML + b"\r\n")
    out = fit_line_length(raw)
    assert not has_long_line(out)
    assert b"\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n" in out
    assert out.startswith(raw[:raw.index(b"\r\n\r\n")])  # the header fields are kept
    assert decoded(out) == [HTML]
    assert b"\n" not in out.replace(b"\r\n", b"")  # CRLF only, no bare LF to smuggle with
    assert fit_line_length(out) is out  # idempotent: a signed copy is never changed again


def test_parts_of_a_multipart_are_fitted_alone() -> None:
    b64 = b"QUJD" * 2000
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="b"\r\n\r\npreamble\r\n'
           b"--b\r\nContent-Type: text/plain\r\n\r\nshort text\r\n"
           b"--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           + HTML + b"\r\n--b\r\nContent-Type: application/pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"\r\n"
           b"--b\r\nContent-Type: application/octet-stream\r\n\r\n" + b"\x01" * 2000
           + b"\r\n--b--\r\nepilogue\r\n")
    out = fit_line_length(raw)
    assert not has_long_line(out)
    assert decoded(out) == decoded(raw)
    assert b"--b\r\nContent-Type: text/plain\r\n\r\nshort text\r\n--b\r\n" in out
    assert out.endswith(b"\r\n--b--\r\nepilogue\r\n")
    assert b"\r\n" + b64[:76] + b"\r\n" in out  # base64 only re-wrapped
    types = [(p.get_content_type(), p.get("Content-Transfer-Encoding")) for p in leaves(out)]
    assert types == [("text/plain", None), ("text/html", "quoted-printable"),
                     ("application/pdf", "base64"), ("application/octet-stream", "base64")]


def test_a_long_header_is_folded_at_white_space() -> None:
    refs = b" ".join(b"<%d@example.com>" % i for i in range(200))
    raw = b"From: a@example.com\r\nReferences: " + refs + b"\r\nSubject: s\r\n\r\nbody\r\n"
    out = fit_line_length(raw)
    assert not has_long_line(out)
    assert re.sub(rb"\r\n(?=[ \t])", b"", out) == raw  # unfolding gives the original back


def test_corpus_messages_with_long_lines_keep_their_content() -> None:
    """Every body line fits; a header line is left long only when it has no white space to
    fold at (a 6,144-bit signature in one token: RFC 5322 §2.2.3 folds only at WSP)."""
    files = long_line_corpus()
    assert len(files) >= 10
    for path in files:
        raw = re.sub(rb"\r?\n", b"\r\n", path.read_bytes())
        out = fit_line_length(raw)
        head, _, body = out.partition(b"\r\n\r\n")
        assert not has_long_line(body), path
        for line in head.split(b"\r\n"):
            assert len(line) <= 998 or not re.search(rb"[ \t]", line[1:998]), path
        assert decoded(out) == decoded(raw), path
