"""Forwarded-message parsing: who really wrote the mail a salesperson forwarded to dealmail.

A user forwards a customer's mail to the company address with an empty To (docs/architecture.md,
Smart BCC). The outer message is from the user; the correspondent is inside, either

* attached whole: a ``message/rfc822`` part (RFC 2046 §5.2.1), or an ``.eml`` file sent
  as ``application/octet-stream`` — then the original's own headers are read;
* re-sent with ``Resent-*`` headers (RFC 5322 §3.6.6) — the message is the original;
* inline: the client pasted a header block ("From: … / Date: … / Subject: …") in the
  body, in the client's UI language, after a separator line ("---------- Forwarded
  message ---------", "Begin forwarded message:", "-----Original Message-----",
  "________________________________", …) or with no separator at all, possibly
  ">"-quoted, possibly nested (a forward of a forward).

Everything here is a pure function of the message or text: no database, no network.
The labels and separators cover the clients and languages listed in the brief; the
layout follows crisp-oss/email-forward-parser's corpus (see tests/linking).
"""

from __future__ import annotations

import re
import textwrap
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any

from dealmail.addresses import (
    AddressError,
    Mailbox,
    decode_words,
    normalize_address,
    parse_address_list,
    parse_strict_mailbox,
)
from linking.fwddates import parse_forward_date
from linking.htmltext import html_to_text
from linking.parse import MessageRejected, check_structure, part_text

__all__ = [
    "ForwardedMessage",
    "find_forwards",
    "has_forward_marker",
    "parse_inline_forward",
    "strip_subject_prefixes",
]


@dataclass
class ForwardedMessage:
    """One forwarded original, as far as the forward lets us see it."""

    from_: Mailbox | None
    to: list[Mailbox]
    cc: list[Mailbox]
    subject: str
    date: datetime | None
    date_raw: str
    date_flagged: bool
    body: str
    note: str
    source: str
    message_id: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    raw: bytes | None = None
    # The From text as found (e.g. "John Doe" when Outlook printed no address), so a
    # caller can still show a name when ``from_`` is None.
    from_raw: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": self.from_.as_dict() if self.from_ else None,
            "to": [m.as_dict() for m in self.to],
            "cc": [m.as_dict() for m in self.cc],
            "subject": self.subject,
            "date": self.date.isoformat() if self.date else None,
            "body": self.body,
            "note": self.note,
            "source": self.source,
            "message_id": self.message_id,
        }


# ---------------------------------------------------------------------------------------
# Vocabulary. Everything is compared after _fold (case-folded, accents stripped).

# Separator phrases that say "this is a forward" in so many words.
_FORWARD_PHRASES = (
    # English (Gmail, Thunderbird, Yahoo, Apple, MailMate, HubSpot, Spark, Missive, IONOS)
    "forwarded message", "begin forwarded message", "forwarded email", "forwarded e-mail",
    "forwarded mail", "fwd message", "forwarded message follows", "original forwarded message",
    # French
    "message transfere", "debut du message reexpedie", "debut du message transfere",
    "courriel transfere", "message reexpedie", "e-mail transfere",
    # German
    "weitergeleitete nachricht", "anfang der weitergeleiteten nachricht",
    "weitergeleitete e-mail", "weitergeleitete mail",
    # Spanish / Portuguese / Italian
    "mensaje reenviado", "inicio del mensaje reenviado", "correo reenviado",
    "mensagem encaminhada", "inicio da mensagem encaminhada", "mensagem reencaminhada",
    "inicio da mensagem reencaminhada", "messaggio inoltrato", "inizio messaggio inoltrato",
    "messaggio inoltrato:",
    # Dutch / Scandinavian / Finnish / Estonian
    "doorgestuurd bericht", "begin doorgestuurd bericht", "doorgestuurde e-mail",
    "vidarebefordrat meddelande", "vidarebefordrat brev", "borjan pa vidarebefordrat brev",
    "videresendt melding", "start pa videresendt melding", "videresendt e-post",
    "videresendt meddelelse", "videresendt besked", "start pa videresendt besked",
    "valitetty viesti", "valitetty viesti / fwd.msg", "edelleenlahetetty viesti",
    "valitetty viesti alkaa", "edastatud kiri", "edastatud sonum", "edasisaadetud kiri",
    # Polish / Czech / Slovak / Hungarian / Romanian / Croatian / Slovenian / Serbian
    "Wiadomość przekazana dalej", "Przekazana wiadomość", "Początek przekazywanej wiadomości",
    "Przesłana wiadomość", "Wiadomość przesłana dalej", "preposlana zprava",
    "preposlana sprava", "zacatek preposilane zpravy",
    "zacatek preposlane zpravy", "zaciatok preposlanej spravy", "preposlana sprava:",
    "tovabbitott uzenet", "tovabbitott level kezdete", "tovabbitott level",
    "mesaj redirectionat", "inceputul mesajului redirectionat", "mesaj transmis",
    "mesaj redirecționat", "Proslijeđena poruka", "Početak proslijeđene poruke",
    "Posredovano sporočilo", "Prosleđena poruka",
    # Russian / Ukrainian / Turkish / Greek
    "пересылаемое сообщение", "пересланное сообщение", "начало переадресованного сообщения",
    "переадресованное сообщение", "пересланный лист", "пересланий лист",
    "початок пересланого листа", "переслане повідомлення", "iletilen ileti",
    "ileti baslangıcı", "iletilmis ileti", "yonlendirilen ileti", "ileti baslangici",
    "προωθημενο μηνυμα",
    # Japanese / Chinese / Korean
    "転送されたメッセージ", "転送メッセージ", "メッセージを転送", "転送メール", "转发的邮件",
    "轉寄的郵件",
    "已转发邮件", "전달된 메시지",
)

