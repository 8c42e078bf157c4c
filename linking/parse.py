"""Reading a received message: the cheap header parse on the hot path, and the body on demand.

Measured here (docs/architecture.md): parsing with ``email.policy.default`` costs ~1.6 ms per
message, the ``compat32`` header parse ~0.08 ms. Linking needs only From/To/Cc/Subject/Date and
the threading headers, so :func:`parse_message` splits the header block at the first blank line
and parses only that with ``compat32``, decoding RFC 2047 words itself. The body (snippet,
attachments, forwarded originals) is parsed when asked for, and for a large message only its
MIME structure is walked, never its payloads held decoded.
"""

from __future__ import annotations

import hashlib
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import Compat32
from email.utils import parsedate_to_datetime
from functools import cached_property

from dealmail.addresses import (
    AddressError,
    Mailbox,
    decode_words,
    parse_address_list,
    parse_strict_mailbox,
)
from dealmail.config import LimitsConfig

__all__ = [
    "NESTED_TOO_DEEPLY",
    "Entity",
    "MessageRejected",
    "ParsedMessage",
    "check_structure",
    "decode_text_part",
    "mime_entities",
    "normalize_subject",
    "parse_message",
]

# RFC 5322 §3.6: these fields occur at most once. A duplicate From is how a forged sender hides
# above a signed one (docs/reliability.md B.7), so duplicates of the identity fields are refused.
_SINGLETONS_REFUSED = ("from", "sender")
_SINGLETONS = ("to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
               "references")
_MAX_HEADER_BYTES = 256 * 1024
_MAX_HEADER_FIELDS = 1000
_MSGID_RE = re.compile(r"<([^<>\s]+)>")
_SUBJECT_PREFIX_RE = re.compile(
    r"^\s*(?:(?:re|fw|fwd|aw|wg|sv|vs|rv|tr|réf|ref|antw|odp|vá|továbbítás|ynt|İlt|ilt|"
    r"enc|res|r|i|doorst|fs|vl|vb|πρθ|απ|отв|пересл|ha|答复|回复|回覆|转发|轉寄|転送|返信|"
    r"fwd?\.?)\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*)+",
    re.IGNORECASE,
)
_JA_CHARSET_ALIASES = {
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932",
    "windows-31j": "cp932", "iso-2022-jp": "iso2022_jp_ext", "euc-jp": "euc_jis_2004",
    "ks_c_5601-1987": "cp949", "gb2312": "gb18030", "gbk": "gb18030",
}
_SNIPPET_READ = 64 * 1024
# Bytes that are not in the base64 alphabet (RFC 4648 §4; '=' padding included here).
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")))
_HASH_CHUNK = 1 << 20


class _Rfc6532Compat32(Compat32):
    """``compat32`` header parsing (the fast one) that reads raw 8-bit header bytes as UTF-8,
    as RFC 6532 §3.2 allows once SMTPUTF8 was offered, instead of handing them back as
    undecodable ``unknown-8bit`` (shown as U+FFFD). Bytes that are not UTF-8 are read as
    Windows-1252, the usual legacy 8-bit header charset, and reported as a defect."""

    def header_fetch_parse(self, name: str, value: str) -> str:  # type: ignore[override]
        if _has_surrogates(value):
            return _decode_8bit(value)[0]
        return value


_RFC6532 = _Rfc6532Compat32()


#: The characters ``surrogateescape`` makes of raw bytes 0x80-0xFF (PEP 383).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _has_surrogates(value: str) -> bool:
    # Called for every header value the parse reads (about 20 per message): an ASCII value,
    # nearly all of them, is ruled out by one C call instead of a Python loop over its
    # characters (2.6 us -> 0.06 us for a 60-character To line).
    return not value.isascii() and _ESCAPED_BYTE.search(value) is not None


def _decode_8bit(value: str) -> tuple[str, bool]:
    """(text, was UTF-8) of a header value parsed with ``surrogateescape``."""
    raw = value.encode("ascii", "surrogateescape")
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace"), False


def _eight_bit_defects(headers: Message) -> list[str]:
    """The lossy steps of reading raw 8-bit headers, for ``dealmail inspect``."""
    out = []
    for name, value in headers.raw_items():
        if isinstance(value, str) and _has_surrogates(value) and not _decode_8bit(value)[1]:
            out.append(f"{name} header has 8-bit bytes that are not UTF-8 (RFC 6532): "
                       "read as Windows-1252")
    return out


