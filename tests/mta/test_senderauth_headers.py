"""The sender verifier looks for a DKIM-Signature or ARC-Seal in the header block only (as
dkimpy reads them), not through the body of a large message."""

from __future__ import annotations

from mta.senderauth import _ARC_SEAL_RE, _DKIM_SIGNATURE_RE, _has_header, _split_headers


def test_a_signature_header_is_found_in_the_header_block_only() -> None:
    head = b"From: a@b.test\r\nDKIM-Signature: v=1; d=b.test\r\nSubject: x\r\n\r\n"
    assert _has_header(_DKIM_SIGNATURE_RE, head + b"body\r\n")
    assert _has_header(_DKIM_SIGNATURE_RE, head.replace(b"\r\n", b"\n"))
    assert _has_header(_DKIM_SIGNATURE_RE, b"dkim-signature :x\r\n")  # no body at all
    body_only = (b"From: a@b.test\r\nSubject: x\r\n\r\n" + b"A" * 2_000_000
                 + b"\r\nDKIM-Signature: v=1\r\nARC-Seal: i=1\r\n")
    assert not _has_header(_DKIM_SIGNATURE_RE, body_only)
    assert not _has_header(_ARC_SEAL_RE, body_only)
    assert _has_header(_ARC_SEAL_RE, b"ARC-Seal: i=1\n\nbody\n")


def test_split_headers_stops_at_the_blank_line() -> None:
    raw = b"From: a@b.test\r\nTo: c@d.test,\r\n e@f.test\r\n\r\nFrom: body@x.test\r\n"
    assert _split_headers(raw) == [("from", b"a@b.test"), ("to", b"c@d.test, e@f.test")]