# Separators that Outlook and others use for replies *and* forwards: they only count when
# a header block with a From follows, and not when the outer Subject says it is a reply.
_GENERIC_PHRASES = (
    "original message", "original e-mail", "message d'origine", "message original",
    "ursprungliche nachricht", "originalnachricht", "mensaje original", "mensagem original",
    "messaggio originale", "oorspronkelijk bericht", "origineel bericht",
    "ursprungligt meddelande", "opprinnelig melding", "oprindelig meddelelse",
    "alkuperainen viesti", "Oryginalna wiadomość", "Wiadomość oryginalna", "puvodni zprava",
    "povodna sprava", "eredeti uzenet", "mesaj original", "izvorna poruka",
    "исходное сообщение", "оригинальное сообщение", "вихідний лист",
    "оригінальне повідомлення", "orijinal mesaj", "orijinal ileti", "algne kiri",
    "元のメッセージ", "原始邮件", "原始郵件", "원본 메시지", "reply message",
)

_LABELS: dict[str, tuple[str, ...]] = {
    "from": (
        "From", "Von", "De", "Da", "Van", "Från", "Fra", "Lähettäjä", "Od", "Feladó", "Kimden",
        "От", "От кого", "Від", "Від кого", "Saatja", "差出人", "送信者", "送信元", "发件人",
        "寄件者", "寄件人", "Mittente", "Šalje", "De la", "Sender", "Absender", "Afsender",
        "Avsändare", "Nadawca", "Odesílatel", "Odosielateľ", "보낸 사람", "Από",
        "Expéditeur", "Remitente", "Remetente", "Afzender", "Pošiljatelj", "Pošiljalac",
    ),
    "date": (
        "Date", "Sent", "Datum", "Dato", "Gesendet", "Envoyé", "Envoyé le", "Enviado", "Enviada",
        "Enviado el", "Inviato", "Data", "Verzonden", "Skickat", "Sendt", "Lähetetty",
        "Päiväys", "Päivämäärä", "Wysłano", "Wysłany", "Odesláno", "Odoslané", "Elküldve",
        "Dátum", "Dată", "Trimis", "Poslano", "Poslato", "Отправлено", "Дата",
        "Дата отправки", "Надіслано", "Tarih", "Gönderildi", "Gönderilme tarihi",
        "Saadetud", "Kuupäev", "送信日時", "日付", "開始日時", "日時", "发送时间", "日期",
        "時間", "寄件日期", "Fecha", "Sent at", "Kdy", "Ημερομηνία", "Lähetysaika",
        "보낸 날짜",
    ),
    "to": (
        "To", "An", "À", "A", "Para", "送信先", "Aan", "Till", "Til", "Vastaanottaja", "Do", "Komu",
        "Címzett", "Către", "Catre", "Prima", "Кому", "Kime", "Saaja", "宛先", "收件人",
        "收件者", "Pour", "Destinatario", "Destinatário", "Empfänger", "Pre", "Adresát",
        "Příjemce", "Mottaker", "Modtager", "Mottagare", "Destinataire", "Ontvanger", "Alıcı",
        "Προς", "받는 사람", "Prejemnik", "Primalac",
    ),
    "cc": (
        "Cc", "CC", "Kopie", "Kopie (CC)", "Kopia", "Kopi", "Kopio", "DW", "Копия", "Копія",
        "Másolat", "Másolatot kap", "Bilgi", "Koopia", "Kópia", "副本", "抄送", "Cópia",
        "Copia", "Kopie an", "Kopia do", "Kopiera", "Κοιν", "참조", "Cc.",
    ),
    "bcc": ("Bcc", "Cci", "Bcc.", "Ukryta kopia", "Skrytá kopie", "Скрытая копия", "Bkopi"),
    "subject": (
        "Subject", "Betreff", "Objet", "Asunto", "Oggetto", "Assunto", "Onderwerp", "Ämne",
        "Emne", "Aihe", "Temat", "Předmět", "Predmet", "Tárgy", "Subiect", "Naslov", "Тема",
        "Konu", "Teema", "件名", "主题", "主旨", "Sujet", "Tema", "Θέμα", "제목", "Zadeva",
    ),
    "reply-to": (
        "Reply-To", "Répondre à", "Antwort an", "Responder a", "Rispondi a", "Antwoord aan",
        "Svara till", "Odpowiedź do", "Ответить", "返信先",
    ),
}