#: The reason given when a recursive walk still hit Python's recursion limit (the last guard
#: behind :func:`check_structure`).
NESTED_TOO_DEEPLY = "MIME structure nested too deeply"


class MessageRejected(Exception):
    """The message cannot be interpreted safely; answered ``554 5.6.0`` with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalize_subject(subject: str) -> str:
    """Subject without reply/forward prefixes in any language, case-folded, spaces collapsed:
    the last-resort thread key."""
    s = " ".join(subject.split())
    prev = None
    while prev != s:
        prev = s
        s = _SUBJECT_PREFIX_RE.sub("", s).strip()
        s = re.sub(r"^\[(?:fwd?|ext|external)[^\]]*\]\s*", "", s, flags=re.IGNORECASE)
    return s.casefold()[:300]


def _msgids(value: str | None) -> list[str]:
    if not value:
        return []
    return [f"<{x}>" for x in _MSGID_RE.findall(value)]


def _charset(name: str | None) -> str:
    name = (name or "us-ascii").strip().strip('"').lower()
    return _JA_CHARSET_ALIASES.get(name, name)


def decode_text_part(part: Message) -> str:
    """Decode a text part's payload with its declared charset (Japanese aliases widened to their
    supersets, as mail clients actually send cp932 labelled Shift_JIS); never raises."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = _charset(part.get_content_charset())
    for cs in (charset, "utf-8", "cp1252"):
        try:
            return payload.decode(cs)
        except (LookupError, UnicodeDecodeError):
            continue
    return payload.decode("utf-8", "replace")


def part_text(part: Message) -> str:
    """The text of a text part: the content manager's decoding for a ``policy.default``
    part, else :func:`decode_text_part`; never raises (malformed MIME is common)."""
    if isinstance(part, EmailMessage):
        try:
            content = part.get_content()
            if isinstance(content, str):
                return content
        except (LookupError, UnicodeError, KeyError, ValueError, AssertionError):
            pass
    return decode_text_part(part)


@dataclass
class ParsedMessage:
    """What linking needs from one message, read from its header block."""

    raw: bytes
    headers: Message
    from_: Mailbox
    to: list[Mailbox]
    cc: list[Mailbox]
    subject: str
    date: datetime | None
    message_id: str | None
    in_reply_to: str | None
    references: list[str]
    thread_index: str | None
    auto_reason: str | None
    header_bytes: int
    defects: list[str] = field(default_factory=list)
    #: The MIME entities the structure check found, for the summary (None: not checked;
    #: the summary then walks them itself).
    entities: list[Entity] | None = field(default=None, repr=False, compare=False)

    @property
    def is_auto(self) -> bool:
        return self.auto_reason is not None

    @cached_property
    def content_hash(self) -> str:
        """Hash of the normalised content: header fields that identify the message plus the
        body with line endings and trailing white space normalised, so a relay that rewraps
        line endings does not make a second email."""
        h = hashlib.sha256()
        for name in ("from", "to", "cc", "subject", "date"):
            values = " ".join(" ".join(str(v).split()) for v in self.headers.get_all(name, []))
            h.update(f"{name}:{values}\n".encode("utf-8", "surrogateescape"))
        # In chunks cut at line ends, so a 25 MB body is never copied whole (the memory
        # budget is 4x the message size); trailing newlines are not part of the content.
        raw, pos, end = self.raw, self.header_bytes, len(self.raw)
        while end > pos and raw[end - 1] in b"\r\n \t":
            end -= 1
        while pos < end:
            cut = raw.find(b"\n", min(pos + _HASH_CHUNK, end), end)
            cut = end if cut == -1 else cut + 1
            h.update(_normalize_eol(raw[pos:cut]))
            pos = cut
        return h.hexdigest()

    @property
    def dedupe_key(self) -> str:
        return self.message_id or f"hash:{self.content_hash}"

    @cached_property
    def full(self) -> EmailMessage:
        """The whole message parsed with ``policy.default`` (for forwards and replies)."""
        msg = BytesParser(policy=policy.default).parsebytes(self.raw)
        assert isinstance(msg, EmailMessage)
        return msg

    @cached_property
    def body_summary(self) -> tuple[str, list[dict[str, object]]]:
        """(snippet, attachments) from the MIME structure."""
        return _summarise(self.raw, self.headers, self.entities)

    @property
    def snippet(self) -> str:
        return self.body_summary[0]

    @property
    def attachments(self) -> list[dict[str, object]]:
        return self.body_summary[1]


