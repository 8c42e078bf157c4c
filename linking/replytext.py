"""Reply-text extraction: the text the sender actually wrote in a reply.

dealmail asks "which deal?" by email and reads the answer ("2", "#2", "なし", ...) from the
reply; notes sent by users are stored as written.  Both need the sender's own words with the
quoted history and the signature removed.  This module is pure (no I/O, no global state).

Algorithm (own implementation; ideas and several splitter patterns come from GitHub's
``email_reply_parser`` (MIT), Zapier's Python port (MIT) and Mailgun's ``talon``
``quotations.py`` (Apache-2.0), which classify lines as text / quotation marker / splitter):

1. Lines starting with ``>`` are quotations (RFC 3676 section 4.5 quoting).
2. A *splitter* is an attribution ("On <date>, <name> wrote:" and its translations, possibly
   wrapped over several lines), an "-----Original Message-----" line, or a block of
   From:/Sent:/To:/Subject: header fields (Outlook).  When a splitter is followed by quoted
   lines, the splitter and the quotation are removed and the text after them is kept
   (bottom-posting and inline answers); when it is followed by unquoted text (Outlook and
   most webmails do not quote), everything from the splitter down is removed.
3. A signature is removed: the "-- " delimiter (RFC 3676 section 4.3) and what follows, a
   mobile trailer ("Sent from my iPhone", "iPhoneから送信", ...), a trailing sign-off block
   ("Thanks,\\nAlex", "Regards, Roman", "よろしくお願いします。") and a "-Name" line.

HTML bodies are converted to text with :mod:`html.parser`; ``<blockquote>`` and the quote
containers of common clients become quoted lines, the Outlook reply markers end the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import EmailMessage
from html.parser import HTMLParser

from .parse import part_text

__all__ = ["extract_reply", "extract_reply_from_message"]

# --- patterns -----------------------------------------------------------------------------

_QUOTE_RE = re.compile(r"^[ \t]*>")

# Verbs that end an attribution line ("... wrote:"), by language.  Mostly from talon's
# RE_ON_DATE_SMB_WROTE, extended with Spanish, Portuguese, Italian, Japanese and others.
_VERBS = (
    r"wrote|sent|writes"
    r"|a\s+écrit|a\s+ecrit|écrit"
    r"|schrieb|hat\s+geschrieben"
    r"|escribió|escribio|escreveu"
    r"|ha\s+scritto|scrisse"
    r"|schreef|geschreven|verzond"
    r"|napisał|napisal|skrev|kirjoitti|napsal|написал|написала|пише|yazdı"
    r"|đã\s+viết"
    r"|のメッセージ|が書きました|は書きました|書きました|写道"
)
# The verb closes the attribution: "wrote:", "a écrit :", "---- John wrote ----".
_VERB_END_RE = re.compile(rf"(?:{_VERBS})\s*[:：]?\s*-*\s*$", re.IGNORECASE)
# German/Dutch put the verb before the sender: "Am ... schrieb Alice <a@x>:".
_VERB_MID_RE = re.compile(r"\b(?:schrieb|schreef|escribió)\b.{1,160}[:：]\s*$", re.IGNORECASE)
# Words that open an attribution ("On", "Le", "Am", ...).
_ATTRIB_START_RE = re.compile(
    r"^\s*[-—>]*\s*(?:On|Le|Am|El|Em|Op|Il\s+giorno|Il|W\s+dniu|Den|På|Vào|Dne|В|Kun)\s",
    re.IGNORECASE,
)
# A numeric or Japanese/Chinese date opening a line: "02.04.2012 14:20 ...",
# "2014-10-17 11:28 GMT+03:00 ...", "2026年11月26日(木) 10:03 Alice <a@x>:".
_DATE_START_RE = re.compile(
    r"^\s*(?:\d{1,4}[./-]\d{1,2}[./-]\d{1,4}|\d{4}\s*年\s*\d{1,2}\s*月\s*\d{1,2}\s*日"
    # "Thu, 26 Jun 2014 14:00:51 +0400 от Alexander L <abc@example.com>:" (mail.ru; talon)
    r"|[^\W\d_]{2,10}\.?,\s+\d{1,2}\.?\s+[^\W\d_]{3,10}\.?\s+\d{4}\b)"
)
_EMAIL_RE = re.compile(r"[^\s<>()\"']+@[^\s<>()\"']+")
_DASH_SENT_RE = re.compile(rf"^\s*-{{2,}}.*\b(?:{_VERBS})\b.*-{{2,}}\s*$", re.IGNORECASE)

# "-----Original Message-----" and translations (talon's RE_ORIGINAL_MESSAGE, extended).
_ORIGINAL_MESSAGE_RE = re.compile(
    r"^\s*[-_=*]{2,}\s*(?:Original\s+Message|Reply\s+Message|Ursprüngliche\s+Nachricht"
    r"|Antwort\s+Nachricht|Oprindelig\s+meddelelse|Message\s+d'origine|Mensaje\s+original"
    r"|Mensagem\s+original|Messaggio\s+originale|Oorspronkelijk\s+bericht"
    r"|Originalmeddelande|Opprinnelig\s+melding|Alkuperäinen\s+viesti|Původní\s+zpráva"
    r"|Wiadomość\s+oryginalna|Исходное\s+сообщение|元のメッセージ|原始邮件)\s*[-_=*]{2,}\s*$",
    re.IGNORECASE,
)
_FORWARD_RE = re.compile(
    r"^\s*(?:[-_=*]{2,}\s*(?:Forwarded\s+message|Weitergeleitete\s+Nachricht"
    r"|Message\s+transféré|Mensaje\s+reenviado|Mensagem\s+encaminhada"
    r"|Messaggio\s+inoltrato|Doorgestuurd\s+bericht|転送されたメッセージ)\s*[-_=*]{2,}"
    r"|Begin\s+forwarded\s+message:)\s*$",
    re.IGNORECASE,
)

# Header field names of a quoted message's header block (Outlook "From: / Sent: / To:").
_FIELDS = (
    r"From|Sent|Date|To|Cc|Subject|Reply-To"
    r"|Von|Gesendet|An|Betreff|Datum"
    r"|De|Envoyé|Envoye|À|A|Objet|Date|Cc"
    r"|Fra|Sendt|Til|Emne|Från|Skickat|Till|Ämne|Datum"
    r"|Van|Verzonden|Aan|Onderwerp"
    r"|Enviado|Enviada|Para|Asunto|Assunto|Fecha"
    r"|Da|Inviato|Oggetto|Data"
    r"|Od|Wysłano|Do|Temat"
    r"|От|Отправлено|Кому|Тема|Дата"
    r"|差出人|送信日時|送信者|宛先|件名|日付|発信者"
    r"|发件人|发送时间|收件人|主题|寄件者|傳送時間|收件者|主旨"
)
_FIELD_RE = re.compile(rf"^\s*\*?(?P<name>{_FIELDS})\s?\*?\s?[:：]\s?\*?", re.IGNORECASE)
_FIELD_ANYWHERE_RE = re.compile(rf"(?:^|\s|\*)(?P<name>{_FIELDS})\s?\*?[:：]\s", re.IGNORECASE)
# Fields that identify the quoted message's author or send time; one must be present.
_KEY_FIELDS = frozenset(
    {
        "from", "date", "sent", "von", "gesendet", "datum", "de", "envoyé", "envoye",
        "fra", "sendt", "från", "skickat", "van", "verzonden", "enviado", "enviada",
        "fecha", "da", "inviato", "data", "od", "wysłano", "от", "отправлено", "дата",
        "差出人", "送信日時", "送信者", "日付", "発信者", "发件人", "发送时间", "寄件者",
        "傳送時間",
    }
)

# Mobile trailers: "Sent from my iPhone", "Envoyé de mon iPhone", "iPhoneから送信", ...
_MOBILE_RE = re.compile(
    r"^\s*(?:"
    r"(?:Sent|Envoyé|Envoye|Enviado|Enviada|Inviato|Verzonden|Skickat|Sendt|Wysłane|Odesláno"
    r"|Отправлено)\s+(?:from|de|desde|da|do|dal|via|met|från|fra|z|с|with)\s+"
    r"(?:my|mon|ma|mi|meu|minha|mio|mijn|min|mitt|mojego|моего)?\s*"
    r"[\w.®™'&+-]+(?:\s+[\w.®™'&+()-]+){0,6}\s*[!.]?"
    r"|Von\s+meinem\s+\S+(?:\s+\S+){0,2}\s+gesendet\.?"
    r"|Get\s+Outlook\s+for\s+\w+"
    r"|\S{1,30}\s?から送信"
    r"|(?:Sent|Envoyé)\s+(?:via|par)\s+\S+(?:\s+\S+){0,3}"
    r"|(?:via|from)\s+(?:my\s+)?(?:mobile|phone|cell|iPhone|iPad|Android|BlackBerry)"
    r")\s*$",
    re.IGNORECASE,
)
# Closing phrases that open a sign-off block.
_SIGNOFF_PHRASES = (
    r"thanks|thank\s+you|thanks\s+again|thanks\s+a\s+lot|many\s+thanks|thanks\s+in\s+advance"
    r"|thank\s+you\s+in\s+advance|thx|ty|cheers|best|all\s+the\s+best|best\s+wishes"
    r"|(?:best|kind|warm|warmest|kindest)\s+regards|regards|rgds|br|sincerely"
    r"|yours(?:\s+(?:truly|sincerely))?|take\s+care|talk\s+soon|see\s+you"
    r"|cordialement|bien\s+cordialement|bien\s+à\s+vous|merci(?:\s+beaucoup)?|amitiés"
    r"|mit\s+freundlichen\s+grüßen|freundliche\s+grüße|viele\s+grüße|beste\s+grüße"
    r"|liebe\s+grüße|grüße|gruß|lg|mfg|vg|danke"
    r"|saludos(?:\s+cordiales)?|un\s+saludo|atentamente|gracias|cumprimentos|abraços|obrigad[oa]"
    r"|cordiali\s+saluti|distinti\s+saluti|saluti|grazie"
    r"|met\s+vriendelijke\s+groet(?:en)?|groeten|groet|bedankt"
    r"|med\s+vänlig\s+hälsning|vänliga\s+hälsningar|hälsningar|mvh|med\s+venlig\s+hilsen|hilsen"
    r"|pozdrawiam|pozdrowienia|s\s+pozdravem|с\s+уважением|спасибо"
    r"|よろしくお願いします|よろしくお願いいたします|よろしくお願い致します|宜しくお願いします"
    r"|宜しくお願い致します|以上です|以上|敬具|ありがとうございます|谢谢|此致"
)
_SIGNOFF_RE = re.compile(
    rf"^\s*(?:{_SIGNOFF_PHRASES})\s*[,.!。！、]*"
    r"(?:\s*[,、]?\s*(?P<name>[^\W\d_][\w.'-]*(?:\s+[^\W\d_][\w.'-]*){0,2})\.?)?\s*$",
    re.IGNORECASE,
)
_DASH_NAME_RE = re.compile(r"^\s*-[^\W\d_][\w.'-]*(?:\s+[^\W\d_][\w.'-]*){0,2}\.?\s*$")
_SIG_DELIM_RE = re.compile(r"^(?:--|-- |_{2,}|—)\s*$")
_DASH_RULE_RE = re.compile(r"^\s*[-=]{4,}\s*$")
_NAME_LINE_RE = re.compile(r"^[^\W\d_][\w.'-]*(?:\s+[^\W\d_][\w.'-]*){0,3}$")
_CONTACT_RE = re.compile(
    r"[^\s@]+@[^\s@]+\.\w+|https?://|www\.|\+?\(?\d{2,4}\)?[\s.-]\d{2,4}[\s.-]\d{3,4}"
    r"|^\s*(?:tel|phone|mobile|fax|skype|t|f|m)\s*[.:]",
    re.IGNORECASE,
)
_SEPARATOR_RE = re.compile(r"^\s*[-_=*—–]*\s*$")
# An "On <date> ... wrote:" written after reply text on the same line (talon's
# _wrap_splitter_with_newline): split it onto its own line.
# Only the end of a line is searched, with bounded repetitions, so that a long line cannot
# make the regex backtrack for long (GitHub's pathological.txt is such a trap).
_INLINE_ATTRIB_RE = re.compile(
    rf"(?:(?<=\S)-+\s*|\s+-*\s*)(?P<attr>(?:On|Le|Am|El|Op)\s[^\n]{{0,250}}?\d[^\n]{{0,250}}?"
    rf"(?:{_VERBS})\s*[:：]?\s*-*)\s*$",
    re.IGNORECASE,
)
_INLINE_ATTRIB_WINDOW = 400
# Lines after this are not examined: the sender's text comes first, and talon stops at 1000.
_MAX_LINES = 5000
_LINK_OPEN_RE = re.compile(r"(?:\(|<)https?://[^)>\s]*$")

# Attribution headers longer than this many lines are not considered (talon uses 4).
_ATTRIB_MAX_LINES = 6
_ATTRIB_MAX_CHARS = 400
_SIGNOFF_MAX_TAIL_LINES = 4
_SIGNOFF_TAIL_LINE_MAX = 60


# --- plain text -----------------------------------------------------------------------------


def extract_reply(text: str) -> str:
    """The visible text the sender wrote in a plain-text reply.

    Quoted lines (``> ...``), attribution and header blocks that introduce a quoted message
    (in many languages and clients) with everything below them, and signatures are removed;
    the result is stripped of surrounding whitespace.  A reply that only quotes returns "".
    """
    lines = _split_lines(text)
    return _extract_lines(lines, [False] * len(lines))


def _split_lines(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: list[str] = []
    for line in text.split("\n")[:_MAX_LINES]:
        if _QUOTE_RE.match(line) or _ATTRIB_START_RE.match(line):
            out.append(line)
            continue
        offset = max(0, len(line) - _INLINE_ATTRIB_WINDOW)
        m = _INLINE_ATTRIB_RE.search(line, offset)
        pre = line[: m.start()].rstrip() if m else ""
        if m and pre.strip():
            out.extend([pre, m.group("attr").strip()])
        else:
            out.append(line)
    return out


def _is_blank(line: str) -> bool:
    return not line.strip()


def _attribution_len(lines: list[str], i: int) -> int:
    """Number of lines of an "On <date>, <name> wrote:" attribution starting at line i, or 0."""
    first = lines[i]
    if _QUOTE_RE.match(first):
        return 0
    if _DASH_SENT_RE.match(first):
        return 1
    # "Sent from Samsung Mobile Name <a@x> wrote:": one line naming an address, then the verb.
    if _EMAIL_RE.search(first) and _VERB_END_RE.search(first) and len(first) <= 300:
        return 1
    by_word = bool(_ATTRIB_START_RE.match(first))
    by_date = bool(_DATE_START_RE.match(first))
    if not by_word and not by_date:
        return 0
    parts: list[str] = []
    for j in range(i, min(i + _ATTRIB_MAX_LINES, len(lines))):
        line = lines[j].strip()
        if j > i and len(line) > 160:
            return 0
        parts.append(line.lstrip(">").strip() if j > i else line)
        joined = " ".join(p for p in parts if p)
        if len(joined) > _ATTRIB_MAX_CHARS:
            return 0
        if not line:
            continue
        if (
            by_word
            and re.search(r"\d", joined)
            and (_VERB_END_RE.search(joined) or _VERB_MID_RE.search(joined))
        ):
            return j - i + 1
        if by_date and j - i < 3:
            if _VERB_END_RE.search(joined):
                return j - i + 1
            if _EMAIL_RE.search(joined):
                if re.search(r"[:：]\s*$", line):
                    return j - i + 1
                nxt = _next_nonblank(lines, j + 1)
                if nxt is not None and _QUOTE_RE.match(lines[nxt]):
                    return j - i + 1
    return 0


def _next_nonblank(lines: list[str], start: int) -> int | None:
    for k in range(start, len(lines)):
        if not _is_blank(lines[k]):
            return k
    return None


def _header_block_len(lines: list[str], i: int) -> int:
    """Number of lines of a From:/Sent:/To:/Subject: block starting at line i, or 0."""
    m = _FIELD_RE.match(lines[i])
    if not m:
        return 0
    names = {m.group("name").lower()}
    # Several fields on one line (HTML rendered "<b>From: x</b> <b>Date: y</b>").
    names.update(f.group("name").lower() for f in _FIELD_ANYWHERE_RE.finditer(lines[i][m.end():]))
    end = i + 1
    j = i + 1
    continuation = 0
    while j < len(lines) and j < i + 12:
        line = lines[j]
        fm = _FIELD_RE.match(line)
        if fm:
            names.add(fm.group("name").lower())
            end = j + 1
            continuation = 0
        elif _is_blank(line) and len(names) >= 2:
            break
        elif continuation < 2 and (len(line) < 100):
            # wrapped field value ("  bob@example.com]") or a blank inside a wrapped value
            continuation += 1
        else:
            break
        j += 1
    if len(names) >= 2 and names & _KEY_FIELDS:
        return end - i
    return 0


@dataclass(frozen=True)
class _Splitter:
    kind: str  # "attribution", "original", "header", "forward"
    length: int


def _splitter_at(lines: list[str], i: int) -> _Splitter | None:
    line = lines[i]
    if _QUOTE_RE.match(line) or _is_blank(line):
        return None
    if _FORWARD_RE.match(line):
        return _Splitter("forward", 1)
    if _ORIGINAL_MESSAGE_RE.match(line):
        return _Splitter("original", 1)
    n = _attribution_len(lines, i)
    if n:
        return _Splitter("attribution", n)
    n = _header_block_len(lines, i)
    if n:
        return _Splitter("header", n)
    return None


def _quote_run_end(lines: list[str], forced: list[bool], k: int) -> int:
    """End (exclusive) of the run of quoted/blank lines starting at k.

    A single unquoted token between two quoted lines is a wrapped link of the quotation
    (talon's RE_PARENTHESIS_LINK case), not an answer.
    """
    n = len(lines)
    last_quoted = k
    while k < n:
        if forced[k] or _QUOTE_RE.match(lines[k]):
            last_quoted = k
            k += 1
        elif _is_blank(lines[k]) or (
            k + 1 < n
            and (forced[k + 1] or _QUOTE_RE.match(lines[k + 1]))
            and " " not in lines[k].strip()
            and _LINK_OPEN_RE.search(lines[last_quoted])
        ):
            k += 1
        else:
            break
    # leave trailing blank lines to the text that follows
    return last_quoted + 1


def _is_quoted(lines: list[str], forced: list[bool], k: int) -> bool:
    return forced[k] or bool(_QUOTE_RE.match(lines[k]))


def _extract_lines(lines: list[str], forced: list[bool]) -> str:
    """Core: ``forced[i]`` marks lines known to be quoted (from HTML blockquotes)."""
    n = len(lines)
    kept: list[int] = []
    # Quote runs not introduced by a splitter: (start, end, nonblank line count)
    loose_runs: list[tuple[int, int]] = []
    saw_splitter = False
    i = 0
    while i < n:
        if _is_quoted(lines, forced, i):
            end = _quote_run_end(lines, forced, i)
            loose_runs.append((i, end))
            kept.extend(range(i, end))
            i = end
            continue
        sp = _splitter_at(lines, i)
        if sp is None:
            kept.append(i)
            i += 1
            continue
        if sp.kind == "forward":
            if not saw_splitter:
                # A forward, not a reply: the whole text is the sender's (forwards are parsed
                # elsewhere).
                return "\n".join(lines).strip()
            kept.append(i)
            i += 1
            continue
        saw_splitter = True
        after = i + sp.length
        nxt = _next_nonblank(lines, after)
        if nxt is not None and _is_quoted(lines, forced, nxt):
            # Attribution followed by a quotation: drop both, keep what follows (answers
            # written below or between quotations).
            i = _quote_run_end(lines, forced, nxt)
            continue
        # Unquoted history (Outlook, webmail): everything from here down is not the reply.
        break
    drop: set[int] = set()
    quoted_nonblank = sum(
        1 for s, e in loose_runs for k in range(s, e) if _is_quoted(lines, forced, k)
    )
    for s, e in loose_runs:
        has_forced = any(forced[k] for k in range(s, e))
        at_end = _next_nonblank(lines, e) is None or all(k < e for k in kept[-1:])
        # A lone ">" line in running text with no splitter anywhere is text (e.g. ">>> link
        # <<<"), as in talon's rule "no splitter -> markers are text".
        if has_forced or saw_splitter or quoted_nonblank >= 2 or at_end:
            drop.update(k for k in range(s, e) if _is_quoted(lines, forced, k))
    body = [lines[k] for k in kept if k not in drop]
    body = _strip_trailing_separators(body)
    body = _strip_signature(body)
    return "\n".join(body).strip()


def _strip_trailing_separators(body: list[str]) -> list[str]:
    end = len(body)
    while end > 0 and _SEPARATOR_RE.match(body[end - 1]):
        end -= 1
    return body[:end]


def _first_nonblank(body: list[str]) -> int | None:
    return _next_nonblank(body, 0)


def _strip_signature(body: list[str]) -> list[str]:
    changed = True
    while changed:
        changed = False
        first = _first_nonblank(body)
        if first is None:
            return []
        cut = _signature_start(body, first)
        if cut is not None and cut > first:
            body = _strip_trailing_separators(body[:cut])
            changed = True
    return body


def _is_name_line(line: str) -> bool:
    """A bare personal name: one to four capitalised words, no digits or punctuation."""
    return bool(_NAME_LINE_RE.match(line)) and all(
        w[0].isupper() for w in line.split() if w[0].isalpha()
    )


def _is_contact_line(line: str) -> bool:
    return bool(_CONTACT_RE.search(line))


def _contact_block_start(body: list[str], first: int) -> int | None:
    """Trailing "Name / e-mail / phone / web" block after a blank line (a signature without
    delimiter); needs two contact lines so that a phone number in a note stays."""
    end = len(body)
    k = end - 1
    while k > first and not _is_blank(body[k]):
        k -= 1
    if k <= first:
        return None
    block = [line for line in body[k + 1:end] if line.strip()]
    if not 2 <= len(block) <= 6 or not _is_name_line(block[0].strip()):
        return None
    contacts = sum(1 for line in block[1:] if _is_contact_line(line))
    if contacts >= 2 and all(len(line.strip()) <= _SIGNOFF_TAIL_LINE_MAX for line in block):
        return k + 1
    return None


def _signature_start(body: list[str], first: int) -> int | None:
    # "-- " delimiter (RFC 3676 section 4.3) or an underscore rule (mailing-list footers).
    for k in range(first + 1, len(body)):
        if _SIG_DELIM_RE.match(body[k]):
            return k
        # A long dash rule followed by a short block with contact details.
        if _DASH_RULE_RE.match(body[k]):
            below = [line for line in body[k + 1:] if line.strip()]
            if (
                below
                and len(below) <= 15
                and all(len(line) <= 80 for line in below)
                and sum(1 for line in below if _is_contact_line(line)) >= 2
            ):
                return k
    nonblank = [k for k in range(first + 1, len(body)) if not _is_blank(body[k])]
    tail = nonblank[-_SIGNOFF_MAX_TAIL_LINES - 1:]
    # Mobile trailer near the end, with the bare name written just above it.
    for k in tail:
        if _MOBILE_RE.match(body[k]):
            if k - 1 > first and _is_name_line(body[k - 1].strip()):
                return k - 1
            return k
    # Sign-off block: earliest closing phrase in the tail followed only by short lines.
    for pos, k in enumerate(tail):
        m = _SIGNOFF_RE.match(body[k])
        if not m:
            continue
        name = m.group("name")
        if name is not None and not name[0].isupper():
            continue
        after = tail[pos + 1:]
        if all(len(body[r].strip()) <= _SIGNOFF_TAIL_LINE_MAX for r in after) and not any(
            body[r].rstrip().endswith(("?", ":")) for r in after
        ):
            return k
    # "-Name" as the last line (GitHub's email_reply_parser signature rule).
    if nonblank and _DASH_NAME_RE.match(body[nonblank[-1]]):
        k = nonblank[-1]
        if body[k].strip()[1].isupper():
            return k
    return _contact_block_start(body, first)


# --- HTML ------------------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "center", "dd", "div", "dl",
        "dt", "fieldset", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
        "header", "html", "li", "main", "nav", "ol", "p", "pre", "section", "table",
        "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
    }
)
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
     "track", "wbr"}
)
_SKIP_TAGS = frozenset({"script", "style", "head", "title", "template"})
# Containers in which clients put the quoted message.
_QUOTE_CLASSES = ("gmail_quote", "yahoo_quoted", "moz-cite-prefix", "zmail_extra",
                  "protonmail_quote", "ms-outlook-mobile-reference-message")
# Markers after which everything is the quoted message (Outlook desktop, web and Mac).
_CUT_IDS = ("divrplyfwdmsg", "appendonsend", "olk_src_body_section", "outlookmessageheader")
_WS_RE = re.compile(r"[ \t\n\r\f\v]+")


class _HtmlToLines(HTMLParser):
    """Renders HTML as (line, quoted) pairs; quote containers become quoted lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[str, bool]] = []
        self._cur: list[str] = []
        self._cur_quoted = False
        # open elements: (tag, is a quote container)
        self._stack: list[tuple[str, bool]] = []
        self._quote_depth = 0
        self._skip_depth = 0
        self._pre_depth = 0
        self._stopped = False

    # helpers
    def _flush(self) -> None:
        text = "".join(self._cur)
        if not self._pre_depth:
            text = text.strip(" \t\n\r\f\v")
        for part in text.split("\n"):
            self.lines.append((part, self._cur_quoted))
        self._cur = []

    def _newline(self) -> None:
        if self._cur:
            self._flush()
        elif self.lines and self.lines[-1][0] != "":
            self.lines.append(("", False))
        self._cur_quoted = self._quote_depth > 0

    def _is_quote_container(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag == "blockquote":
            return True
        classes = " ".join(v or "" for k, v in attrs if k == "class").lower()
        return any(c in classes for c in _QUOTE_CLASSES)

    def _is_cut_marker(self, attrs: list[tuple[str, str | None]]) -> bool:
        for k, v in attrs:
            if k in ("id", "class") and v:
                low = v.lower()
                if any(c in low for c in _CUT_IDS):
                    return True
        return False

    # HTMLParser hooks
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._stopped:
            return
        if tag in _SKIP_TAGS:
            self._skip_depth += 1
            return
        if self._is_cut_marker(attrs):
            self._newline()
            self._stopped = True
            return
        if tag in _VOID_TAGS:
            if tag in ("br", "hr"):
                self._newline()
            return
        quote = self._is_quote_container(tag, attrs)
        if tag in _BLOCK_TAGS or quote:
            self._newline()
        self._stack.append((tag, quote))
        if quote:
            self._quote_depth += 1
            self._cur_quoted = True
        if tag == "pre":
            self._pre_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS and tag not in _SKIP_TAGS and not self._stopped:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._stopped:
            return
        if tag in _SKIP_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
            return
        if tag in _VOID_TAGS:
            return
        # pop to the matching open tag (tolerates unclosed children)
        for idx in range(len(self._stack) - 1, -1, -1):
            if self._stack[idx][0] == tag:
                for t, quote in self._stack[idx:]:
                    if quote:
                        if tag in _BLOCK_TAGS or quote:
                            self._newline()
                        self._quote_depth -= 1
                    if t == "pre":
                        self._pre_depth = max(0, self._pre_depth - 1)
                del self._stack[idx:]
                break
        if tag in _BLOCK_TAGS:
            self._newline()

    def handle_data(self, data: str) -> None:
        if self._stopped or self._skip_depth:
            return
        if not self._pre_depth:
            data = _WS_RE.sub(" ", data)
            if not self._cur and data == " ":
                return
        if not self._cur:
            self._cur_quoted = self._quote_depth > 0
        self._cur.append(data)

    def close(self) -> None:
        super().close()
        if self._cur:
            self._flush()


def _html_to_lines(html: str) -> tuple[list[str], list[bool]]:
    parser = _HtmlToLines()
    parser.feed(html)
    parser.close()
    lines = [t for t, _ in parser.lines]
    forced = [q and bool(t.strip()) for t, q in parser.lines]
    # A Gmail "quote" that is really a forward is the sender's content (talon keeps it).
    for k, line in enumerate(lines):
        if forced[k] and _FORWARD_RE.match(line):
            for j in range(k, len(lines)):
                forced[j] = False
            break
    return lines, forced


def html_to_reply(html: str) -> str:
    """:func:`extract_reply` for an HTML body (quote containers removed first)."""
    lines, forced = _html_to_lines(html)
    return _extract_lines(lines, forced)


# --- messages --------------------------------------------------------------------------------


def extract_reply_from_message(msg: EmailMessage) -> str:
    """Same as :func:`extract_reply`, from a message parsed with ``email.policy.default``.

    Prefers the text/plain body; falls back to text/html converted to text, with
    ``<blockquote>`` and the quote containers of Gmail, Outlook, Thunderbird and Yahoo removed.
    """
    body = msg.get_body(preferencelist=("plain",))
    if body is not None:
        return extract_reply(part_text(body))
    body = msg.get_body(preferencelist=("html",))
    if body is not None:
        return html_to_reply(part_text(body))
    return ""