_LABEL_LIMIT = 40


def _fold(text: str) -> str:
    """Case-fold, strip accents, collapse white space (so 'Début' == 'debut')."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.split())


_FOLDED_FORWARD = frozenset(_fold(p) for p in _FORWARD_PHRASES)
_FOLDED_GENERIC = frozenset(_fold(p) for p in _GENERIC_PHRASES)
_FOLDED_LABELS: dict[str, str] = {
    _fold(label): fieldname for fieldname, labels in _LABELS.items() for label in labels
}

# A header line: optional bold markers, a label, a colon (ASCII or full-width, with the
# French space before it), the value.
_HEADER_RE = re.compile(
    r"^[ \t]*\*{0,2}[ \t]*(?P<label>[^:：\n*]{1,"
    + str(_LABEL_LIMIT)
    + r"}?)[ \t]*\*{0,2}[ \t]*[:：][ \t]*\*{0,2}[ \t]*(?P<value>.*)$"
)
# Yahoo puts the whole header block on the separator line with no line breaks:
# "----- Forwarded Message ----- From: a <a@x>To: b <b@y>Sent: …Subject: …".
_DASHED_RE = re.compile(
    r"^[ \t]*[-=]{2,}[ \t]*(?P<phrase>[^-=].*?)[ \t]*[-=]{2,}[ \t]*(?P<rest>.*)$"
)
_GLUED_LABEL_RE = re.compile(
    "(?P<label>"
    + "|".join(
        re.escape(label)
        for label in sorted(
            {lab for labels in _LABELS.values() for lab in labels}, key=len, reverse=True
        )
    )
    + r")[ \t]*[:：]",
    re.IGNORECASE,
)
_QUOTE_RE = re.compile(r"^((?:[ \t]{0,3}>)+)[ \t]?")
_RULE_RE = re.compile(r"^[ \t]*(?:_{8,}|-{8,}|={8,})[ \t]*$")
_EMAIL_RE = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-\u0080-\uffff]+"
    r"@[A-Za-z0-9\-\u0080-\uffff]+(?:\.[A-Za-z0-9\-\u0080-\uffff]+)+"
)

# Subject prefixes. Forward: en Fwd/Fw, fr TR, de WG, fi VL, pl PD, es RV/Reenviado,
# it I, pt Enc, nl Doorst, sv VB, tr İlt, da/no VS, ru Пересл, ja 転送, zh 转发.
_FWD_PREFIX_RE = re.compile(
    r"^\s*(?:\[[^\]]{0,40}\]\s*)?(?:fwd?|fw|tr|wg|vl|pd|rv|reenviado|i|enc|doorst|vb|vs|"
    r"ilt|İlt|пересл|fwd\.|転送|转发|轉寄|wtrp|továbbítás|továbbítva|ynt)\s*(?:\[\d+\])?\s*[:：]",
    re.IGNORECASE,
)
_REPLY_PREFIX_RE = re.compile(
    r"^\s*(?:\[[^\]]{0,40}\]\s*)?(?:re|aw|sv|antw|odp|odg|rif|r|réf|ref|vá|ynt|atb|res|"
    r"отв|ответ|回复|回覆|答复|返信)\s*(?:\[\d+\]|\(\d+\))?\s*[:：]",
    re.IGNORECASE,
)
_ANY_PREFIX_RE = re.compile(
    r"^\s*(?:(?:fwd?|fw|tr|wg|vl|pd|rv|reenviado|i|enc|doorst|vb|vs|ilt|İlt|пересл|転送|转发|"
    r"轉寄|re|aw|sv|antw|odp|odg|rif|r|réf|ref|vá|ynt|atb|res|отв|ответ|回复|回覆|答复|返信)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*)+",
    re.IGNORECASE,
)
_ON_BEHALF_RE = re.compile(
    r"\s+(?:on behalf of|im auftrag von|de la part de|en nombre de|per conto di|"
    r"em nome de|namens|för|på vegne af|på vegne av|w imieniu|jménem|от имени)\s+.*$",
    re.IGNORECASE,
)
_DATE_IN_LINE_RE = re.compile(
    r"\d{1,4}[/.\-]\d{1,2}[/.\-]\d{2,4}(?:,?\s*(?:at\s+)?\d{1,2}[:.]\d{2}(?:[:.]\d{2})?"
    r"(?:\s*[AaPp]\.?[Mm]\.?)?)?"
)
_MAX_CHAIN = 20


def strip_subject_prefixes(subject: str) -> str:
    """'FW: Re: Offer' -> 'Offer' (forward and reply prefixes in common languages)."""
    return _ANY_PREFIX_RE.sub("", subject or "").strip()


def _subject_kind(subject: str | None) -> str:
    """'forward', 'reply', 'plain' or 'unknown' (no Subject known)."""
    if subject is None:
        return "unknown"
    if _FWD_PREFIX_RE.match(subject):
        return "forward"
    if _REPLY_PREFIX_RE.match(subject):
        return "reply"
    return "plain"


# ---------------------------------------------------------------------------------------
# Text helpers


def _prepare(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for ch in ("\ufeff", "\u200b", "\u200e", "\u200f", "\u2060"):
        text = text.replace(ch, "")
    return text.replace("\u00a0", " ").split("\n")


def _depth(line: str) -> tuple[int, str]:
    """Quote depth (number of '>' markers, RFC 3676 §4.5) and the unquoted content."""
    m = _QUOTE_RE.match(line)
    if not m:
        return 0, line
    return m.group(1).count(">"), line[m.end():]


def _dequote(line: str, levels: int) -> str:
    for _ in range(levels):
        m = re.match(r"^[ \t]{0,3}>[ \t]?", line)
        if not m:
            break
        line = line[m.end():]
    return line


def _separator(content: str) -> tuple[str, str] | None:
    """('forward'|'generic', rest-of-line) when ``content`` is a separator line."""
    stripped = content.strip()
    if not stripped or len(stripped) > 120:
        return None
    if _RULE_RE.match(stripped):
        return "generic", ""
    m = _DASHED_RE.match(stripped)
    if m:
        phrase = _fold(m.group("phrase").strip(" :*"))
        if phrase in _FOLDED_FORWARD:
            return "forward", m.group("rest")
        if phrase in _FOLDED_GENERIC:
            return "generic", m.group("rest")
    phrase = _fold(stripped.strip("-_=*• \t").rstrip(":：").strip())
    if phrase in _FOLDED_FORWARD:
        return "forward", ""
    if phrase in _FOLDED_GENERIC:
        return "generic", ""
    return None


def _separator_long(content: str) -> tuple[str, str] | None:
    """Like _separator but allows Yahoo's long one-line header block after the phrase."""
    m = _DASHED_RE.match(content.strip())
    if m and m.group("rest"):
        phrase = _fold(m.group("phrase").strip(" :*"))
        if phrase in _FOLDED_FORWARD:
            return "forward", m.group("rest")
        if phrase in _FOLDED_GENERIC:
            return "generic", m.group("rest")
    return _separator(content)