def _normalize_eol(piece: bytes) -> bytes:
    """``re.sub(rb"[ \t]*\r?\n", b"\n", piece)`` without a pattern tried at every byte (4 ms
    per 2 MB attachment in a mailbox sync): CRLF to LF with one replace, then each run of
    white space before an LF cut out where a search finds one (trailing white space is rare,
    and replacing it across the whole piece copied 2 MB each time)."""
    piece = piece.replace(b"\r\n", b"\n")
    space, tab = piece.find(b" \n"), piece.find(b"\t\n")
    if space == -1 and tab == -1:
        return piece
    parts = []
    pos = 0
    while space != -1 or tab != -1:
        at = tab if space == -1 or (tab != -1 and tab < space) else space
        start = at
        while start > pos and piece[start - 1] in b" \t":
            start -= 1
        parts.append(piece[pos:start])
        pos = at + 1  # the LF starts the next part
        if space != -1 and space < pos:
            space = piece.find(b" \n", pos)
        if tab != -1 and tab < pos:
            tab = piece.find(b"\t\n", pos)
    parts.append(piece[pos:])
    return b"".join(parts)


def _split_header_block(raw: bytes) -> int:
    """Offset of the body: just after the first empty line (RFC 5322 §2.1), whichever line
    ending the sender used."""
    # Each search stops where the other found the end: a CRLF message has no "\n\n" at
    # all, and looking for one read every byte of a 2 MB attachment.
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n", 0, len(raw) if crlf == -1 else crlf + 4)
    if lf != -1:
        return lf + 2
    return crlf + 4 if crlf != -1 else len(raw)


# ---------------------------------------------------------------------------- structure

# The standard library parser's rules (email/feedparser.py): a header line, and the line ends
# it splits on (CRLF, bare CR, bare LF alike).
_HEADER_LINE_RE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_DEFAULT_LIMITS = LimitsConfig()


def _line_end(raw: bytes, start: int) -> tuple[int, int]:
    """(end of the line's content, start of the next line) for the line at ``start``."""
    cr = raw.find(b"\r", start)
    lf = raw.find(b"\n", start)
    if cr == -1 and lf == -1:
        return len(raw), len(raw)
    if lf == -1 or (cr != -1 and cr < lf):
        return cr, cr + (2 if raw[cr + 1:cr + 2] == b"\n" else 1)
    return lf, lf + 1


def _entity_headers(raw: bytes, pos: int, default_type: str,
                    limits: LimitsConfig) -> tuple[str, str | None, int]:
    """Read the header block of one entity at ``pos`` as the standard library parser does
    (it ends at an empty line or at the first line that is not a header line): its content
    type, its boundary, and where its body starts. Counts the fields against the cap."""
    fields = 0
    ctype_lines: list[bytes] = []
    in_ctype = False
    end = len(raw)
    while pos < end:
        line_end, nxt = _line_end(raw, pos)
        line = raw[pos:line_end]
        if not line:
            pos = nxt  # the separator line belongs to the header block
            break
        if _HEADER_LINE_RE.match(line) is None:
            break  # the body starts without a separator (a defect the parser tolerates)
        if line[:1] in (b" ", b"\t"):
            if in_ctype:
                ctype_lines.append(line)
        else:
            fields += 1
            if fields > limits.header_fields:
                raise MessageRejected(
                    f"more than {limits.header_fields} header fields in one header block")
            in_ctype = line[:13].lower() == b"content-type:" and not ctype_lines
            if in_ctype:
                ctype_lines.append(line[13:])
        pos = nxt
    if not ctype_lines:
        return default_type, None, pos
    value = b" ".join(x.strip() for x in ctype_lines).decode("ascii", "surrogateescape")
    # As Message.get_content_type does; the boundary (RFC 2231 forms and all) from the
    # email package itself, and only for a multipart (a Message costs ~15 µs).
    ctype = value.split(";", 1)[0].strip().lower()
    if ctype.count("/") != 1:
        return default_type, None, pos
    if not ctype.startswith("multipart/"):
        return ctype, None, pos
    probe = Message()
    probe["Content-Type"] = value
    return ctype, probe.get_boundary(), pos


@dataclass(frozen=True)
class Entity:
    """One MIME entity found by :func:`mime_entities`, as offsets into the raw message."""

    header_start: int
    body_start: int
    #: Where a leaf's body ends (before the line end of the delimiter that follows it);
    #: None for a container (multipart, message/*), whose body is its entities.
    body_end: int | None
    content_type: str


