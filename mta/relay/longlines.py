"""Lines longer than RFC 5322 §2.1.1 allows (998 octets), made fit to send on.

dealmail accepts and stores such lines as received (single-line base64 and generated HTML
are common, and Postfix accepts them), but what it sends must not carry them: a strict next
hop refuses the message, a lenient one breaks the line somewhere. :func:`fit_line_length`
rewrites only what is too long, leaving every other byte as it was:

* a leaf part (or a single-part message) with a long line in its body gets a new
  Content-Transfer-Encoding (RFC 2045 §6): quoted-printable for text, so it stays
  readable, base64 otherwise; a part that already was base64 is only re-wrapped at 76
  characters (RFC 2045 §6.8), its content untouched;
* a header line that is too long is folded at white space (RFC 5322 §2.2.3), which
  unfolding undoes exactly.

The relay calls it before DKIM signing (so the signature covers what leaves); the outbox
worker calls it again before each delivery for everything dealmail composes itself, where
it changes nothing in a message that already fits (a signed relay copy stays as signed).
"""

from __future__ import annotations

import binascii
import logging
import quopri
import re

from dealmail.config import LimitsConfig
from linking.parse import MessageRejected, mime_entities

__all__ = ["LIMIT", "fit_line_length", "has_long_line"]

log = logging.getLogger("dealmail.relay")

#: RFC 5322 §2.1.1: "Each line of characters MUST be no more than 998 characters".
LIMIT = 998
_B64_WIDTH = 76  # RFC 2045 §6.8
_CTE_FIELD_RE = re.compile(
    rb"(?im)^content-transfer-encoding[ \t]*:[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*")
_CTE_VALUE_RE = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:[ \t]*([^\s;]*)")
_MIME_VERSION_RE = re.compile(rb"(?im)^mime-version[ \t]*:")
# A walk of the structure for re-encoding only; the listener already applied the configured
# caps, and a structure beyond these is sent as it is rather than refused at delivery.
_WALK_LIMITS = LimitsConfig(mime_depth=100, mime_parts=100_000, header_fields=100_000)


def has_long_line(data: bytes, limit: int = LIMIT) -> bool:
    """Whether a line of ``data`` (without its CR LF) is longer than ``limit`` octets."""
    if len(data) <= limit:
        return False
    return any(len(line) > limit and len(line.rstrip(b"\r")) > limit
               for line in data.split(b"\n"))


def fit_line_length(raw: bytes) -> bytes:
    """``raw`` with no line longer than 998 octets where it can be done without changing
    what the message says (see the module docstring); ``raw`` itself when nothing is too
    long. A line that cannot be fitted (a header without white space to fold at, a long line
    in a multipart preamble) is left and logged."""
    if not has_long_line(raw):
        return raw
    out = bytearray()
    pos = 0
    try:
        for entity in mime_entities(raw, _WALK_LIMITS):
            header = raw[entity.header_start:entity.body_start]
            fitted = _fold_header_block(header)
            if entity.body_end is None:
                if fitted != header:
                    out += raw[pos:entity.header_start] + fitted
                    pos = entity.body_start
                continue
            body = raw[entity.body_start:entity.body_end]
            if has_long_line(body) and not entity.content_type.startswith(
                    ("multipart/", "message/")):
                fitted, body = _reencode(fitted, body, entity.content_type,
                                         top=entity.header_start == 0)
            elif fitted == header:
                continue
            out += raw[pos:entity.header_start] + fitted + body
            pos = entity.body_end
    except MessageRejected as exc:
        log.warning("long lines left as they are: %s", exc.reason)
        return raw
    out += raw[pos:]
    fitted_raw = bytes(out)
    if has_long_line(fitted_raw):
        log.warning("a line longer than %d octets could not be fitted (no white space to "
                    "fold a header at, or outside every part)", LIMIT)
    return fitted_raw


def _fold_line(line: bytes) -> bytes:
    """One header line folded at white space so that each piece fits (RFC 5322 §2.2.3:
    folding inserts CRLF before white space, unfolding removes it again)."""
    pieces: list[bytes] = []
    rest = line
    while len(rest) > LIMIT:
        cut = max(rest.rfind(b" ", 1, LIMIT), rest.rfind(b"\t", 1, LIMIT))
        if cut <= 0 or not rest[:cut].strip():
            break  # nowhere to fold: left as it is
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    return b"\r\n".join(pieces)


def _fold_header_block(header: bytes) -> bytes:
    if not has_long_line(header):
        return header
    lines = header.split(b"\n")
    out = []
    for line in lines:
        cr = line.endswith(b"\r")
        content = line[:-1] if cr else line
        if len(content) > LIMIT:
            content = _fold_line(content)
        out.append(content + (b"\r" if cr else b""))
    return b"\n".join(out)


def _split_separator(header: bytes) -> tuple[bytes, bytes]:
    """(the header fields, the empty line that ends them); a block that ended without an
    empty line (the body began at once, a defect) gets one."""
    for sep in (b"\r\n", b"\n"):
        if header == sep:
            return b"", sep
        if header.endswith(sep + sep):
            return header[:-len(sep)], sep
    if header and not header.endswith(b"\n"):
        header += b"\r\n"
    return header, b"\r\n"


def _reencode(header: bytes, body: bytes, content_type: str, *,
              top: bool) -> tuple[bytes, bytes]:
    """A new header block and body for one leaf whose body has a line that is too long."""
    found = _CTE_VALUE_RE.search(header)
    cte = found.group(1).lower() if found else b""
    if cte == b"base64":
        encoding = b"base64"
        clean = b"".join(body.split())
        new_body = b"\r\n".join(clean[i:i + _B64_WIDTH]
                                for i in range(0, len(clean), _B64_WIDTH))
    else:
        content = quopri.decodestring(body) if cte == b"quoted-printable" else body
        if content_type.startswith("text/"):
            encoding = b"quoted-printable"
            # Line breaks of a text part are CRLF (RFC 2046 §4.1.1); b2a_qp breaks lines
            # with the first line end it meets, so it is given LF alone and every LF of its
            # output (hard and soft breaks) becomes CRLF; a stray CR is encoded as =0D.
            qp = binascii.b2a_qp(content.replace(b"\r\n", b"\n"), quotetabs=False,
                                 istext=True, header=False)
            new_body = qp.replace(b"\n", b"\r\n")
        else:
            encoding = b"base64"
            encoded = binascii.b2a_base64(content, newline=False)
            new_body = b"\r\n".join(encoded[i:i + _B64_WIDTH]
                                    for i in range(0, len(encoded), _B64_WIDTH))
    if body.endswith(b"\n") and not new_body.endswith(b"\n"):
        new_body += b"\r\n"
    fields, sep = _split_separator(_CTE_FIELD_RE.sub(b"", header))
    fields += b"Content-Transfer-Encoding: " + encoding + b"\r\n"
    if top and _MIME_VERSION_RE.search(fields) is None:
        # RFC 2045 §4: a Content-Transfer-Encoding means something only in a MIME message.
        fields += b"MIME-Version: 1.0\r\n"
    return fields + sep, new_body