def _header(content: str) -> tuple[str, str] | None:
    """(field, value) when ``content`` is a header line with a known label."""
    if ":" not in content and "：" not in content:
        return None
    m = _HEADER_RE.match(content)
    if not m:
        return None
    fieldname = _FOLDED_LABELS.get(_fold(m.group("label")))
    if fieldname is None:
        return None
    return fieldname, m.group("value").strip().strip("*").strip()


def _glued_headers(text: str) -> dict[str, str]:
    """Split Yahoo's 'From: a <a@x>To: b <b@y>Subject: s' into fields."""
    cuts: list[tuple[int, int, str]] = []
    for m in _GLUED_LABEL_RE.finditer(text):
        start = m.start()
        prev = text[start - 1] if start else " "
        label = m.group("label")
        if prev.isalpha() and not label[0].isupper():
            continue
        fieldname = _FOLDED_LABELS.get(_fold(label))
        if fieldname is None:
            continue
        cuts.append((start, m.end(), fieldname))
    # Overlapping matches (a shorter label inside a longer one) keep the first.
    fields: dict[str, str] = {}
    kept: list[tuple[int, int, str]] = []
    for cut in cuts:
        if kept and cut[0] < kept[-1][1]:
            continue
        kept.append(cut)
    for i, (_start, end, fieldname) in enumerate(kept):
        stop = kept[i + 1][0] if i + 1 < len(kept) else len(text)
        if fieldname not in fields:
            fields[fieldname] = text[end:stop].strip()
    return fields


@dataclass
class _Block:
    fields: dict[str, str]
    end: int  # index of the first line after the header block