def mime_entities(raw: bytes, limits: LimitsConfig | None = None) -> Iterator[Entity]:
    """The MIME entities of ``raw`` in order, read from the raw bytes as the standard
    library parser reads them (header blocks ending at an empty or non-header line;
    delimiter lines after any line end, RFC 2046 §5.1.1; multipart/digest parts default to
    message/rfc822), with no recursion and no payload decoded. Raises
    :class:`MessageRejected` past the caps of ``limits`` (see :func:`check_structure`)."""
    limits = limits or _DEFAULT_LIMITS
    open_parts: list[tuple[bytes, int, bool]] = []  # (delimiter, depth of its parts, digest)
    parts = 0
    pos = 0
    depth = 0
    default_type = "text/plain"
    end = len(raw)
    # Where each open delimiter next starts a delimiter line (-1: nowhere), searched for as
    # a whole: searching for every line that starts with "--" stopped at each CR of a
    # base64 attachment (10 ms for 2 MB). A delimiter at the very start of the data has no
    # line end before it: the top-level entity's header block comes first, so none can be
    # there.
    next_hit: dict[bytes, int] = {}
    while True:
        # One entity and the chain of message/* entities inside it.
        while True:
            parts += 1
            if parts > limits.mime_parts:
                raise MessageRejected(f"more than {limits.mime_parts} MIME parts")
            if depth > limits.mime_depth:
                raise MessageRejected(
                    f"MIME structure nested deeper than {limits.mime_depth} levels")
            header_start = pos
            ctype, boundary, pos = _entity_headers(raw, pos, default_type, limits)
            default_type = "text/plain"
            if ctype.startswith("message/"):
                # Its body is a whole message (for delivery-status, blocks of header
                # fields the parser reads as messages): another header block follows.
                yield Entity(header_start, pos, None, ctype)
                depth += 1
                continue
            if ctype.startswith("multipart/") and boundary:
                yield Entity(header_start, pos, None, ctype)
                open_parts.append((b"--" + boundary.encode("ascii", "surrogateescape"),
                                   depth + 1, ctype == "multipart/digest"))
                leaf = None
            else:
                leaf = (header_start, pos, ctype)
            break
        # The next delimiter line of an open multipart (an outer one closes inner ones).
        found = False
        while open_parts and pos < end:
            # The first delimiter line of any open multipart, from cached searches (a search
            # per candidate would make a long message quadratic).
            hits = []
            for delimiter, _depth, _digest in open_parts:
                hit = next_hit.get(delimiter, -2)
                if hit != -1 and hit < pos:
                    hit = next_hit[delimiter] = _delimiter_line(raw, delimiter, pos)
                if hit != -1:
                    hits.append(hit)
            if not hits:
                pos = end
                break
            start = min(hits)
            line_end, nxt = _line_end(raw, start)
            line = raw[start:line_end].rstrip(b" \t")
            for index in range(len(open_parts) - 1, -1, -1):
                delimiter, part_depth, digest = open_parts[index]
                if line == delimiter or line == delimiter + b"--":
                    if leaf is not None:
                        # RFC 2046 §5.1.1: the line end before a delimiter belongs to it.
                        cut = start - (2 if raw[start - 2:start] == b"\r\n" else 1)
                        yield Entity(leaf[0], leaf[1], max(cut, leaf[1]), leaf[2])
                        leaf = None
                    if line == delimiter:
                        del open_parts[index + 1:]
                        depth = part_depth
                        default_type = "message/rfc822" if digest else "text/plain"
                        found = True
                    else:
                        del open_parts[index:]
                    break
            pos = nxt
            if found:
                break
        if not found:
            if leaf is not None:
                yield Entity(leaf[0], leaf[1], end, leaf[2])
            return


def _delimiter_line(raw: bytes, delimiter: bytes, pos: int) -> int:
    """Where the first line at or after ``pos`` that is ``delimiter`` or its closing form
    starts (RFC 2046 §5.1.1: after a line end, white space allowed before the next one);
    -1 when there is none."""
    while (i := raw.find(delimiter, pos)) != -1:
        if i > 0 and raw[i - 1] in b"\r\n":
            line_end, _next = _line_end(raw, i)
            rest = raw[i + len(delimiter):line_end].rstrip(b" \t")
            if rest in (b"", b"--"):
                return i
        pos = i + 1
    return -1


