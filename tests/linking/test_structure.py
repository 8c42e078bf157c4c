"""MIME structure caps (``[limits] mime_depth, mime_parts, header_fields``) read from the raw
bytes before any recursive parse (linking.parse.check_structure): deep nesting is refused with
a reason, and everything the corpus holds stays within the defaults."""

from __future__ import annotations

import base64
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from conftest import corpus_dir
from support.mail import LEAF, nested_multipart, nested_rfc822
from support.mail import STRUCTURE_HEAD as HEAD

from dealmail.config import LimitsConfig
from linking.forwards import find_forwards
from linking.parse import MessageRejected, check_structure, parse_message


@pytest.mark.parametrize("build", [nested_multipart, nested_rfc822])
def test_depth_5000_refused_before_any_recursion(build: object) -> None:
    raw = build(5000)  # type: ignore[operator]
    with pytest.raises(MessageRejected, match="nested deeper than 50 levels"):
        parse_message(raw)
    # The standard library parser itself cannot read it: the cap is what saves us.
    with pytest.raises(RecursionError):
        BytesParser(policy=policy.default).parsebytes(raw).as_bytes()


@pytest.mark.parametrize("build", [nested_multipart, nested_rfc822])
def test_depth_at_the_cap_is_read_whole(build: object) -> None:
    raw = build(50)  # type: ignore[operator]
    parsed = parse_message(raw)
    assert parsed.from_.address == "alice@example.com"
    assert parsed.snippet  # the body walk works at the cap, in this thread's stack
    find_forwards(parsed.full)
    with pytest.raises(MessageRejected):
        parse_message(build(51))  # type: ignore[operator]


def test_part_and_header_caps() -> None:
    parts = b"".join(b"--p\r\nContent-Type: text/plain\r\n\r\n%d\r\n" % i for i in range(12))
    raw = HEAD + b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + parts + b"--p--\r\n"
    check_structure(raw, LimitsConfig(mime_parts=13))
    with pytest.raises(MessageRejected, match="more than 12 MIME parts"):
        check_structure(raw, LimitsConfig(mime_parts=12))
    many = HEAD + b"".join(b"X-Filler-%d: y\r\n" % i for i in range(1000)) + b"\r\nbody\r\n"
    with pytest.raises(MessageRejected, match="more than 1000 header fields"):
        parse_message(many)


def test_boundaries_after_any_line_end_and_digest_defaults() -> None:
    """The parser splits lines at CR, LF or CRLF, and the parts of a multipart/digest are
    messages by default (RFC 2046 §5.1.5): the depth counted is the depth it reaches."""
    inner = b"From: x@y.test\r\n\r\nhi\r\n"
    digest = (b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n' + inner
              + b"--d--\r\n")
    check_structure(HEAD + digest, LimitsConfig(mime_depth=2))
    with pytest.raises(MessageRejected):
        check_structure(HEAD + digest, LimitsConfig(mime_depth=1))
    bare_cr = nested_multipart(3).replace(b"\r\n", b"\r")
    with pytest.raises(MessageRejected):
        check_structure(bare_cr, LimitsConfig(mime_depth=2))
    check_structure(bare_cr, LimitsConfig(mime_depth=3))


def test_attached_eml_too_deep_is_not_parsed() -> None:
    """An attached .eml is base64 inside the message: its own structure is checked before
    the forward reader parses it."""
    eml = base64.encodebytes(nested_rfc822(2000, head=b"From: Ann <ann@customer.test>\r\n"))
    raw = (b"From: Alice <alice@example.com>\r\nTo: example@dealmail.localhost\r\n"
           b"Subject: Fwd\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n' + LEAF
           + b'--o\r\nContent-Type: application/octet-stream; name="x.eml"\r\n'
           b'Content-Disposition: attachment; filename="x.eml"\r\n'
           b"Content-Transfer-Encoding: base64\r\n\r\n" + eml.replace(b"\n", b"\r\n")
           + b"--o--\r\n")
    parsed = parse_message(raw)
    assert find_forwards(parsed.full) == []


def _corpus_files() -> list[Path]:
    base = corpus_dir("mime")
    return sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in (".eml", ".txt"))


def test_corpus_within_the_default_caps() -> None:
    """Real mail, malformed mail included, is never refused by the structure caps."""
    files = _corpus_files()
    assert len(files) > 100
    for path in files:
        check_structure(path.read_bytes())