def _header_block(lines: list[str], start: int) -> _Block | None:
    """Read a block of header lines beginning at ``lines[start]`` (blank lines before it
    are skipped). Wrapped values are joined; blank lines between headers (Outlook's
    "-----Original Message-----" sometimes has them) are tolerated."""
    n = len(lines)
    i = start
    while i < n and not lines[i].strip():
        i += 1
    fields: dict[str, str] = {}
    last: str | None = None
    while i < n:
        line = lines[i]
        if not line.strip():
            k = i
            while k < n and not lines[k].strip():
                k += 1
            nxt = _header(lines[k]) if k < n else None
            if fields and nxt and nxt[0] not in fields and k - i <= 3:
                i = k
                continue
            break
        hdr = _header(line)
        if hdr:
            name, value = hdr
            if name in fields and name != "date":
                break  # a second From: is the next message's header block
            if name == "date" and "date" in fields:
                i += 1
                continue
            fields[name] = value
            last = name
            i += 1
            continue
        # Not a header: a wrapped continuation of the previous value only when another
        # header line follows before the block's end, or it is more To/Cc addresses.
        if last is None:
            break
        follows = False
        for k in range(i + 1, min(i + 4, n)):
            if not lines[k].strip():
                break
            if _header(lines[k]):
                follows = True
                break
        addressy = (
            last in ("to", "cc") and "@" in line and fields[last].rstrip().endswith((",", ";"))
        )
        if follows or addressy:
            fields[last] = (fields[last] + " " + line.strip()).strip()
            i += 1
            continue
        break
    if not fields:
        return None
    return _Block(fields, i)


# ---------------------------------------------------------------------------------------
# Addresses as mail clients print them


def _clean_mailto(value: str) -> str:
    # "a@x<mailto:a@x>" (Outlook's plain-text rendering of a link): drop the decoration.
    value = re.sub(r"(?<=[^\s<(\[])<mailto:[^>]*>", "", value, flags=re.IGNORECASE)
    value = re.sub(r"(?<=[^\s<(\[])\[mailto:[^\]]*\]", "", value, flags=re.IGNORECASE)
    # "John <mailto:john@x>" and Outlook 2013's "John [mailto:john@x]".
    value = re.sub(r"[<\[]\s*mailto:([^>\]]*)[>\]]", r"<\1>", value, flags=re.IGNORECASE)
    value = re.sub(r"(?<![\w.])mailto:", "", value, flags=re.IGNORECASE)
    # "Foo Bar (foo@bar.example)" and "Name (<a@x>)".
    value = re.sub(r"\(\s*<?\s*([^()<>\s]+@[^()<>\s]+?)\s*>?\s*\)", r"<\1>", value)
    return value


def _split_list(value: str) -> list[str]:
    """Split an address list on ',' or ';' — but only once the current entry holds an
    address, so "'Bessie, Berry' <b@x>" and "Doe, John <j@x>" stay whole."""
    out: list[str] = []
    cur: list[str] = []
    in_quote = False
    in_angle = False
    for ch in value:
        if ch == '"':
            in_quote = not in_quote
        elif ch == "<" and not in_quote:
            in_angle = True
        elif ch == ">" and not in_quote:
            in_angle = False
        if ch in ",;" and not in_quote and not in_angle:
            chunk = "".join(cur)
            if "@" in chunk:
                out.append(chunk)
                cur = []
                continue
        cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return [c.strip() for c in out if c.strip()]


def _unquote_name(name: str) -> str:
    name = name.strip().strip(",;").strip()
    for left, right in (('"', '"'), ("'", "'"), ("«", "»"), ("“", "”"), ("„", "“"), ("'", "'")):
        while len(name) >= 2 and name.startswith(left) and name.endswith(right):
            name = name[1:-1].strip()
    return name.replace('\\"', '"')


def _mailbox(chunk: str) -> Mailbox | None:
    chunk = chunk.strip()
    m = re.search(r"<\s*([^<>]*@[^<>]*?)\s*>", chunk)
    if m:
        address = m.group(1)
        name = _unquote_name(chunk[: m.start()])
    else:
        em = _EMAIL_RE.search(chunk)
        if not em:
            return None
        address = em.group(0)
        name = _unquote_name((chunk[: em.start()] + chunk[em.end():]).strip(" <>()"))
    address = address.strip().strip("'\"")
    try:
        norm = normalize_address(address)
    except AddressError:
        return None
    name = decode_words(name)
    if _fold(name) == _fold(address) or _fold(name) == norm:
        name = ""
    return Mailbox(norm, name)


def _mailbox_list(value: str) -> list[Mailbox]:
    out: list[Mailbox] = []
    seen: set[str] = set()
    for chunk in _split_list(_clean_mailto(value)):
        mb = _mailbox(_ON_BEHALF_RE.sub("", chunk))
        if mb and mb.address not in seen:
            seen.add(mb.address)
            out.append(mb)
    return out