def check_structure(raw: bytes, limits: LimitsConfig | None = None) -> list[Entity]:
    """Refuse a message whose MIME structure is beyond the caps of ``limits`` (``[limits]``:
    nesting depth of multipart and message/* entities, number of parts, header fields per
    header block), reading only the raw bytes (:func:`mime_entities`). Run before anything
    parses the whole message: the standard library's parser and generator recurse once or
    more per level (depth 300 exhausts Python's recursion limit), and a permanent condition
    must get a permanent answer, 554 5.6.0, not a RecursionError's 451. Returns the
    entities, so that the message's summary does not walk them again."""
    return list(mime_entities(raw, limits))


def parse_message(raw: bytes, limits: LimitsConfig | None = None) -> ParsedMessage:
    """Parse the header block; raises :class:`MessageRejected` with a precise reason when the
    message has no single readable From, its identity headers are ambiguous, or its
    structure is beyond the caps of ``limits`` (:func:`check_structure`)."""
    header_end = _split_header_block(raw)
    if header_end > _MAX_HEADER_BYTES:
        raise MessageRejected(f"header block larger than {_MAX_HEADER_BYTES} bytes")
    entities = check_structure(raw, limits)
    block = raw[:header_end]
    if b"\x00" in block:
        raise MessageRejected("NUL byte in the header block")
    headers = BytesHeaderParser(policy=_RFC6532).parsebytes(block)
    if len(headers) > _MAX_HEADER_FIELDS:
        raise MessageRejected(f"more than {_MAX_HEADER_FIELDS} header fields")
    for name in _SINGLETONS_REFUSED:
        if len(headers.get_all(name, [])) > 1:
            raise MessageRejected(f"more than one {name.title()} header (RFC 5322 §3.6)")
    defects = [f"duplicate {n} header" for n in _SINGLETONS if len(headers.get_all(n, [])) > 1]
    from_values = headers.get_all("from", [])
    if not from_values:
        raise MessageRejected("no From header")
    try:
        sender = parse_strict_mailbox(str(from_values[0]))
    except AddressError as exc:
        raise MessageRejected(f"unreadable From header: {exc}") from exc
    defects.extend(_eight_bit_defects(headers))
    dropped: list[str] = []
    to = parse_address_list([str(v) for v in headers.get_all("to", [])], dropped)
    cc = parse_address_list([str(v) for v in headers.get_all("cc", [])], dropped)
    defects.extend(f"To/Cc entry {d[:80]!r} is not an address: not a participant"
                   for d in dropped)
    subject = decode_words(str(headers.get("subject", "")))
    date: datetime | None = None
    raw_date = headers.get("date")
    if raw_date:
        try:
            date = parsedate_to_datetime(str(raw_date))
            if date.tzinfo is None:  # RFC 5322 §3.3 "-0000": no zone information
                date = date.replace(tzinfo=UTC)
        except (TypeError, ValueError, IndexError):
            defects.append("unparseable Date header")
    mids = _msgids(str(headers.get("message-id", "")))
    in_reply = _msgids(str(headers.get("in-reply-to", "")))
    refs = _msgids(" ".join(str(v) for v in headers.get_all("references", [])))
    tindex = headers.get("thread-index")
    return ParsedMessage(
        raw=raw,
        headers=headers,
        from_=sender,
        to=to,
        cc=cc,
        subject=subject,
        date=date,
        message_id=mids[0][:400] if mids else None,
        in_reply_to=in_reply[0][:400] if in_reply else None,
        references=refs,
        thread_index=str(tindex).strip()[:64] if tindex else None,
        auto_reason=auto_submitted_reason(headers),
        header_bytes=header_end,
        entities=entities,
        defects=defects,
    )


MARKER_HEADER = "X-Dealmail-Auto"


def auto_submitted_reason(headers: Message) -> str | None:
    """Why a message must never be linked or answered (RFC 3834 §5; loop prevention)."""
    if headers.get(MARKER_HEADER) is not None:
        return f"carries dealmail's own {MARKER_HEADER} header"
    auto = str(headers.get("auto-submitted", "")).strip().lower()
    if auto and not auto.startswith("no"):
        return f"Auto-Submitted: {auto}"
    prec = str(headers.get("precedence", "")).strip().lower()
    if prec in ("bulk", "junk", "list", "auto_reply"):
        return f"Precedence: {prec}"
    if headers.get("x-autoreply") is not None or headers.get("x-autorespond") is not None:
        return "X-Autoreply header"
    if str(headers.get("x-auto-response-suppress", "")).strip().lower() in ("all", "oof"):
        return "X-Auto-Response-Suppress (Microsoft auto reply)"
    return None