def _from_value(value: str) -> Mailbox | None:
    cleaned = _ON_BEHALF_RE.sub("", _clean_mailto(value)).strip()
    boxes = _mailbox_list(cleaned)
    return boxes[0] if boxes else None


# ---------------------------------------------------------------------------------------
# Inline parsing


def _make(
    fields: dict[str, str],
    body: str,
    note: str,
    default_tz: tzinfo,
    subject_fallback: str = "",
) -> ForwardedMessage:
    from_raw = fields.get("from", "").strip()
    date_raw = fields.get("date", "").strip()
    date = parse_forward_date(date_raw, default_tz) if date_raw else None
    return ForwardedMessage(
        from_=_from_value(from_raw) if from_raw else None,
        to=_mailbox_list(fields.get("to", "")),
        cc=_mailbox_list(fields.get("cc", "")),
        subject=fields.get("subject", subject_fallback).strip(),
        date=date,
        date_raw=date_raw,
        date_flagged=date is None,
        body=body,
        note=note,
        source="inline",
        from_raw=from_raw,
    )


def _region(lines: list[str], start: int, depth: int) -> list[str]:
    """Lines from ``start`` that belong to a quote at ``depth`` (all of them at depth 0),
    with that many '>' removed. A non-quoted line right after a quoted one is a lazily
    wrapped continuation (MailMate does this); an empty unquoted line ends the quote."""
    if depth == 0:
        return lines[start:]
    out: list[str] = []
    prev_in = True
    for line in lines[start:]:
        d, _content = _depth(line)
        if d >= depth:
            out.append(_dequote(line, depth))
            prev_in = bool(_content.strip())
            continue
        if line.strip() and prev_in and d == depth - 1 and out:
            out.append(_dequote(line, d))
            continue
        break
    return out


def _join(lines: list[str]) -> str:
    return "\n".join(lines).strip()


def _note(lines: list[str], end: int) -> str:
    note_lines = lines[:end]
    # A quoted separator ("> Begin forwarded message:") leaves ">" lines above it.
    while note_lines and _depth(note_lines[-1])[0] and not _depth(note_lines[-1])[1].strip():
        note_lines.pop()
    return _join(note_lines)


def _try_separator(
    lines: list[str], i: int, kind: str, rest: str, default_tz: tzinfo
) -> ForwardedMessage | None:
    d, _ = _depth(lines[i])
    note = _note(lines, i)
    if rest.strip():
        # Yahoo: the header block is on the separator line itself.
        fields = _glued_headers(rest)
        if "from" not in fields:
            return None
        body = _join(_region(lines, i + 1, d))
        return _make(fields, body, note, default_tz)
    # Find where the header block starts: the first non-blank line after the separator,
    # which may be quoted one level deeper (Apple: "Begin forwarded message:" then "> From:").
    k = i + 1
    while k < len(lines) and not _depth(lines[k])[1].strip():
        k += 1
    if k >= len(lines):
        return None
    dk, _ = _depth(lines[k])
    depth = dk if dk >= d else d
    if dk < d:
        return None
    region = _region(lines, k, depth)
    block = _header_block(region, 0)
    if block is None or "from" not in block.fields:
        if kind != "forward":
            return None
        # An explicit "Forwarded message" line with no readable header block still says
        # the text below is someone else's.
        body = _join(region[block.end:] if block else region)
        return _make(block.fields if block else {}, body, note, default_tz)
    return _make(block.fields, _join(region[block.end:]), note, default_tz)


def _try_headerless(
    lines: list[str], i: int, default_tz: tzinfo
) -> ForwardedMessage | None:
    d, content = _depth(lines[i])
    hdr = _header(content)
    if not hdr or hdr[0] != "from":
        return None
    if i > 0 and _depth(lines[i - 1])[1].strip() and not _separator(_depth(lines[i - 1])[1]):
        return None  # must start a paragraph
    region = _region(lines, i, d)
    block = _header_block(region, 0)
    if block is None:
        return None
    others = sum(1 for f in ("date", "to", "subject") if f in block.fields)
    if "subject" not in block.fields and others < 2:
        return None
    if others < 2:
        return None
    return _make(block.fields, _join(region[block.end:]), _note(lines, i), default_tz)


def _try_wrote(
    lines: list[str], i: int, subject: str, default_tz: tzinfo
) -> ForwardedMessage | None:
    """Outlook 2019 for Mac and others forward as a quoted reply: an intro line
    ("On 28/10/2021 12:46, "John Doe" <john@x> wrote:") then the indented original."""
    line = lines[i].strip()
    if not line.endswith((":", "：")) or len(line) > 300:
        return None
    cleaned = _clean_mailto(line)
    m = _EMAIL_RE.search(cleaned)
    if not m:
        return None
    k = i + 1
    while k < len(lines) and not lines[k].strip():
        k += 1
    if k >= len(lines) or not (lines[k].startswith(("  ", "\t")) or _depth(lines[k])[0]):
        return None
    quoted = bool(_depth(lines[k])[0])
    body_lines: list[str] = []
    for ln in lines[i + 1:]:
        if ln.strip() and not (ln.startswith((" ", "\t")) or _depth(ln)[0]):
            break
        body_lines.append(_dequote(ln, 1) if quoted else ln)
    body = textwrap.dedent("\n".join(body_lines)).strip()
    before = cleaned[: m.start()].rstrip(" (<")
    q = re.search(r"[\"«“„']\s*([^\"«»“”„']+?)\s*[\"»”“']\s*$", before)
    if q:
        name = q.group(1)
    else:
        seg = before.split(",")[-1]
        seg = re.sub(r"^.*\d[:.]\d\d(?:[:.]\d\d)?\s*(?:[AaPp]\.?[Mm]\.?)?", "", seg)
        words = seg.split()
        while words and not words[0][:1].isupper():
            words.pop(0)
        name = " ".join(words)
    try:
        address = normalize_address(m.group(0))
    except AddressError:
        return None
    dm = _DATE_IN_LINE_RE.search(line)
    date_raw = dm.group(0) if dm else line
    date = parse_forward_date(date_raw, default_tz)
    return ForwardedMessage(
        from_=Mailbox(address, decode_words(name.strip())),
        to=[],
        cc=[],
        subject=strip_subject_prefixes(subject),
        date=date,
        date_raw=date_raw,
        date_flagged=date is None,
        body=body,
        note=_note(lines, i),
        source="inline",
        from_raw=line,
    )


def _parse_one(text: str, subject: str | None, default_tz: tzinfo) -> ForwardedMessage | None:
    kind = _subject_kind(subject)
    lines = _prepare(text)
    for i, line in enumerate(lines):
        _d, content = _depth(line)
        if not content.strip():
            continue
        sep = _separator_long(content)
        if sep:
            sep_kind, rest = sep
            if sep_kind == "generic" and kind == "reply":
                continue
            found = _try_separator(lines, i, sep_kind, rest, default_tz)
            if found:
                return found
            continue
        if kind != "reply":
            found = _try_headerless(lines, i, default_tz)
            if found:
                return found
        if kind == "forward":
            found = _try_wrote(lines, i, subject or "", default_tz)
            if found:
                return found
    return None


def parse_inline_forward(
    text: str, default_tz: tzinfo = UTC, subject: str | None = None
) -> list[ForwardedMessage]:
    """Chain of inline-forwarded messages found in a plain-text body, outermost first
    (a forward of a forward gives 2 entries; the last is the innermost original).
    [] when the text holds no forward.

    ``subject`` is the outer message's Subject when known: a reply subject ("Re:")
    turns off the separators that Outlook also uses for quoted replies; a forward
    subject ("Fwd:", "TR:", "WG:"…) turns on "On … wrote:" forwards (Outlook for Mac)."""
    chain: list[ForwardedMessage] = []
    current_text = text
    current_subject = subject
    while len(chain) < _MAX_CHAIN:
        found = _parse_one(current_text, current_subject, default_tz)
        if found is None:
            break
        chain.append(found)
        current_text = found.body
        current_subject = found.subject if found.subject else None
    return chain


def has_forward_marker(text: str) -> bool:
    """Cheap pre-check: does any line look like a forward separator or a From header?"""
    for line in _prepare(text):
        if len(line) > 400 or (":" not in line and "-" not in line and "_" not in line
                               and "：" not in line):
            continue
        _d, content = _depth(line)
        if _separator_long(content):
            return True
        hdr = _header(content)
        if hdr and hdr[0] == "from":
            return True
    return False


# ---------------------------------------------------------------------------------------
# MIME