def _summarise(raw: bytes, top: Message | None = None,
               entities: list[Entity] | None = None) -> tuple[str, list[dict[str, object]]]:
    """(snippet, attachments) read from the raw MIME entities (:func:`mime_entities`):
    only the part header blocks are parsed, attachments are measured without decoding them
    and only the part that gives the snippet is decoded (the whole-message parse took 6 ms
    for a 400 KB message, most of a mailbox sync's reading time)."""
    snippet = ""
    attachments: list[dict[str, object]] = []
    if entities is None:
        try:
            entities = list(mime_entities(raw))
        except MessageRejected:
            return "", []  # beyond the structure caps: refused before it is stored anyway
    for entity in entities:
        if entity.body_end is None:
            continue  # a multipart or message/* container: its entities follow
        if entity.header_start == 0 and top is not None:
            # The top-level entity's header block is parsed already: its MIME fields, in a
            # message of their own (its payload is set below; the parsed headers stay as
            # they are).
            head = Message()
            for name in _MIME_FIELDS:
                for value in top.get_all(name, []):
                    head[name] = value
        else:
            head = BytesHeaderParser(policy=policy.compat32).parsebytes(
                raw[entity.header_start:entity.body_start])
        # The content type as the whole-message parse sees it (mime_entities gives the
        # parent's default for a part without one, e.g. message/rfc822 in a digest).
        ctype = head.get_content_type() if head.get("content-type") else entity.content_type
        disp = str(head.get("content-disposition", "")).split(";")[0].strip().lower()
        filename = head.get_filename()
        if filename or disp == "attachment" or not ctype.startswith(("text/", "message/")):
            attachments.append({
                "filename": decode_words(filename or ""), "content_type": ctype,
                "size": _decoded_size(head, raw, entity.body_start, entity.body_end)})
            continue
        if snippet or ctype not in ("text/plain", "text/html"):
            continue
        # Enough of the part for a 400-character snippet, cut at a line end, decoded with
        # its header block's charset and transfer encoding (no line-by-line parse).
        body_end = entity.body_end
        if body_end - entity.body_start > _SNIPPET_READ:
            cut = raw.rfind(b"\n", entity.body_start, entity.body_start + _SNIPPET_READ)
            body_end = cut + 1 if cut > entity.body_start else body_end
        head.set_payload(raw[entity.body_start:body_end].decode("ascii", "surrogateescape"))
        text = decode_text_part(head)
        if ctype == "text/plain":
            snippet = _snip(text)
        else:
            from .htmltext import html_to_text  # lazy: only HTML-only mail needs it

            snippet = _snip(html_to_text(text))
    return snippet, attachments


_MIME_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition")


def _decoded_size(head: Message, raw: bytes, start: int, end: int) -> int:
    """Size of a part's payload once its transfer encoding is undone, without keeping the
    decoded bytes where that can be avoided: base64 by counting its alphabet characters
    (RFC 2045 §6.8: everything else is ignored, as the email package's decoder does),
    identity encodings as they stand, the rest (quoted-printable, uuencode) decoded."""
    cte = str(head.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        # In 1 MiB slices: a 25 MB attachment is never copied whole (the memory budget of
        # a message is 4x its size above idle, see bench scale).
        chars = sum(len(raw[i:min(i + _HASH_CHUNK, end)].translate(None, _NOT_BASE64))
                    for i in range(start, end, _HASH_CHUNK))
        return chars * 3 // 4
    if cte in ("", "7bit", "8bit", "binary"):
        return end - start
    if cte == "quoted-printable":
        # Cut at line ends (a soft line break ends its line: RFC 2045 §6.7), in 1 MiB pieces.
        size, pos = 0, start
        while pos < end:
            cut = raw.find(b"\n", min(pos + _HASH_CHUNK, end), end)
            cut = end if cut == -1 else cut + 1
            size += len(quopri.decodestring(raw[pos:cut]))
            pos = cut
        return size
    head.set_payload(raw[start:end].decode("ascii", "surrogateescape"))
    payload = head.get_payload(decode=True)
    return len(payload) if isinstance(payload, bytes) else 0


def _snip(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in text.splitlines()]
    kept: list[str] = []
    for ln in lines:
        if ln.startswith(">"):
            continue
        if ln:
            kept.append(ln)
        if sum(len(k) for k in kept) > limit:
            break
    return " ".join(kept)[:limit]