def _header_str(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
    except (ValueError, IndexError, TypeError, AttributeError):  # malformed header
        value = None
        for key, raw in msg.raw_items() if hasattr(msg, "raw_items") else []:
            if key.lower() == name.lower():
                value = raw
                break
    return "" if value is None else str(value)


def _part_text(part: Message) -> str:
    return part_text(part).replace("\r\n", "\n").replace("\r", "\n")


def _is_attachment(part: Message) -> bool:
    disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
    return disposition == "attachment"


def _filename(part: Message) -> str:
    try:
        return part.get_filename() or ""
    except (ValueError, TypeError, LookupError):
        return ""


def _leaves(msg: Message) -> list[Message]:
    """Parts of ``msg`` without descending into attached messages; iterative, so no
    nesting depth can exhaust the recursion limit (linking.parse.check_structure caps it
    before parsing; an attached .eml is checked here)."""
    out: list[Message] = []
    stack = [msg]
    while stack:
        part = stack.pop()
        if part.is_multipart() and part.get_content_maintype() != "message":
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(sub for sub in reversed(payload) if isinstance(sub, Message))
            continue
        out.append(part)
    return out


def _message_text(msg: Message) -> str:
    """The first text/plain part that is not an attachment, else the HTML as text."""
    leaves = _leaves(msg)
    for part in leaves:
        if part.get_content_type() == "text/plain" and not _is_attachment(part):
            return _part_text(part)
    for part in leaves:
        if part.get_content_type() == "text/html" and not _is_attachment(part):
            return html_to_text(_part_text(part))
    return ""


def _message_date(msg: Message, default_tz: tzinfo) -> tuple[datetime | None, str]:
    raw = _header_str(msg, "Date").strip()
    if not raw:
        return None, ""
    try:
        parsed = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        parsed = None
    if parsed is None:
        return parse_forward_date(raw, default_tz), raw
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=default_tz)
    return parsed, raw


def _from_message(
    msg: Message, source: str, note: str, raw: bytes | None, default_tz: tzinfo
) -> ForwardedMessage:
    from_raw = _header_str(msg, "From")
    from_: Mailbox | None
    try:
        from_ = parse_strict_mailbox(from_raw)
    except AddressError:
        boxes = parse_address_list([from_raw])
        from_ = boxes[0] if boxes else None
    date, date_raw = _message_date(msg, default_tz)
    refs = _header_str(msg, "References").split()
    return ForwardedMessage(
        from_=from_,
        to=parse_address_list([_header_str(msg, "To")]),
        cc=parse_address_list([_header_str(msg, "Cc")]),
        subject=decode_words(_header_str(msg, "Subject")),
        date=date,
        date_raw=date_raw,
        date_flagged=date is None,
        body=_message_text(msg).strip(),
        note=note,
        source=source,
        message_id=_header_str(msg, "Message-ID").strip() or None,
        in_reply_to=_header_str(msg, "In-Reply-To").strip() or None,
        references=refs,
        raw=raw,
        from_raw=from_raw,
    )


def _attached_chains(
    sub: Message, raw: bytes | None, source: str, note: str, default_tz: tzinfo, level: int
) -> list[list[ForwardedMessage]]:
    head = _from_message(sub, source, note, raw, default_tz)
    if level >= _MAX_CHAIN:
        return [[head]]
    inner = _find(sub, default_tz, level + 1)
    if not inner:
        return [[head]]
    return [[head, *chain] for chain in inner]


def _parsable(data: bytes) -> bool:
    """Whether an attached .eml is within the structure caps (it was base64 inside the
    message, so the check of the whole message could not see its structure)."""
    try:
        check_structure(data)
    except MessageRejected:
        return False
    return True


def _find(msg: Message, default_tz: tzinfo, level: int) -> list[list[ForwardedMessage]]:
    chains: list[list[ForwardedMessage]] = []
    text = _message_text(msg)
    subject = _header_str(msg, "Subject") if msg.get("Subject") is not None else None
    inline = parse_inline_forward(text, default_tz, subject=subject)
    if inline:
        chains.append(inline)
    # What the forwarder wrote in the message that carries the attachments.
    note = text.strip()
    for part in _leaves(msg):
        if part is msg:
            continue
        ctype = part.get_content_type()
        name = _filename(part).lower()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            sub = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(sub, Message):
                try:
                    raw = sub.as_bytes(policy=policy.SMTP.clone(refold_source="none"))
                except (ValueError, TypeError, UnicodeError, LookupError):
                    raw = None
                chains.extend(_attached_chains(sub, raw, "rfc822", note, default_tz, level))
        elif name.endswith(".eml"):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes) and data.strip() and _parsable(data):
                sub = BytesParser(policy=policy.default).parsebytes(data)
                chains.extend(
                    _attached_chains(sub, data, "eml-attachment", note, default_tz, level)
                )
    return chains


def find_forwards(msg: EmailMessage, default_tz: tzinfo = UTC) -> list[list[ForwardedMessage]]:
    """All forwarded originals carried by ``msg`` (parsed with policy.default): each
    attached message/rfc822 part, each attached .eml, Resent-* headers, or an inline
    forward in the first text/plain part (or the HTML as text when there is none).
    Each element is one chain, outermost first; [] when it is not a forward."""
    chains = _find(msg, default_tz, 0)
    # RFC 5322 §3.6.6: Resent-* fields mean the whole message was re-sent as it was; its
    # own From/To/Date are the original's.
    if any(msg.get(h) is not None for h in ("Resent-From", "Resent-Sender", "Resent-Date")):
        chains.append([_from_message(msg, "resent", "", None, default_tz)])
    return chains
